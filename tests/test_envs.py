"""Built-in bindings: names, errors, and the Atari preprocessing conventions."""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import subprocess
import sys

import gymnasium
import numpy as np
import pytest

from shoal.envs import make_binding, preset
from shoal.envs.atari import EpisodicLife, FireReset, GameStatistics, make_atari_env
from shoal.errors import APIUsageError


def test_cartpole():
    binding = make_binding("cartpole")
    assert binding.env_name == "CartPole-v1"
    assert binding.single_observation_space.shape == (4,)
    assert binding.single_action_space.nvec.tolist() == [2]
    pickle.loads(pickle.dumps(binding))


def test_any_gymnasium_id():
    binding = make_binding("gym:Acrobot-v1")
    assert binding.env_name == "Acrobot-v1" and binding.single_action_space.nvec.tolist() == [3]
    pendulum = make_binding("gym:Pendulum-v1")
    assert pendulum.single_action_space.shape == (1,)  # a Box: Gaussian policies


def test_an_ale_gymnasium_id_builds_in_worker_processes():
    import shoal.vector

    # Workers start without the parent's registration of ale-py's "ALE" namespace: each registers it.
    with shoal.vector.make(make_binding("gym:ALE/Breakout-v5", obs_type="ram"), "multiprocessing",
                           num_workers=1, envs_per_worker=1) as vecenv:
        obs, _ = vecenv.reset(seed=0)
        assert obs.shape == (1, 128)


def test_pettingzoo_env_by_registry_id():
    binding = make_binding("pettingzoo:butterfly/knights_archers_zombies-v11")
    assert binding.is_multiagent and binding.max_agents == 4 and binding.env_name == "butterfly/knights_archers_zombies-v11"
    assert make_binding("pettingzoo:butterfly.knights_archers_zombies_v11").env_name == binding.env_name  # module spelling
    pistons = make_binding("pettingzoo:butterfly/pistonball", n_pistons=3)  # no version: the newest
    assert pistons.env_name == "butterfly/pistonball-v6" and pistons.max_agents == 3
    assert pistons.single_action_space.shape == (1,)
    pickle.loads(pickle.dumps(pistons))  # workers rebuild it


@pytest.mark.parametrize("name,message", [
    ("mujoco", "unknown env 'mujoco': expected one of cartpole, atari:<...>, gym:<...>, pettingzoo:<...>"),
    ("CartPole", "unknown env 'CartPole'"),
    ("atari:", "names no atari env: expected atari:<name>, e.g. atari:Breakout"),
    ("gym:", "names no gym env"),
    ("atari:Breakou", "unknown Atari game 'Breakou'.*did you mean Breakout"),
    ("gym:CartPol-v1", "unknown Gymnasium env id 'CartPol-v1'.*did you mean CartPole-v1"),
    ("", "env name must be a non-empty string"),
    ("pettingzoo:", "names no pettingzoo env: expected pettingzoo:<name>, e.g. pettingzoo:butterfly/pistonball-v6"),
    ("pettingzoo:butterfly/knights_archers_zombie", "did you mean butterfly/knights_archers_zombies-v11"),
    ("pettingzoo:butterfly/knights_archers_zombies-v10", "version v10 .* not found. Available version: v11"),
    ("pettingzoo:utils/env", "unknown PettingZoo env 'utils/env'.*families: atari, butterfly, classic"),
    ("pettingzoo:mpe/simple_spread-v3", "MPE has been moved into its own package"),  # PettingZoo's own reason
    ("pettingzoo:classic/tictactoe-v3", "AEC env whose metadata does not set is_parallelizable"),
    pytest.param("pettingzoo:sisl/multiwalker-v9", r"cannot be imported: No module named 'Box2D'.*pettingzoo\[sisl\]",
                 marks=pytest.mark.skipif(importlib.util.find_spec("Box2D") is not None, reason="Box2D installed")),
])
def test_unknown_envs_get_a_clear_error(name, message):
    with pytest.raises(APIUsageError, match=message):
        make_binding(name)


