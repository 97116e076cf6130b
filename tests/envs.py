"""Small purpose-built envs for shoal's tests and benchmarks."""

from __future__ import annotations

import ctypes
import os
import sys
import time

import gymnasium
import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

OBS_SPACE = spaces.Dict({
    "self": spaces.Dict({
        "pos": spaces.Box(-100, 100, (2,), np.float32),
        "hp": spaces.Discrete(11),
    }),
    "map": spaces.Box(0, 255, (3, 3), np.uint8),
    "inventory": spaces.Tuple((spaces.MultiBinary(3), spaces.MultiDiscrete([4, 5]))),
})

ACTION_SPACE = spaces.Dict({
    "move": spaces.Discrete(5),
    "attack": spaces.Dict({"target": spaces.Discrete(4, start=-1), "style": spaces.MultiDiscrete([2, 3])}),
})


class NestedMultiAgentEnv(ParallelEnv):
    """Agents with nested Dict/Tuple observations and actions that die and spawn mid-episode.

    Agent ``i`` (of ``num_agents``) starts with ``i + 2`` hp and loses one each step it does not
    move 4; it dies (terminal) at 0 hp. Agent ``"late"`` spawns at step ``spawn_step``. The episode is
    truncated at ``max_steps``. Rewards encode the action, observations the agent and the step, so
    tests can check that slots, actions and values land where they should.
    """

    metadata = {"name": "nested_multiagent_v0"}

    def __init__(self, num_agents: int = 4, max_steps: int = 20, spawn_step: int = 3):
        # Listed out of sorted order on purpose: shoal must sort them.
        self.possible_agents = [f"agent_{i}" for i in reversed(range(num_agents))] + ["late"]
        self.max_steps = max_steps
        self.spawn_step = spawn_step
        self.agents = []

    def observation_space(self, agent):
        return OBS_SPACE

    def action_space(self, agent):
        return ACTION_SPACE

    def _obs(self, agent):
        index = self.possible_agents.index(agent)
        return {
            "self": {"pos": np.array([index, self.t], np.float32), "hp": int(self.hp[agent])},
            "map": np.full((3, 3), (index * 16 + self.t) % 256, np.uint8),
            "inventory": (np.array([index % 2, 1, 0], np.int8), np.array([index % 4, self.t % 5])),
        }

    def reset(self, seed=None, options=None):
        self.rng = np.random.default_rng(seed)
        self.t = 0
        self.agents = [agent for agent in self.possible_agents if agent != "late"]
        self.hp = {agent: min(self.possible_agents.index(agent) + 2, 10) for agent in self.possible_agents}
        self.hp["late"] = 10
        return {agent: self._obs(agent) for agent in self.agents}, {agent: {"spawned": True} for agent in self.agents}

    def step(self, actions):
        self.t += 1
        rewards, terminals, truncations, infos = {}, {}, {}, {}
        for agent in self.agents:
            action = actions[agent]
            rewards[agent] = float(action["move"]) + 0.1 * float(action["attack"]["target"]) + self.rng.random() * 1e-3
            if action["move"] != 4:
                self.hp[agent] -= 1
            terminals[agent] = self.hp[agent] <= 0
            truncations[agent] = self.t >= self.max_steps and not terminals[agent]
            infos[agent] = {"hp": self.hp[agent]}
        obs = {agent: self._obs(agent) for agent in self.agents}
        self.agents = [agent for agent in self.agents if not (terminals[agent] or truncations[agent])]
        if self.t == self.spawn_step and self.t < self.max_steps:
            self.agents.append("late")
            obs["late"] = self._obs("late")
        return obs, rewards, terminals, truncations, infos


class NestedSingleAgentEnv(gymnasium.Env):
    """A single agent with a nested observation and action; ends after ``max_steps`` (truncation)."""

    observation_space = OBS_SPACE
    action_space = ACTION_SPACE

    def __init__(self, max_steps: int = 10):
        self.max_steps = max_steps

    def _obs(self):
        return {
            "self": {"pos": np.array([self.t, -self.t], np.float32), "hp": self.t % 11},
            "map": np.full((3, 3), self.t, np.uint8),
            "inventory": (np.array([1, 0, 1], np.int8), np.array([self.t % 4, 2])),
        }

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        reward = float(action["move"]) + float(action["attack"]["style"][1])
        return self._obs(), reward, False, self.t >= self.max_steps, {"t": self.t}


