"""Atari games with the standard DQN/PPO preprocessing, built from Gymnasium's own wrappers.

Gymnasium's ``AtariPreprocessing`` does the no-op reset (up to 30 no-ops), frame skip 4 with a max
over the last two frames, and 84x84 grayscale; ``TransformReward`` clips rewards to their sign;
``FrameStackObservation`` stacks 4 frames. Gymnasium has no wrappers for the two remaining
conventions, so they are here: :class:`EpisodicLife` (a lost life ends the *training* episode,
the game goes on) and :class:`FireReset` (press FIRE to start where a game needs it). These and the
no-op reset press actions by number, so each runs only where the number means NOOP (action 0) or
FIRE (action 1): Backgammon and VideoCheckers, whose action 0 is FIRE and who have one life, get no
no-op reset, no :class:`EpisodicLife` and no :class:`FireReset`.
:class:`GameStatistics` reports the real game score (unclipped, over all lives) as the episode
statistics, so logged returns compare with published Atari results.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

from shoal.errors import APIUsageError, check_int, install_hint, is_number


def _action_is(env: gymnasium.Env, index: int, meaning: str) -> bool:
    """Whether the game's action ``index`` is ``meaning`` (``"NOOP"``, ``"FIRE"`` ...)."""
    return env.unwrapped.get_action_meanings()[index:index + 1] == [meaning]


def _require_action(env: gymnasium.Env, wrapper: str, index: int, meaning: str) -> None:
    if not _action_is(env, index, meaning):
        game = getattr(env.unwrapped.spec, "id", type(env.unwrapped).__name__)
        raise APIUsageError(f"{wrapper} presses action {index} as {meaning}, but {game}'s actions are "
                            f"{env.unwrapped.get_action_meanings()}: leave {wrapper} out for this game")


class GameStatistics(gymnasium.Wrapper):
    """At the end of a whole game put ``info["episode"] = {"return", "length"}``: the score, and the game's
    steps (of ``frame_skip`` frames each), the agent's and those :class:`EpisodicLife` and :class:`FireReset`
    take at the start of a life (the no-ops of a reset are not counted)."""

    def __init__(self, env: gymnasium.Env):
        super().__init__(env)
        self.score, self.steps = 0.0, 0

    def reset(self, **kwargs) -> tuple[Any, dict]:
        self.score, self.steps = 0.0, 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.score += float(reward)
        self.steps += 1
        if terminated or truncated:
            info = {**info, "episode": {"return": self.score, "length": self.steps}}
        return obs, reward, terminated, truncated, info


class EpisodicLife(gymnasium.Wrapper):
    """End the episode (``terminated``) when a life is lost; really reset only when the game is over.

    The reset that follows a lost life takes one no-op step instead, so the game continues where it
    was: the game's action 0 must be NOOP. Any other reset, or one given a seed or options, starts a
    new game.
    """

    def __init__(self, env: gymnasium.Env):
        _require_action(env, "EpisodicLife", 0, "NOOP")
        super().__init__(env)
        self.lives = 0
        self.life_lost = False  # the last step ended a life, not the game: a reset continues the game

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives = self.env.unwrapped.ale.lives()
        lost = 0 < lives < self.lives  # ends the training episode, also on a step the time limit cuts
        self.life_lost = lost and not (terminated or truncated)
        self.lives = lives
        return obs, reward, terminated or lost, truncated, info

    def reset(self, **kwargs) -> tuple[Any, dict]:
        if not self.life_lost or kwargs.get("seed") is not None or kwargs.get("options") is not None:
            obs, info = self.env.reset(**kwargs)
        else:
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        self.life_lost = False
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


class FireReset(gymnasium.Wrapper):
    """Press FIRE (then one more action) after every reset, for games that wait for it (Breakout...).

    Needs FIRE as action 1, as in every ALE game with FIRE except Backgammon and VideoCheckers (action 0).
    """

    def __init__(self, env: gymnasium.Env):
        _require_action(env, "FireReset", 1, "FIRE")
        super().__init__(env)

    def reset(self, **kwargs) -> tuple[Any, dict]:
        self.env.reset(**kwargs)
        for action in (1, 2):
            obs, _, terminated, truncated, info = self.env.step(action)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        return obs, info


def make_atari_env(game: str, frame_skip: int = 4, noop_max: int = 30, frame_stack: int = 4,
                   episodic_life: bool = True, clip_rewards: bool = True,
                   repeat_action_probability: float = 0.0, render_mode: str | None = None) -> gymnasium.Env:
    """``ALE/{game}-v5`` with the standard preprocessing; observations ``uint8 (frame_stack, 84, 84)``.

    ``repeat_action_probability=0`` (no sticky actions) matches the ``NoFrameskip-v4`` setting of
    CleanRL's published ``ppo_atari`` results; pass 0.25 for the ALE v5 protocol. A game whose action 0
    is not NOOP (Backgammon, VideoCheckers) starts without no-ops and has no episodic life (it has one life).
    """
    where = f"make_atari_env({game!r})"
    check_int(f"{where}: frame_skip", frame_skip)
    check_int(f"{where}: noop_max", noop_max, minimum=0)
    check_int(f"{where}: frame_stack", frame_stack)
    for name, value in (("episodic_life", episodic_life), ("clip_rewards", clip_rewards)):
        if not isinstance(value, (bool, np.bool_)):
            raise APIUsageError(f"{where}: {name} must be True or False, got {value!r}")
    if not (is_number(repeat_action_probability) and 0 <= repeat_action_probability <= 1):
        raise APIUsageError(f"{where}: repeat_action_probability must be a number from 0 to 1, got "
                            f"{repeat_action_probability!r}")
    if render_mode not in (None, "rgb_array", "human"):
        raise APIUsageError(f"{where}: render_mode must be None, 'rgb_array' or 'human', got {render_mode!r}")
    import_ale()
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation, TransformReward

    env = gymnasium.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=repeat_action_probability,
                         render_mode=render_mode)
    has_noop = _action_is(env, 0, "NOOP")
    env = AtariPreprocessing(env, noop_max=noop_max if has_noop else 0, frame_skip=frame_skip, screen_size=84,
                             terminal_on_life_loss=False, grayscale_obs=True, scale_obs=False)
    env = GameStatistics(env)
    if episodic_life and has_noop:
        env = EpisodicLife(env)
    if _action_is(env, 1, "FIRE"):
        env = FireReset(env)
    if clip_rewards:
        env = TransformReward(env, lambda reward: float(np.sign(reward)))
    return FrameStackObservation(env, frame_stack)


def import_ale() -> None:
    """Register ale-py's games with gymnasium and cut its log to errors (no banner from every env copy);
    APIUsageError naming the extra if ale-py is missing."""
    try:
        import ale_py
    except ImportError:
        raise APIUsageError(f"Atari envs need ale-py, which the atari extra installs: "
                            f"{install_hint('atari')}") from None
    gymnasium.register_envs(ale_py)
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)


def atari_games() -> list[str]:
    """The ALE game names ``make_atari_env`` accepts (``Breakout``, ``Pong`` ...)."""
    import_ale()
    return sorted(env_id[4:-3] for env_id in gymnasium.registry if env_id.startswith("ALE/") and env_id.endswith("-v5"))