def test_presets():
    assert preset("cartpole")["stop_at_return"] == 475 and preset("cartpole")["device"] == "cpu"  # launch-bound on a GPU
    assert preset("atari:Pong")["clip_coef"] == 0.1  # CleanRL's ppo_atari.py
    assert preset("gym:Acrobot-v1") == {}
    preset("cartpole")["num_envs"] = 99
    assert preset("cartpole")["num_envs"] != 99  # a copy


def test_atari_binding_has_stacked_84x84_gray_frames():
    binding = make_binding("atari:Breakout")
    assert binding.raw_single_observation_space.shape == (4, 84, 84)
    assert binding.single_observation_space.dtype == np.uint8
    assert binding.single_action_space.nvec.tolist() == [4]
    assert not binding.record_episode_statistics  # GameStatistics reports the real score
    pickle.loads(pickle.dumps(binding))


def _wrappers(env) -> list[type]:
    found = []
    while hasattr(env, "env"):
        found.append(type(env))
        env = env.env
    return found


def test_atari_wrapper_chain():
    chain = [cls.__name__ for cls in _wrappers(make_atari_env("Breakout"))]
    assert chain[:5] == ["FrameStackObservation", "TransformReward", "FireReset", "EpisodicLife", "GameStatistics"]
    assert "AtariPreprocessing" in chain
    assert FireReset not in _wrappers(make_atari_env("Freeway"))  # no FIRE action: nothing to press
    assert EpisodicLife not in _wrappers(make_atari_env("Breakout", episodic_life=False))


def _play_a_few_steps(game: str) -> None:
    env = make_binding(f"atari:{game}").make_env()
    env.reset(seed=0)
    for _ in range(5):
        env.step(np.zeros((1, 1), np.int64))
    env.close()


@pytest.mark.parametrize("game", ["Backgammon", "VideoCheckers"])
def test_a_game_whose_action_0_is_not_noop_builds_without_no_ops_episodic_life_or_fire_reset(game):
    _play_a_few_steps(game)  # action 0 is FIRE, and there is one life
    env = make_atari_env(game)
    assert FireReset not in _wrappers(env) and EpisodicLife not in _wrappers(env)
    assert env.get_wrapper_attr("noop_max") == 0 and make_atari_env("Breakout").get_wrapper_attr("noop_max") == 30
    for wrapper, index, meaning in ((EpisodicLife, 0, "NOOP"), (FireReset, 1, "FIRE")):
        with pytest.raises(APIUsageError, match=rf"{wrapper.__name__} presses action {index} as {meaning}, but "
                                                rf"ALE/{game}-v5's actions are \['FIRE', .*\]: leave "
                                                rf"{wrapper.__name__} out for this game"):
            wrapper(gymnasium.make(f"ALE/{game}-v5"))


@pytest.mark.slow
def test_every_atari_game_builds_and_steps():
    from shoal.envs.atari import atari_games

    for game in atari_games():
        _play_a_few_steps(game)


@pytest.mark.parametrize("setting,message", [
    (dict(frame_skip=0), "frame_skip must be a positive int, got 0"),
    (dict(frame_skip=4.5), "frame_skip must be a positive int, got 4.5"),
    (dict(noop_max=-3), "noop_max must be an int >= 0, got -3"),
    (dict(frame_stack=0), "frame_stack must be a positive int, got 0"),
    (dict(clip_rewards="no"), "clip_rewards must be True or False, got 'no'"),
    (dict(episodic_life=None), "episodic_life must be True or False, got None"),
    (dict(repeat_action_probability=1.5), "repeat_action_probability must be a number from 0 to 1, got 1.5"),
    (dict(render_mode="bogus"), "render_mode must be None, 'rgb_array' or 'human', got 'bogus'"),
])
def test_atari_settings_are_checked(setting, message):
    with pytest.raises(APIUsageError, match=re.escape(f"make_atari_env('Breakout'): {message}")):
        make_binding("atari:Breakout", **setting)