class BadObservationEnv(gymnasium.Env):
    """Returns an observation outside its declared space at step ``bad_step``."""

    observation_space = spaces.Box(0, 1, (3,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, bad_step: int = 2, bad_value=np.array([0.5, 7.0, 0.5], np.float32)):
        self.bad_step, self.bad_value = bad_step, bad_value

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.t += 1
        obs = self.bad_value if self.t == self.bad_step else np.zeros(3, np.float32)
        return obs, 0.0, False, False, {}


class UnknownAgentEnv(NestedMultiAgentEnv):
    """A multi-agent env that returns an agent id it never declared."""

    def step(self, actions):
        obs, *rest = super().step(actions)
        obs["intruder"] = next(iter(obs.values()))
        return (obs, *rest)


class PrintingEnv(gymnasium.Env):
    """Prints from Python and from C on every reset and step."""

    observation_space = spaces.Box(0, 1, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def _shout(self, where):
        print(f"python stdout {where}")
        print(f"python stderr {where}", file=sys.stderr)
        ctypes.CDLL(None).printf(f"c stdout {where}\n".encode())
        os.write(2, f"fd stderr {where}\n".encode())

    def reset(self, seed=None, options=None):
        self._shout("reset")
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self._shout("step")
        if action == 1:
            raise RuntimeError("env failed on purpose")
        return np.zeros(1, np.float32), 0.0, False, False, {}


class CrashingEnv(gymnasium.Env):
    """Raises at step ``crash_step``, or sleeps forever there with ``hang=True``."""

    observation_space = spaces.Box(-1, 1, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, crash_step: int = 3, hang: bool = False):
        self.crash_step, self.hang = crash_step, hang

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        if self.t == self.crash_step:
            if self.hang:
                time.sleep(3600)
            raise ValueError(f"CrashingEnv crashed at step {self.t}")
        return np.zeros(2, np.float32), 1.0, False, False, {}


class SecondResetFails(gymnasium.Env):
    """Episodes of 2 steps; the reset that begins the second episode raises."""

    observation_space = spaces.Box(-1, 1, (1,), np.float32)
    action_space = spaces.Discrete(2)
    resets = 0

    def reset(self, seed=None, options=None):
        self.resets, self.t = self.resets + 1, 0
        if self.resets == 2:
            raise RuntimeError("the emulator lost its ROM")
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(1, np.float32), 1.0, self.t == 2, False, {}


# ---------------------------------------------------------------- vector tests (shoal.vector)


class ProbeEnv(CrashingEnv):
    """A CrashingEnv that says which process runs it and can fail where a test asks.

    Vector tests arm one env with ``set_attr("crash_step", n, env_ids=[i])`` (and ``hang``), and find its
    worker process with ``call("pid")``. With ``fail_outside_pid``, building it fails in any other process.
    """

    def __init__(self, crash_step: int = 10**9, hang: bool = False, fail_outside_pid: int | None = None):
        if fail_outside_pid is not None and os.getpid() != fail_outside_pid:
            raise RuntimeError(f"ProbeEnv refuses to start in process {os.getpid()}")
        super().__init__(crash_step, hang)

    exit_step: int | None = None
    """the step at which the env calls sys.exit (SystemExit is not an Exception)"""
    sleep = 0.0
    """seconds each step takes"""

    def step(self, action):
        if self.t + 1 == self.exit_step:
            sys.exit(3)
        time.sleep(self.sleep)
        return super().step(action)

    def pid(self) -> int:
        return os.getpid()

    def scaled(self, value, factor=1):
        return value * factor

    def echo(self, *args, **kwargs) -> tuple:
        return args, kwargs

    def bump(self, counter: list | None = None) -> list:
        """Append 1 to ``counter`` (default: the attribute ``note``) in place and return it."""
        counter = self.note if counter is None else counter
        counter.append(1)
        return counter

    def count(self) -> int:
        """How often it was called: a side effect, to tell repeated calls apart."""
        self.calls = getattr(self, "calls", 0) + 1
        return self.calls

    def unprintable(self):
        """Raises an exception whose str() fails."""
        class Unprintable(Exception):
            def __str__(self):
                raise RuntimeError("no text")

        raise Unprintable()

    def lock(self):
        """Something that does not pickle."""
        import threading

        return threading.Lock()


class ReseedingNestedMultiAgentEnv(NestedMultiAgentEnv):
    """NestedMultiAgentEnv whose autoresets (``reset(seed=None)``) draw their seeds from the first seed,
    so a whole run, episode ends included, is reproducible from ``reset(seed)``."""

    def reset(self, seed=None, options=None):
        if seed is not None or not hasattr(self, "_seeds"):
            self._seeds = np.random.default_rng(seed)
        return super().reset(seed=int(self._seeds.integers(2**31)), options=options)


# ---------------------------------------------------------------- envs for the trainer's tests (test_ppo.py)


class PaddedCartPole(ParallelEnv):
    """CartPole played by agent ``"cart"``, listed among ghost agents that never appear.

    Its ghosts sort before and after the cart, so the cart lives in slot 1 of 3 and the others are
    padding (mask False) for the whole run: it must train exactly like plain CartPole.
    """

    metadata = {"name": "padded_cartpole_v0"}

    def __init__(self):
        self.possible_agents = ["z_ghost", "cart", "a_ghost"]
        self.env = gymnasium.make("CartPole-v1")
        self.agents = []

    def observation_space(self, agent):
        return self.env.observation_space

    def action_space(self, agent):
        return self.env.action_space

    def reset(self, seed=None, options=None):
        obs, info = self.env.reset(seed=seed)
        self.agents = ["cart"]
        return {"cart": obs}, {}

    def step(self, actions):
        obs, reward, terminal, truncation, _ = self.env.step(actions["cart"])
        if terminal or truncation:
            self.agents = []
        return {"cart": obs}, {"cart": reward}, {"cart": terminal}, {"cart": truncation}, {}


class ConstantRewardEnv(gymnasium.Env):
    """Reward 1 at every step, the same observation always, truncated (never terminated) every ``horizon`` steps.

    Bootstrapping truncations makes the true value ``1 / (1 - gamma)``; treating them as terminal
    would teach about ``horizon / 2``.
    """

    observation_space = spaces.Box(0, 2, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, horizon: int = 4):
        self.horizon = horizon

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.ones(1, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.ones(1, np.float32), 1.0, False, self.t >= self.horizon, {}


class ScriptedLives(ParallelEnv):
    """Agents "a" and "b" live by a script, one entry per step (repeated every episode), and the env keeps a
    log of what it received.

    An entry is ``(shown, ended, listed)``: the agents with an observation, the agents terminated at this
    step, and ``env.agents`` after it (an agent listed but not shown is dark). ``reset`` is
    ``(shown, listed)``. The episode ends with the script. Every agent that received an action gets reward
    1 and the info ``{"step": t}``. ``log`` holds, per step, the agents shown
    before it, which of them had ended, the agents that received an action, and what came of each
    (shown, ended or left ``env.agents``).
    """

    metadata = {"name": "scripted_lives"}
    possible_agents = ["a", "b"]

    def __init__(self, reset=(("a", "b"), ("a", "b")), script=()):
        self.start, self.script, self.log = reset, script, []

    def observation_space(self, agent):
        return spaces.Box(0, 100, (1,), np.float32)

    def action_space(self, agent):
        return spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        shown, self.agents = self.start[0], list(self.start[1])
        self.t, self.shown, self.ended = 0, set(shown), set()
        return {agent: np.array([self.t], np.float32) for agent in shown}, {}

    def step(self, actions):
        shown, ended, listed = self.script[self.t]
        self.t += 1
        answered = set(shown) | set(ended) | (set(actions) - set(listed))
        self.log.append((self.shown - self.ended, set(actions), answered))
        self.shown, self.ended = set(shown), set(ended)
        rewards = {agent: 1.0 for agent in actions}
        self.agents = list(listed)
        terminals = {agent: True for agent in ended}
        infos = {agent: {"step": self.t} for agent in actions}
        return {agent: np.array([self.t], np.float32) for agent in shown}, rewards, terminals, {}, infos

    def transitions(self) -> int:
        """The transitions that count by docs/design.md's rule: an agent shown (and not ended) before a step
        received an action in it, and something came of it."""
        return sum(len(before & acted & answered) for before, acted, answered in self.log)


class Unpicklable(Exception):
    """Pickles, but does not unpickle: pickle passes its args positionally, its __init__ takes a keyword."""

    def __init__(self, *, code: int):
        super().__init__(code)