def test_the_old_ale_ids_build_through_gym_in_any_process():
    """ale-py registers BreakoutNoFrameskip-v4 and the like on import: gym:<id> must not depend on whether
    something imported it before (a fresh process, or a worker, would not know the id)."""
    code = ("import shoal.vector; from shoal.envs import make_binding\n"
            "if __name__ == '__main__':\n"
            "    with shoal.vector.make(make_binding('gym:BreakoutNoFrameskip-v4'), 'multiprocessing', num_workers=1) as v:\n"
            "        print(v.reset(seed=0)[0].shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["(1,", "100800)"], done.stderr


def test_a_gymnasium_id_that_a_module_registers_builds_in_any_process(tmp_path):
    """gym:<module>:<id> imports the module first, as gymnasium.make does: the only way to name an env of your own
    package on the command line, and workers import it too."""
    (tmp_path / "my_shoal_envs.py").write_text(
        "import gymnasium\n"
        "gymnasium.register('ModuleCart-v0', entry_point='gymnasium.envs.classic_control:CartPoleEnv')\n")
    code = ("import shoal.vector; from shoal.envs import make_binding\n"
            "if __name__ == '__main__':\n"
            "    binding = make_binding('gym:my_shoal_envs:ModuleCart-v0')\n"
            "    with shoal.vector.make(binding, 'multiprocessing', num_workers=1) as v:\n"
            "        print(binding.env_name, v.reset(seed=0)[0].shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0 and done.stdout.split() == ["my_shoal_envs:ModuleCart-v0", "(1,", "4)"], done.stderr
    with pytest.raises(APIUsageError, match=r"^Gymnasium env 'no_such_shoal_module:Cart-v0': cannot import module "
                                            r"'no_such_shoal_module', which should register 'Cart-v0': No module named"):
        make_binding("gym:no_such_shoal_module:Cart-v0")
    with pytest.raises(APIUsageError, match=r"^unknown Gymnasium env id 'json:Cart-v0' \(module 'json' does not "
                                            r"register it\): expected a registered id such as CartPole-v1 or "
                                            r"Acrobot-v1, or module:id for an env that a module of yours registers"):
        make_binding("gym:json:Cart-v0")


def test_an_id_registered_only_in_the_main_script_is_named_in_the_workers_error():
    code = ("import gymnasium, shoal.vector; from shoal.envs import make_binding\n"
            "if __name__ == '__main__':\n"
            "    gymnasium.register('MainOnlyCart-v0', entry_point='gymnasium.envs.classic_control:CartPoleEnv')\n"
            "    try:\n"
            "        shoal.vector.make(make_binding('gym:MainOnlyCart-v0'), 'multiprocessing', num_workers=1)\n"
            "    except shoal.errors.WorkerError as error:\n"
            "        print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"EnvError: Gymnasium env 'MainOnlyCart-v0': .*doesn't exist.* \(in process \d+, though it was "
                     r"registered where the Binding was made\): an id registered in your script, under if __name__ == "
                     r"'__main__' or by hand, is not registered in worker processes; register it in a module and name "
                     r"it gym:<module>:<id>", done.stdout), done.stdout


def test_an_env_keyword_the_env_does_not_take_is_named():
    with pytest.raises(APIUsageError, match=r"^Gymnasium env 'CartPole-v1' takes no keyword argument 'nonsense': "
                                            r"CartPoleEnv.__init__\(\) got an unexpected keyword argument 'nonsense'"):
        make_binding("gym:CartPole-v1", nonsense=1)
    # the keywords of make_binding's own name, and of gym's and pettingzoo's, are the env's (positional-only there)
    for name, keyword in (("gym:CartPole-v1", "name"), ("gym:CartPole-v1", "env_id"), ("cartpole", "nonsense")):
        with pytest.raises(APIUsageError, match=f"'CartPole-v1' takes no keyword argument '{keyword}'"):
            make_binding(name, **{keyword: "x"})
    assert make_binding("cartpole", render_mode="rgb_array").make_env().env.render_mode == "rgb_array"
    with pytest.raises(APIUsageError, match=r"^PettingZoo env 'butterfly/knights_archers_zombies-v11' takes no keyword "
                                            r"argument 'env_id': .*unexpected keyword argument 'env_id'$"):
        make_binding("pettingzoo:butterfly/knights_archers_zombies-v11", env_id=1)


def test_a_module_in_the_current_directory_that_is_not_on_the_path_is_named(tmp_path, monkeypatch):
    """The `shoal` console script does not put the current directory on sys.path (python -m shoal does)."""
    (tmp_path / "my_maze_envs.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", ".", str(tmp_path))])
    with pytest.raises(APIUsageError, match=r"cannot import module 'my_maze_envs', .*it is in the current directory, "
                                            r"which the `shoal` command does not search"):
        make_binding("gym:my_maze_envs:Maze-v0")


def test_an_unknown_atari_setting_is_named_with_those_there_are():
    with pytest.raises(APIUsageError, match=r"atari:Breakout: got an unexpected keyword argument 'full_action_space': "
                                            r"make_atari_env takes frame_skip, noop_max, .*, render_mode$"):
        make_binding("atari:Breakout", full_action_space=True)


def test_rendering_an_atari_game_built_without_a_render_mode_says_how_to_build_it():
    env = make_binding("atari:Breakout").make_env()
    env.reset(seed=0)
    with pytest.raises(APIUsageError, match=r"Breakout \(Atari\): render\(\) needs the env built with a render_mode .*"
                                            r"make_binding\(name, render_mode='rgb_array'\)"):
        env.render()
    env.close()
    env = make_binding("atari:Breakout", render_mode="rgb_array").make_env()
    env.reset(seed=0)
    assert env.render().shape == (210, 160, 3)
    env.close()


def test_episodic_life_ends_the_episode_but_not_the_game():
    env = make_atari_env("Breakout")
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    rewards, steps = [], 0
    while True:
        obs, reward, terminated, truncated, info = env.step(int(rng.integers(4)))
        rewards.append(reward)
        steps += 1
        if terminated or truncated:
            break
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert info["lives"] == 4 and "episode" not in info  # a life lost, the game goes on
    frame = info["episode_frame_number"]
    obs, info = env.reset()
    lives = env.unwrapped.ale.lives()
    assert lives == 4 and env.unwrapped.ale.getEpisodeFrameNumber() > frame  # not a real reset
    assert set(rewards) <= {0.0, 1.0}  # clipped
    for _ in range(3):
        env.step(0)
    env.reset()  # not after a lost life: a new game
    assert env.unwrapped.ale.lives() == 5 and env.unwrapped.ale.getEpisodeFrameNumber() < 200
    for _ in range(300):  # lose a life, then reset with a seed: a new game too, as Gymnasium's reset(seed) says
        if env.step(int(rng.integers(4)))[2]:
            break
    assert env.unwrapped.ale.lives() == 4
    env.reset(seed=3)
    assert env.unwrapped.ale.lives() == 5


class LifeLostAtTheTimeLimit(gymnasium.Env):
    """A game of 3 lives whose second step loses one, and is the last the time limit allows."""

    observation_space = gymnasium.spaces.Box(0, 1, (1,))
    action_space = gymnasium.spaces.Discrete(2)

    def __init__(self):
        self.ale = self  # EpisodicLife reads env.unwrapped.ale.lives()
        self.resets = self.steps = 0
        self.life_count = 3

    def get_action_meanings(self):
        return ["NOOP", "FIRE"]

    def lives(self):
        return self.life_count

    def reset(self, seed=None, options=None):
        self.resets, self.steps, self.life_count = self.resets + 1, 0, 3
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.steps += 1
        if self.steps == 2:
            self.life_count -= 1
        return np.zeros(1, np.float32), 0.0, False, self.steps == 2, {}


def test_a_life_lost_on_the_step_the_time_limit_cuts_ends_the_training_episode_and_the_game():
    game = LifeLostAtTheTimeLimit()
    env = EpisodicLife(game)
    env.reset()
    env.step(0)
    assert env.step(0)[2:4] == (True, True)  # the lost life ends the episode: no bootstrap across it
    env.reset()
    assert game.resets == 2 and game.lives() == 3  # the time limit ended the game: a real reset


def test_game_statistics_report_the_unclipped_score_over_all_lives():
    env = make_atari_env("Breakout")
    env.reset(seed=1)
    rng = np.random.default_rng(1)
    clipped_total, episode = 0.0, None
    for _ in range(20_000):
        _, reward, terminated, truncated, info = env.step(int(rng.integers(4)))
        clipped_total += reward
        if "episode" in info:
            episode = info["episode"]
            break
        if terminated or truncated:
            env.reset()
    assert episode is not None, "the game never ended"
    assert env.unwrapped.ale.lives() == 0
    assert episode["return"] >= clipped_total and episode["length"] > 100
    assert GameStatistics in _wrappers(env)


def test_a_missing_extra_is_named(monkeypatch, tmp_path):
    from shoal.logging import Logger

    monkeypatch.setitem(sys.modules, "ale_py", None)  # import ale_py now fails, as without the atari extra
    with pytest.raises(APIUsageError, match=r"Atari envs need ale-py, which the atari extra installs: pip install "
                                            r"'ale-py>=0.9' opencv-python-headless \(in a checkout of shoal: "
                                            r"./install.sh atari\)"):
        make_binding("atari:Breakout")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(APIUsageError, match="--wandb needs the wandb package, which the wandb extra installs"):
        Logger(tmp_path, dashboard=False, tensorboard=False, wandb=True)


def test_env_helpers_name_a_wrong_kind_of_name():
    from shoal.envs import atari_game, gym, pettingzoo

    for helper, kind in ((atari_game, "atari_game(game)"), (gym, "gym(env_id)"), (pettingzoo, "pettingzoo(env_id)")):
        with pytest.raises(APIUsageError, match=rf"{re.escape(kind)} needs a non-empty string, got None"):
            helper(None)


class _NeedsMissingModule:
    """An env whose constructor fails the way a registered env with a missing optional dependency does."""

    def __init__(self, plain: bool = False):
        if plain:  # an ImportError of the env's own words, caused by the missing module
            try:
                import shoal_missing_module  # noqa: F401
            except ModuleNotFoundError as error:
                raise ImportError("this env needs its extra: pip install shoal-missing") from error
        raise ModuleNotFoundError("No module named 'shoal_missing_module'", name="shoal_missing_module")


@pytest.mark.parametrize("plain, message", [
    (False, r"Gymnasium env 'ShoalMissing-v0' needs a package that is not installed: No module named "
            r"'shoal_missing_module': install the package that provides it$"),
    (True, r"Gymnasium env 'ShoalMissing-v0' needs a package that is not installed: this env needs its extra: pip "
           r"install shoal-missing; missing module 'shoal_missing_module'$"),
])
def test_an_import_error_while_building_a_registered_env_names_the_missing_module(monkeypatch, plain, message):
    from gymnasium.envs.registration import EnvSpec

    spec = EnvSpec("ShoalMissing-v0", entry_point=_NeedsMissingModule, kwargs={"plain": plain})
    monkeypatch.setitem(gymnasium.registry, spec.id, spec)
    with pytest.raises(APIUsageError, match=message):
        make_binding("gym:ShoalMissing-v0")


def test_a_retired_gymnasium_id_is_not_blamed_on_a_missing_package_and_names_the_newest_version():
    with pytest.raises(APIUsageError, match=r"Gymnasium env 'Hopper-v3' cannot be built: The mujoco v2 and v3 based "
                                            r"environments have been moved to .*; try Hopper-v5$"):
        make_binding("gym:Hopper-v3")


@pytest.mark.skipif(importlib.util.find_spec("shimmy") is not None, reason="shimmy installed: Hanabi may build")
def test_a_pettingzoo_env_that_imports_its_dependency_when_built_names_the_extra():
    with pytest.raises(APIUsageError, match=r"PettingZoo env 'classic/hanabi-v5' cannot be imported: Hanabi depends on "
                                            r"OpenSpiel .*; missing module 'shimmy' \(its family needs an extra: pip "
                                            r"install 'pettingzoo\[classic\]'\)"):
        make_binding("pettingzoo:classic/hanabi-v5")
