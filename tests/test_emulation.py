"""The emulation layer on real envs (CartPole, Breakout, Butterfly) and on purpose-built nested envs."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import threading

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv

import shoal
from shoal.emulation import Buffers
from shoal.errors import APIUsageError, EnvError, SpaceError

from envs import (ACTION_SPACE, OBS_SPACE, BadObservationEnv, NestedMultiAgentEnv, NestedSingleAgentEnv,
                  PrintingEnv, ScriptedLives, SecondResetFails, UnknownAgentEnv)


def nested_binding(**kwargs) -> shoal.Binding:
    return shoal.Binding(env_cls=NestedMultiAgentEnv, env_kwargs=dict(num_agents=3, max_steps=6), **kwargs)


def started(binding):
    """A new emulated env of ``binding``, reset with seed 0."""
    env = binding.make_env()
    env.reset(seed=0)
    return env


def flat_actions(binding, move=0, target=0, style=(0, 0)):
    action = {"move": move, "attack": {"target": target, "style": np.array(style)}}
    return np.stack([binding.flatten_action(action)] * binding.max_agents)


# ---------------------------------------------------------------- single-agent envs


def test_cartpole_contract_and_same_step_autoreset():
    binding = shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",))
    assert binding.env_name == "CartPole-v1"
    assert shoal.Binding(env_creator=functools.partial(functools.partial(PrintingEnv))).env_name == "PrintingEnv"
    assert not binding.is_multiagent and binding.max_agents == 1
    assert binding.single_observation_space.shape == (4,) and binding.single_observation_space.dtype == np.float32
    assert binding.single_action_space == spaces.MultiDiscrete([2])
    env = binding.make_env()
    obs, infos = env.reset(seed=3)
    assert obs.shape == (1, 4) and obs.dtype == np.float32 and env.masks.tolist() == [True]
    reference = gymnasium.make("CartPole-v1")
    ref_obs, _ = reference.reset(seed=3)
    np.testing.assert_array_equal(obs[0], ref_obs)
    for t in range(1, 200):
        obs, rewards, terminals, truncations, infos = env.step(np.array([[1]]))
        ref_obs, ref_reward, ref_term, ref_trunc, _ = reference.step(1)
        assert rewards.dtype == np.float32 and terminals.dtype == bool and rewards[0] == ref_reward
        if ref_term:
            break
        np.testing.assert_array_equal(obs[0], ref_obs)
    assert terminals[0] and not truncations[0] and env.masks[0]
    info = infos[0]
    np.testing.assert_array_equal(info["final_observation"], ref_obs)
    assert info["episode"] == {"return": float(t), "length": t}
    assert not np.array_equal(obs[0], ref_obs)  # the next episode's first observation
    obs, _, terminals, _, infos = env.step(np.array([0]))  # 1-D actions are fine for one agent
    assert not terminals[0] and infos == {}


def test_truncation_keeps_final_observation_for_bootstrap():
    binding = shoal.Binding(env_cls=NestedSingleAgentEnv, env_kwargs={"max_steps": 3})
    env = started(binding)
    for _ in range(3):
        obs, rewards, terminals, truncations, infos = env.step(flat_actions(binding, move=2, style=(1, 2)))
    assert truncations[0] and not terminals[0] and rewards[0] == 4.0
    final = binding.unflatten_observation(infos[0]["final_observation"])
    assert final["self"]["pos"].tolist() == [3.0, -3.0] and final["map"][0, 0] == 3
    assert binding.unflatten_observation(obs[0])["map"][0, 0] == 0  # already the next episode
    assert infos[0]["t"] == 3 and infos[0]["episode"] == {"return": 12.0, "length": 3}


def test_breakout_frames_stay_uint8_and_unflatten_to_views():
    import ale_py

    gymnasium.register_envs(ale_py)
    binding = shoal.Binding(env_creator=gymnasium.make, env_args=("ALE/Breakout-v5",))
    assert binding.single_observation_space.dtype == np.uint8
    assert binding.single_observation_space.shape == (210 * 160 * 3,)
    env = binding.make_env()
    obs, _ = env.reset(seed=0)
    frame = binding.unflatten_observation(obs)
    assert frame.shape == (1, 210, 160, 3) and np.shares_memory(frame, obs)
    for _ in range(20):
        obs, *_ = env.step(np.array([[1]]))
    assert obs.any()


# ---------------------------------------------------------------- multi-agent envs


def test_nested_multiagent_slots_masks_deaths_and_spawns():
    binding = nested_binding()
    assert binding.possible_agents == ("agent_0", "agent_1", "agent_2", "late")  # sorted, not env order
    env = binding.make_env()
    obs, infos = env.reset(seed=0)
    assert env.masks.tolist() == [True, True, True, False] and infos["agent_0"] == {"spawned": True}
    assert not obs[3].any()
    nested = binding.unflatten_observation(obs)
    # The env lists agents in reverse, so agent_i has env index (2 - i).
    assert nested["self"]["pos"][:3, 0].tolist() == [2, 1, 0]
    # agent_2 starts with 2 hp: it dies at step 2 and is delivered once, then goes dark.
    obs, rewards, terminals, truncations, infos = env.step(flat_actions(binding, move=1, target=2))
    np.testing.assert_allclose(rewards, [1.2, 1.2, 1.2, 0], atol=2e-3)
    obs, rewards, terminals, _, infos = env.step(flat_actions(binding, move=1))
    assert terminals.tolist() == [False, False, True, False] and env.masks[2]
    assert infos["agent_2"]["episode"]["length"] == 2
    assert binding.unflatten_observation(infos["agent_2"]["final_observation"])["self"]["hp"] == 0
    obs, rewards, terminals, _, infos = env.step(flat_actions(binding, move=1))
    assert env.masks.tolist() == [True, True, False, True]  # agent_2 dark, "late" spawned
    assert not obs[2].any() and rewards[2] == 0 and not terminals[2] and "agent_2" not in infos
    assert binding.unflatten_observation(obs[3])["self"]["hp"] == 10


def test_nested_multiagent_episode_end_autoresets_with_final_step_data():
    binding = nested_binding()
    env = started(binding)
    for step in range(6):  # move=4 keeps every agent alive until truncation at 6
        obs, rewards, terminals, truncations, infos = env.step(flat_actions(binding, move=4))
    assert truncations.tolist() == [True, True, True, True] and not terminals.any()
    assert env.masks.all()  # final-step data for all four, next-episode obs for the first three
    assert infos["late"]["episode"]["length"] == 3 and infos["agent_0"]["reset_info"] == {"spawned": True}
    assert not obs[3].any()  # "late" is not in the new episode yet
    assert binding.unflatten_observation(obs)["self"]["pos"][:3, 1].tolist() == [0, 0, 0]
    env.step(flat_actions(binding))
    assert env.masks.tolist() == [True, True, True, False]


def test_knights_archers_zombies_death_is_delivered_once():
    from pettingzoo.butterfly import knights_archers_zombies_v11

    binding = shoal.Binding(env_creator=knights_archers_zombies_v11.parallel_env,
                            env_kwargs=dict(max_zombies=10, spawn_delay=5, max_cycles=600))
    assert binding.possible_agents == ("archer_0", "archer_1", "knight_0", "knight_1")
    env = started(binding)
    rng = np.random.default_rng(0)
    dark_after_death = None
    for _ in range(600):
        was_live = env.masks.copy()
        obs, rewards, terminals, truncations, infos = env.step(rng.integers(0, 6, (4, 1)))
        if dark_after_death is not None:
            slot = dark_after_death
            assert not env.masks[slot] and not obs[slot].any() and rewards[slot] == 0
            break
        ended = terminals & ~truncations
        if ended.any() and not ended.all() and was_live.all():
            slot = int(np.flatnonzero(ended)[0])
            agent = binding.possible_agents[slot]
            assert env.masks[slot] and "final_observation" in infos[agent]
            dark_after_death = slot
    assert dark_after_death is not None, "no agent died mid-episode in 600 steps"


def test_pistonball_continuous_actions_and_truncation():
    from pettingzoo.butterfly import pistonball_v6

    binding = shoal.Binding(env_creator=pistonball_v6.parallel_env, env_kwargs=dict(max_cycles=5))
    assert binding.max_agents == 20 and isinstance(binding.single_action_space, spaces.Box)
    assert binding.possible_agents[:3] == ("piston_0", "piston_1", "piston_2")  # natural order
    assert binding.single_observation_space.dtype == np.uint8
    env = started(binding)
    actions = np.zeros((20, 1), np.float32)
    for _ in range(5):
        obs, rewards, terminals, truncations, infos = env.step(actions)
    assert truncations.all() and env.masks.all() and len(infos) == 20
    assert infos["piston_0"]["final_observation"].shape == (binding.single_observation_space.shape[0],)


# ---------------------------------------------------------------- options and hooks


def test_options_switch_features_off():
    binding = nested_binding(emulate_flat_obs=False, emulate_flat_atn=False, emulate_const_num_agents=False)
    assert binding.single_action_space == ACTION_SPACE
    env = binding.make_env()
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"agent_0", "agent_1", "agent_2"}
    assert obs["agent_1"]["self"]["pos"].tolist() == [1, 0]
    action = {"move": 3, "attack": {"target": -1, "style": np.array([1, 2])}}
    obs, rewards, terminals, truncations, _ = env.step({agent: action for agent in obs})
    assert set(rewards) == {"agent_0", "agent_1", "agent_2"} and abs(rewards["agent_0"] - 2.9) < 2e-3
    with pytest.raises(APIUsageError, match="'ghost', which is not in possible_agents"):
        env.step({"ghost": action})


def test_feature_parser_and_reward_shaper():
    def parse(obs):
        return {"hp": np.array([obs["self"]["hp"]], np.float32), "x": obs["self"]["pos"][:1]}

    def shape(rewards, infos):
        return {agent: reward * 10 + infos[agent]["hp"] for agent, reward in rewards.items()}

    binding = nested_binding(feature_parser=parse, reward_shaper=shape)
    assert binding.single_observation_space.shape == (2,) and binding.single_observation_space.dtype == np.float32
    assert binding.env_observation_space == NestedMultiAgentEnv().observation_space("late")
    env = binding.make_env()
    obs, _ = env.reset(seed=0)
    assert obs[:3].tolist() == [[4, 2], [3, 1], [2, 0]]  # sorted keys: hp, x
    _, rewards, *_ , infos = env.step(flat_actions(binding, move=4))
    np.testing.assert_allclose(rewards[:3], [44, 43, 42], atol=0.1)
    assert infos["agent_0"]["hp"] == 4

    given = spaces.Dict({"hp": spaces.Box(0, 10, (1,), np.float32), "x": spaces.Box(-5, 5, (1,), np.float32)})
    assert nested_binding(feature_parser=parse, feature_space=given).raw_single_observation_space == given
    with pytest.raises(APIUsageError, match=r"^Binding: feature_space must be a gymnasium space \(the featurized "
                                            r"observation's\), got str 'Box\(3\)'$"):
        nested_binding(feature_parser=parse, feature_space="Box(3)")


def test_a_feature_space_is_inferred_from_tensors_and_what_is_no_array_is_named():
    layer = torch.nn.Linear(2, 3)  # its output requires grad: no numpy array without detach()
    with torch.no_grad():
        assert nested_binding(feature_parser=lambda obs: layer(torch.as_tensor(obs["self"]["pos"]))
                              ).raw_single_observation_space == spaces.Box(-np.inf, np.inf, (3,), np.float32)
    half = nested_binding(feature_parser=lambda obs: torch.as_tensor(obs["self"]["pos"]).bfloat16())
    assert half.raw_single_observation_space == spaces.Box(-np.inf, np.inf, (2,), np.float64)  # holds bfloat16 exactly
    for parser, came in ((lambda obs: layer(torch.as_tensor(obs["self"]["pos"])), r"got Tensor: Can't call numpy"),
                         (lambda obs: None, r"feature_parser returned NoneType None \(object data\)"),
                         (lambda obs: {"big": 2**70}, r"feature_parser returned int 1180591620717411303424 "
                                                      r"\(object data\)")):
        with pytest.raises(APIUsageError, match=f"^nested_multiagent_v0: .*{came}.* \\(the featurized observation "
                                                f"space is inferred from its output at reset\\(seed=0\\); pass "
                                                f"feature_space= to give it\\)$"):
            nested_binding(feature_parser=parser)


def test_record_episode_statistics_off():
    binding = shoal.Binding(env_cls=NestedSingleAgentEnv, env_kwargs={"max_steps": 1},
                            record_episode_statistics=False)
    env = binding.make_env()
    env.reset()
    *_, infos = env.step(flat_actions(binding))
    assert "episode" not in infos[0] and "final_observation" in infos[0]


def test_suppress_env_prints_silences_python_and_c_output(capfd):
    loud = shoal.Binding(env_cls=PrintingEnv)
    quiet = shoal.Binding(env_cls=PrintingEnv, suppress_env_prints=True)
    capfd.readouterr()
    env = quiet.make_env()
    env.reset()
    env.step(np.array([[0]]))
    with pytest.raises(RuntimeError, match="on purpose"):
        env.step(np.array([[1]]))
    print("after the failure")
    out, err = capfd.readouterr()
    assert out == "after the failure\n" and err == ""
    loud.make_env().reset()
    out, err = capfd.readouterr()
    assert "python stdout reset" in out and "c stdout reset" in out and "fd stderr reset" in err


def test_suppressed_prints_of_envs_in_several_threads_end_with_the_last_of_them(capfd):
    """One silence for the process (its file descriptors are shared): no thread restores another's."""
    quiet = shoal.Binding(env_cls=PrintingEnv, suppress_env_prints=True)
    stdout, stderr = sys.stdout, sys.stderr
    capfd.readouterr()

    def play(env):
        env.reset()
        for _ in range(200):
            env.step(np.array([[0]]))

    threads = [threading.Thread(target=play, args=(quiet.make_env(),)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sys.stdout is stdout and sys.stderr is stderr
    print("after the threads")
    os.write(2, b"fd 2 after the threads\n")
    assert capfd.readouterr() == ("after the threads\n", "fd 2 after the threads\n")


def test_suppressed_prints_stay_silent_through_a_stream_taken_before_and_with_stdout_closed(tmp_path):
    code = textwrap.dedent("""
        import os, sys
        import numpy as np, gymnasium, shoal
        from gymnasium import spaces
        OUT = sys.stdout  # taken before: its buffered text must not come out after the step

        class Env(gymnasium.Env):
            observation_space = spaces.Box(-1, 1, (1,), np.float32)
            action_space = spaces.Discrete(2)

            def reset(self, seed=None, options=None):
                return np.zeros(1, np.float32), {}

            def step(self, action):
                OUT.write("leaked through OUT\\n")
                print("leaked through sys.__stdout__", file=sys.__stdout__)
                return np.zeros(1, np.float32), 0.0, False, False, {}

        env = shoal.Binding(env_cls=Env, suppress_env_prints=True).make_env()
        env.reset(seed=0)
        env.step(np.array([[0]]))
        print("the program's own line")
        if len(sys.argv) > 1:  # stdout closed: silencing and restoring work all the same
            os.close(1)
            sys.stdout = None
            env.step(np.array([[0]]))
            assert sys.stdout is None
            print("closed stdout done", file=sys.stderr)
    """)
    (tmp_path / "script.py").write_text(code)
    out = subprocess.run([sys.executable, str(tmp_path / "script.py")], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})  # block-buffered
    assert out.returncode == 0 and out.stdout == "the program's own line\n", out
    closed = subprocess.run([sys.executable, str(tmp_path / "script.py"), "close"], capture_output=True, text=True,
                            timeout=120)
    assert closed.returncode == 0 and closed.stderr.endswith("closed stdout done\n"), closed


def test_passthrough_and_buffers():
    binding = nested_binding()
    buffers = Buffers.allocate(binding, num_envs=2)
    rows = Buffers(*(array[4:8] for array in buffers))
    env = binding.make_env(rows)
    assert isinstance(env.env, NestedMultiAgentEnv) and env.env.max_steps == 6
    obs, _ = env.reset(seed=0)
    assert obs is rows.obs and buffers.masks.tolist() == [False] * 4 + [True, True, True, False]
    with pytest.raises(APIUsageError, match=r"buffers.obs must be a writable C-contiguous array of shape \(4, 48\)"):
        binding.make_env(Buffers(*(array[:3] for array in buffers)))
    strided = Buffers(np.zeros((4, 96), np.uint8)[:, ::2], *rows[1:])  # the right shape and dtype, every other byte
    with pytest.raises(APIUsageError, match=r"buffers.obs must be a writable C-contiguous array .* got \(4, 48\) uint8 "
                                            r"\(not C-contiguous\)"):
        binding.make_env(strided)


# ---------------------------------------------------------------- errors users can hit


def test_binding_argument_errors():
    with pytest.raises(APIUsageError, match="exactly one of env_cls or env_creator, got neither"):
        shoal.Binding()
    with pytest.raises(APIUsageError, match="got both"):
        shoal.Binding(env_cls=NestedSingleAgentEnv, env_creator=NestedSingleAgentEnv)
    with pytest.raises(APIUsageError, match="expected a gymnasium.Env or a PettingZoo ParallelEnv/AECEnv"):
        shoal.Binding(env_creator=lambda: object())
    with pytest.raises(APIUsageError, match="feature_parser must be callable"):
        shoal.Binding(env_cls=NestedSingleAgentEnv, feature_parser=3)


class TwoAgents(ParallelEnv):
    """Agents "a" and "b", each seeing one number in [0, 100] and choosing 0 or 1."""

    possible_agents = ["a", "b"]

    def observation_space(self, agent):
        return spaces.Box(0, 100, (1,), np.float32)

    def action_space(self, agent):
        return spaces.Discrete(2)


class RespawningEnv(TwoAgents):
    """Agent "b" dies at step 2, is out of the game at step 3 and respawns at step 4 (same id)."""

    metadata = {"name": "respawning"}

    def __init__(self):
        self.acted = []  # which agents got actions, step by step, over every episode

    def reset(self, seed=None, options=None):
        self.t, self.agents = 0, ["a", "b"]
        return {agent: np.zeros(1, np.float32) for agent in self.agents}, {}

    def step(self, actions):
        self.t += 1
        self.acted.append(sorted(actions))
        current = list(self.agents)
        self.agents = {2: ["a"], 3: ["a"], 4: ["a", "b"]}.get(self.t, self.agents)
        if self.t == 4:  # b is back: it is seen, but did not act this step
            current = ["a", "b"]
        obs = {agent: np.array([self.t * (10 if agent == "b" else 1)], np.float32) for agent in current}
        rewards = {agent: 0.0 if self.t == 4 and agent == "b" else 1.0 for agent in current}
        terminals = {agent: self.t == 2 and agent == "b" for agent in current}
        truncations = {agent: self.t == 6 for agent in current}
        if self.t == 6:
            self.agents = []
        return obs, rewards, terminals, truncations, {}


def test_an_agent_that_respawns_starts_a_new_agent_episode_in_its_slot():
    env = shoal.Binding(env_cls=RespawningEnv).make_env()
    env.reset(seed=0)
    steps, masks = [], []
    for _ in range(6):
        obs, rewards, terminals, truncations, infos = env.step(np.zeros((2, 1), np.int64))
        steps.append((obs.copy(), rewards.copy(), terminals.copy(), truncations.copy(), infos))
        masks.append(env.masks.tolist())
    assert masks[:5] == [[True, True], [True, True], [True, False], [True, True], [True, True]]
    obs = [step[0][:, 0].tolist() for step in steps]
    assert obs[1] == [2, 20] and steps[1][2].tolist() == [False, True]  # b's last obs, with its terminal flag
    assert obs[2] == [3, 0]  # b's slot is dark while b is out of the game
    assert obs[3] == [4, 40] and steps[3][1].tolist() == [1, 0]  # b is back: seen, no reward yet
    assert obs[4] == [5, 50]
    assert env.env.acted == [["a", "b"], ["a", "b"], ["a"], ["a"], ["a", "b"], ["a", "b"]]
    final = steps[5][4]
    assert final["b"]["episode"] == {"return": 2.0, "length": 2}  # its second life: steps 5 and 6
    assert final["a"]["episode"] == {"return": 6.0, "length": 6}


class EndsUnseenEnv(TwoAgents):
    """Agent "b" ends at step 2 (terminated, or truncated) with a reward but without an observation."""

    metadata = {"name": "ends_unseen"}

    def __init__(self, truncate: bool = False):
        self.truncate = truncate

    def reset(self, seed=None, options=None):
        self.t, self.agents = 0, ["a", "b"]
        return {agent: np.ones(1, np.float32) for agent in self.agents}, {}

    def step(self, actions):
        self.t += 1
        ending = self.t == 2
        obs = {agent: np.full(1, self.t, np.float32) for agent in self.agents if not (ending and agent == "b")}
        rewards = {agent: 5.0 if ending and agent == "b" else 1.0 for agent in self.agents}
        terminals = {agent: ending and agent == "b" and not self.truncate for agent in self.agents}
        truncations = {agent: ending and agent == "b" and self.truncate for agent in self.agents}
        if ending:
            self.agents = ["a"]
        return obs, rewards, terminals, truncations, {}


@pytest.mark.parametrize("truncate", [False, True], ids=["terminated", "truncated"])
def test_an_agent_that_ends_without_an_observation_is_still_delivered(truncate):
    env = shoal.Binding(env_cls=EndsUnseenEnv, env_kwargs={"truncate": truncate}).make_env()
    env.reset(seed=0)
    env.step(np.zeros((2, 1), np.int64))
    obs, rewards, terminals, truncations, infos = env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, True] and obs[:, 0].tolist() == [2, 0]  # b: a zero observation
    assert rewards.tolist() == [1, 5]
    assert (terminals.tolist(), truncations.tolist()) == (([False, False], [False, True]) if truncate else
                                                          ([False, True], [False, False]))
    assert infos["b"] == {"episode": {"return": 6.0, "length": 2}}  # no final_observation: the env gave none
    env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, False]


def test_an_agent_listed_twice_in_possible_agents_is_an_error():
    class Twice(TwoAgents):
        metadata = {"name": "twice"}
        possible_agents = ["a", "b", "a"]

    with pytest.raises(EnvError, match="twice: possible_agents names 'a' more than once: expected each agent once"):
        shoal.Binding(env_cls=Twice)


def test_turn_based_aec_env_is_refused_clearly():
    from pettingzoo.classic import tictactoe_v3

    with pytest.raises(APIUsageError, match=r"tictactoe_v3: .* AEC env whose metadata does not set is_parallelizable.* "
                                            r"A turn-based game works wrapped in pettingzoo.utils.conversions."
                                            r"turn_based_aec_to_parallel"):
        shoal.Binding(env_creator=tictactoe_v3.env)
    from pettingzoo.utils.conversions import turn_based_aec_to_parallel

    env = shoal.Binding(env_creator=lambda: turn_based_aec_to_parallel(tictactoe_v3.env())).make_env()
    env.reset(seed=0)
    _, _, terminals, _, _ = env.step(np.array([[4], [0]]))  # only the player whose turn it is plays
    assert not terminals.any() and env.env.unwrapped.board.squares[4] == 1
    from pettingzoo import AECEnv

    class NoMetadata(AECEnv):  # AECEnv only annotates metadata
        possible_agents = ["a"]

    with pytest.raises(APIUsageError, match=r"NoMetadata is a PettingZoo AEC env whose metadata does not set "
                                            r"is_parallelizable"):
        shoal.Binding(env_cls=NoMetadata)


def test_parallelizable_aec_env_is_converted():
    from pettingzoo.classic import rps_v2

    binding = shoal.Binding(env_creator=rps_v2.env)
    env = binding.make_env()
    obs, _ = env.reset(seed=0)
    assert binding.is_multiagent and binding.max_agents == 2 and obs.shape == (2, 1) and env.masks.all()
    _, rewards, _, _, _ = env.step(np.array([[0], [1]]))  # rock against paper
    assert rewards.tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("space", [spaces.Text(5), spaces.Sequence(spaces.Discrete(2)),
                                   spaces.Dict({"ok": spaces.Discrete(2), "bad": spaces.Text(3)})])
def test_unsupported_observation_space(space):
    class TextEnv(NestedSingleAgentEnv):
        observation_space = space

    with pytest.raises(SpaceError, match=r"TextEnv: observation space: (\[.bad.\]: )?unsupported space (Text|Sequence)"):
        shoal.Binding(env_cls=TextEnv)


def test_agents_with_different_spaces_are_refused():
    class Mixed(NestedMultiAgentEnv):
        def action_space(self, agent):
            return spaces.Discrete(3) if agent == "late" else ACTION_SPACE

    with pytest.raises(SpaceError, match="every agent needs the same action_space.*'late' has Discrete\\(3\\); wrap "
                                         "the env so that every agent has one action space"):
        shoal.Binding(env_cls=Mixed)


def test_agents_with_different_observation_spaces_fit_through_a_feature_parser_that_makes_them_one():
    class Uneven(TwoAgents):  # as MPE's simple_adversary: the adversary sees less
        def observation_space(self, agent):
            return spaces.Box(-1, 1, (2 if agent == "a" else 3,), np.float32)

        def reset(self, seed=None, options=None):
            self.agents = ["a", "b"]
            return {agent: np.ones(self.observation_space(agent).shape, np.float32) for agent in self.agents}, {}

        def step(self, actions):
            obs, _ = self.reset()
            return obs, dict.fromkeys(obs, 1.0), dict.fromkeys(obs, False), dict.fromkeys(obs, False), {}

    with pytest.raises(SpaceError, match=r"'b' has Box\(-1.0, 1.0, \(3,\), float32\); give the Binding a "
                                         r"feature_parser \(and its feature_space\) that turns every agent's "
                                         r"observation into one space"):
        shoal.Binding(env_cls=Uneven)
    padded = spaces.Box(-1, 1, (3,), np.float32)
    for feature_space in (padded, None):  # given, or inferred from one parsed observation
        binding = shoal.Binding(env_cls=Uneven, feature_parser=lambda obs: np.pad(obs, (0, 3 - len(obs))),
                                feature_space=feature_space)
        assert binding.env_observation_space is None and binding.single_observation_space.shape == (3,)
        env = binding.make_env()
        assert env.reset(seed=0)[0].tolist() == [[1, 1, 0], [1, 1, 1]]
        assert env.step(np.zeros((2, 1), np.int64))[0].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_action_errors_name_env_agent_and_step():
    binding = nested_binding()
    env = binding.make_env()
    with pytest.raises(APIUsageError, match="step\\(\\) needs reset\\(\\) first"):
        env.step(flat_actions(binding))
    env.reset(seed=0)
    with pytest.raises(APIUsageError, match=r"nested_multiagent_v0, step 1: actions must have shape \(4, 4\).*got \(3, 4\)"):
        env.step(flat_actions(binding)[:3])
    with pytest.raises(APIUsageError, match=r"step 1: MultiDiscrete\(\[2 3 4 5\]\) takes integer actions, got dtype float64"):
        env.step(flat_actions(binding).astype(np.float64))
    with pytest.raises(APIUsageError, match=r"step 1: actions must be one array .* got list: setting an array element"):
        env.step([[0, 0, 0, 0]] * 3 + [[0, 0]])
    bad = flat_actions(binding)
    bad[1, 3] = 5
    with pytest.raises(APIUsageError, match=r"step 1, agent 'agent_1' \(slot 1\): action \[0 0 1 5\] is out of range"):
        env.step(bad)
    bad[1, 3] = 0
    bad[3] = -7  # slot 3 ("late") is not live yet: its action is ignored
    env.step(bad)


def test_continuous_action_out_of_range():
    from pettingzoo.butterfly import pistonball_v6

    env = shoal.Binding(env_creator=pistonball_v6.parallel_env, env_kwargs=dict(max_cycles=5)).make_env()
    env.reset(seed=0)
    actions = np.zeros((20, 1), np.float32)
    actions[7] = np.nan
    with pytest.raises(APIUsageError, match="agent 'piston_7' \\(slot 7\\): action \\[nan\\] is out of range"):
        env.step(actions)


def test_env_returning_observation_outside_its_space():
    env = shoal.Binding(env_cls=BadObservationEnv).make_env()
    env.reset()
    env.step(np.array([[0]]))
    with pytest.raises(EnvError, match=r"BadObservationEnv, agent 0, step 2: observation does not fit "
                                       r"Box\(0.0, 1.0, \(3,\), float32\): .*\[0.5 7.  0.5\] lies outside its "
                                       r"range \[0.0, 1.0\]"):
        env.step(np.array([[0]]))


def test_env_with_the_old_gym_api_gets_a_clear_error():
    class OldStep(BadObservationEnv):
        def step(self, action):
            return super().step(action)[:4]  # (obs, reward, done, info)

    class OldReset(BadObservationEnv):
        def reset(self, seed=None, options=None):
            return np.zeros(3, np.float32)

    env = shoal.Binding(env_cls=OldStep).make_env()
    env.reset()
    with pytest.raises(EnvError, match=r"OldStep, step 1: step\(\) returned a 4-tuple: expected \(observation, "
                                       r"reward, terminated, truncated, info\), the Gymnasium API: an old Gym env"):
        env.step(np.array([[0]]))
    with pytest.raises(EnvError, match=r"OldReset: reset\(\) returned a ndarray: expected \(observation, info\)"):
        shoal.Binding(env_cls=OldReset).make_env().reset()

    class OldPairReset(gymnasium.Env):  # its observation is a pair: only the info tells it from the new API's
        observation_space = spaces.Tuple((spaces.Discrete(4), spaces.Discrete(3)))
        action_space = spaces.Discrete(2)

        def reset(self, seed=None, options=None):
            return 1, 2

    with pytest.raises(EnvError, match=r"^OldPairReset: reset\(\) returned \(int, int\), whose info is no dict: expected "
                                       r"\(observation, info\), the Gymnasium API: an old Gym env \(step returns 4 "
                                       r"values, reset only the observation\) works through shimmy's"):
        shoal.Binding(env_cls=OldPairReset).make_env().reset()

    class GymPackageEnv:  # what the old gym package's envs are, to shoal: no gymnasium.Env
        __module__ = "gym.envs.classic_control.cartpole"

    with pytest.raises(APIUsageError, match=r"the creator returned gym.envs.classic_control.cartpole.GymPackageEnv: "
                                            r"expected a gymnasium.Env or a PettingZoo ParallelEnv/AECEnv: an env of "
                                            r"the old gym package works wrapped in shimmy's GymV21CompatibilityV0 / "
                                            r"GymV26CompatibilityV0 \(pip install shimmy\)$"):
        shoal.Binding(env_cls=GymPackageEnv)


def test_multiagent_env_returning_too_few_values_gets_a_clear_error():
    class FourDicts(NestedMultiAgentEnv):
        def step(self, actions):
            return super().step(actions)[:4]

    env = shoal.Binding(env_cls=FourDicts).make_env()
    env.reset(seed=0)
    with pytest.raises(EnvError, match=r"nested_multiagent_v0, step 1: step\(\) returned a 4-tuple: expected \(observations, "
                                       r"rewards, terminations, truncations, infos\), five dicts keyed by agent"):
        env.step(np.zeros((env.binding.max_agents, env.binding.atn_layout.size), np.int64))


def test_multiagent_observation_outside_its_space_names_the_agent():
    class OneBadAgent(NestedMultiAgentEnv):
        def _obs(self, agent):
            obs = super()._obs(agent)
            if agent == "agent_2" and self.t == 1:
                obs["self"]["pos"] = np.array([2, 500], np.float32)
            return obs

    binding = shoal.Binding(env_cls=OneBadAgent, env_kwargs=dict(num_agents=6))
    env = started(binding)
    with pytest.raises(EnvError, match=r"nested_multiagent_v0, agent 'agent_2', step 1: observation does not fit .*"
                                       r"\['self'\]\['pos'\]: \[  2. 500.\] lies outside its range \[-100.0, 100.0\]"):
        env.step(flat_actions(binding))


def test_env_returning_a_reward_that_is_not_a_number():
    class NoneReward(NestedMultiAgentEnv):
        def step(self, actions):
            obs, rewards, *rest = super().step(actions)
            rewards["agent_1"] = None
            return (obs, rewards, *rest)

    binding = shoal.Binding(env_cls=NoneReward)
    env = started(binding)
    with pytest.raises(EnvError, match="agent 'agent_1', step 1: reward must be a finite number .*, got NoneType None"):
        env.step(flat_actions(binding))

    class TextReward(NestedSingleAgentEnv):
        def step(self, action):
            obs, _, terminal, truncation, info = super().step(action)
            return obs, "one", terminal, truncation, info

    binding = shoal.Binding(env_cls=TextReward)
    env = started(binding)
    with pytest.raises(EnvError, match="agent 0, step 1: reward must be a finite number .*, got str 'one'"):
        env.step(flat_actions(binding))


@pytest.mark.parametrize("reward, shown", [("1.0", "str '1.0'"), (float("nan"), "float nan"),
                                           (np.array([1.0]), r"ndarray array\(\[1.\]\)"),
                                           (float("inf"), "float inf"), (-float("inf"), "float -inf"),
                                           (1e300, r"float 1e\+300"), (np.float64(-1e39), r"float64 -1e\+39"),
                                           (10**400, "int 1000000")])
def test_single_agent_reward_that_numpy_would_accept_is_still_an_error(reward, shown):
    class OddReward(NestedSingleAgentEnv):
        def step(self, action):
            obs, _, terminal, truncation, info = super().step(action)
            return obs, reward, terminal, truncation, info

    binding = shoal.Binding(env_cls=OddReward)
    env = started(binding)
    with pytest.raises(EnvError, match=rf"agent 0, step 1: reward must be a finite number within float32's range "
                                       rf"\(\+-3.403e\+38\), got {shown}"):
        env.step(flat_actions(binding))


@pytest.mark.parametrize("env_cls", [NestedSingleAgentEnv, NestedMultiAgentEnv])
def test_an_int_reward_past_int64_is_a_reward_where_float32_holds_it(env_cls):
    """One rule for every path (the single-agent fast path, per-agent rewards, numpy's object arrays)."""
    for reward, accepted in ((2**70, True), (-(2**70), True), (2**130, False)):
        class BigReward(env_cls):
            def step(self, actions):
                obs, rewards, *rest = super().step(actions)
                return (obs, {agent: reward for agent in rewards} if isinstance(rewards, dict) else reward, *rest)

        env = started(shoal.Binding(env_cls=BigReward))
        if accepted:
            rewards = env.step(flat_actions(env.binding))[1]
            assert rewards[env.masks].tolist() == [float(np.float32(reward))] * int(env.masks.sum())
        else:
            with pytest.raises(EnvError, match=r"reward must be a finite number within float32's range .* got int 1361"):
                env.step(flat_actions(env.binding))


def test_rewards_may_be_numpy_scalars_and_0d_arrays_shaped_or_not():
    class NumpyReward(NestedSingleAgentEnv):
        def step(self, action):
            obs, _, terminal, truncation, info = super().step(action)
            return obs, np.array(2.0, np.float32), terminal, truncation, info

    env = shoal.Binding(env_cls=NumpyReward).make_env()
    env.reset(seed=0)
    assert env.step(flat_actions(env.binding))[1][0] == 2.0
    shaped = shoal.Binding(env_cls=NumpyReward, reward_shaper=lambda rewards, infos: {0: rewards[0] * np.int64(3)})
    env = shaped.make_env()
    env.reset(seed=0)
    assert env.step(flat_actions(shaped))[1][0] == 6.0


@pytest.mark.parametrize("shaped, shown", [(None, "NoneType None"), (float("nan"), "float nan"),
                                           (np.zeros(2), r"ndarray array\(\[0., 0.\]\)")])
@pytest.mark.parametrize("env_cls", [NestedSingleAgentEnv, NestedMultiAgentEnv])
def test_a_reward_shaper_returning_a_bad_reward_is_blamed_not_the_env(env_cls, shaped, shown):
    binding = shoal.Binding(env_cls=env_cls, reward_shaper=lambda rewards, infos: {agent: shaped for agent in rewards})
    env = started(binding)
    with pytest.raises(APIUsageError, match=rf"agent .*, step 1: reward_shaper returned {shown}: expected a finite "
                                            rf"number within float32's range"):
        env.step(flat_actions(binding))


@pytest.mark.parametrize("env_cls", [NestedSingleAgentEnv, NestedMultiAgentEnv])
def test_a_reward_shaper_that_returns_no_dict_is_a_clear_error(env_cls):
    binding = shoal.Binding(env_cls=env_cls, reward_shaper=lambda rewards, infos: sum(rewards.values()))
    env = started(binding)
    with pytest.raises(APIUsageError, match=r"step 1: reward_shaper returned float: expected a dict \{agent_id: reward\} "
                                            r"\(a single-agent env's one agent is 0\)"):
        env.step(flat_actions(binding))


def test_multiagent_env_returning_something_else_than_dicts_is_a_clear_error():
    class ListRewards(NestedMultiAgentEnv):
        def step(self, actions):
            obs, rewards, terminals, truncations, infos = super().step(actions)
            return obs, list(rewards.values()), terminals, truncations, infos

    binding = shoal.Binding(env_cls=ListRewards)
    env = started(binding)
    with pytest.raises(EnvError, match=r"step 1: step\(\) returned \(dict, list, dict, dict, dict\): expected five "
                                       r"dicts keyed by agent"):
        env.step(flat_actions(binding))


def test_dark_slots_hold_zeros_even_where_zero_is_outside_the_space():
    class PositiveObs(TwoAgents):
        metadata = {"name": "positive_v0"}

        def observation_space(self, agent):
            return spaces.Box(1, 5, (2,), np.float32)

        def reset(self, seed=None, options=None):
            self.agents = ["a"]
            return {"a": np.ones(2, np.float32)}, {}

        def step(self, actions):
            return {"a": np.full(2, 3, np.float32)}, {"a": 1.0}, {"a": False}, {"a": False}, {}

    env = shoal.Binding(env_cls=PositiveObs).make_env()
    env.reset()
    obs, *_ = env.step(np.zeros((2, 1), np.int64))
    assert obs.tolist() == [[3, 3], [0, 0]] and env.masks.tolist() == [True, False]


def test_env_returning_observation_of_wrong_shape_or_dtype():
    class WrongShape(BadObservationEnv):
        def __init__(self):
            super().__init__(bad_step=1, bad_value=np.zeros(4, np.float32))

    class WrongDtype(BadObservationEnv):
        def __init__(self):
            super().__init__(bad_step=1, bad_value=np.array(["a", "b", "c"]))

    env = shoal.Binding(env_cls=WrongShape).make_env()
    env.reset()
    with pytest.raises(EnvError, match=r"WrongShape, agent 0, step 1: .*expected shape \(3,\), got \(4,\)"):
        env.step(np.array([[0]]))
    env = shoal.Binding(env_cls=WrongDtype).make_env()
    env.reset()
    with pytest.raises(EnvError, match=r"WrongDtype, agent 0, step 1: .*expected dtype float32, got <U1"):
        env.step(np.array([[0]]))


def test_env_returning_unknown_agent():
    binding = shoal.Binding(env_cls=UnknownAgentEnv)
    env = started(binding)
    with pytest.raises(EnvError, match="step 1: the env returned agent 'intruder', which is not in possible_agents"):
        env.step(flat_actions(binding))


def test_a_long_list_of_agents_in_a_message_keeps_whole_ids_the_last_one_and_the_count():
    class Stranger(NestedMultiAgentEnv):
        def reset(self, seed=None, options=None):
            obs, infos = super().reset(seed, options)
            return {**obs, "stranger": obs["agent_0"]}, infos

    with pytest.raises(EnvError, match=r"returned agent 'stranger', which is not in possible_agents \['agent_0', "
                                       r"'agent_1', .*'agent_\d+', \.\.\., '[a-z_\d]+'\] \(41 items\)$"):
        shoal.Binding(env_cls=Stranger, env_kwargs={"num_agents": 40}).make_env().reset(seed=0)


# ---------------------------------------------------------------- scripted multi-agent edge cases


class ScriptedEnv(TwoAgents):
    """Agents "a" and "b": ``script(t, env)`` returns step t's five dicts and may change ``env.agents``.
    Observations are Box(0, 100, (1,)); the env records which agents got actions."""

    metadata = {"name": "scripted"}

    def __init__(self, script, reset_agents=("a", "b"), obs_dtype=np.float32):
        self.script, self.reset_agents, self.obs_dtype = script, list(reset_agents), obs_dtype
        self.acted = []

    def observation_space(self, agent):
        return spaces.Box(0, 100, (1,), self.obs_dtype)

    def reset(self, seed=None, options=None):
        self.t, self.agents = 0, list(self.reset_agents)
        return {agent: np.zeros(1, self.obs_dtype) for agent in self.agents}, {}

    def step(self, actions):
        self.t += 1
        self.acted.append(sorted(actions))
        self.sent = actions
        return self.script(self.t, self)


def scripted(script, **kwargs):
    env = shoal.Binding(env_creator=ScriptedEnv, env_args=(script,), env_kwargs=kwargs).make_env()
    env.reset(seed=0)
    return env


def all_end_unseen(t, env):
    env.agents = []
    return {}, {"a": 1.0, "b": 2.0}, {"a": True, "b": False}, {"a": False, "b": True}, {}


def test_every_agent_ending_at_once_without_observations_is_delivered_then_reset():
    env = scripted(all_end_unseen)
    obs, rewards, terminals, truncations, infos = env.step(np.zeros((2, 1), np.int64))
    assert rewards.tolist() == [1, 2] and terminals.tolist() == [True, False] and truncations.tolist() == [False, True]
    assert env.masks.tolist() == [True, True] and obs.tolist() == [[0], [0]]  # the next episode's first observations
    assert infos["a"]["episode"] == {"return": 1.0, "length": 1} and "final_observation" not in infos["b"]


def test_an_agent_in_env_agents_that_is_not_in_possible_agents_is_named():
    def intruder(t, env):
        env.agents = ["a", "b", "zz"]
        return ({agent: np.ones(1, np.float32) for agent in ("a", "b")}, {"a": 0.0, "b": 0.0},
                {"a": False, "b": False}, {"a": False, "b": False}, {})

    env = scripted(intruder)
    env.step(np.zeros((2, 1), np.int64))
    with pytest.raises(EnvError, match=r"scripted, step 1: the env lists in env.agents agent 'zz', which is not in "
                                       r"possible_agents \['a', 'b'\]"):
        env.step(np.zeros((2, 1), np.int64))


def test_agents_may_return_integer_observations_of_different_integer_dtypes():
    def mixed(t, env):
        obs = {"a": np.array([1], np.int64), "b": np.array([3], np.uint64)}
        return obs, {"a": 0.0, "b": 0.0}, {"a": False, "b": False}, {"a": False, "b": False}, {}

    env = scripted(mixed, obs_dtype=np.int64)
    obs, *_ = env.step(np.zeros((2, 1), np.int64))
    assert obs.tolist() == [[1], [3]] and obs.dtype == np.int64


def test_a_reward_shaper_editing_its_input_does_not_change_the_episode_statistics():
    def shaper(rewards, infos):
        for agent in rewards:
            rewards[agent] *= 10
        return rewards

    binding = shoal.Binding(env_creator=ScriptedEnv, env_args=(all_end_unseen,), reward_shaper=shaper)
    env = binding.make_env()
    env.reset(seed=0)
    _, rewards, *_, infos = env.step(np.zeros((2, 1), np.int64))
    assert rewards.tolist() == [10, 20] and infos["a"]["episode"]["return"] == 1.0


def test_an_info_that_is_not_a_dict_is_named():
    def text_info(t, env):
        return ({"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)}, {"a": 0.0, "b": 0.0},
                {"a": False, "b": False}, {"a": False, "b": False}, {"b": "done"})

    env = scripted(text_info)
    with pytest.raises(EnvError, match="scripted, agent 'b', step 1: info must be a dict, got str 'done'"):
        env.step(np.zeros((2, 1), np.int64))

    class EmptyListInfo(SecondResetFails):  # an empty non-dict is no dict either (it passed as "no infos")
        def step(self, action):
            return *super().step(action)[:4], []

    for shaper in (None, lambda rewards, infos: rewards):  # the env's, not blamed on a shaper that passes it on
        env = shoal.Binding(env_cls=EmptyListInfo, reward_shaper=shaper).make_env()
        env.reset(seed=0)
        with pytest.raises(EnvError, match=r"info must be a dict, got list \[\]"):
            env.step([[0]])
    binding = shoal.Binding(env_creator=ScriptedEnv, env_args=(text_info,), reward_shaper=lambda rewards, infos: rewards)
    with pytest.raises(EnvError, match="scripted, agent 'b', step 1: info must be a dict, got str 'done'"):
        started(binding).step(np.zeros((2, 1), np.int64))


def test_an_agent_that_comes_back_the_step_after_it_ended_starts_a_new_agent_episode():
    def back_at_once(t, env):
        agents = ["a", "b"]
        env.agents = ["a"] if t == 1 else agents
        obs = {agent: np.full(1, t, np.float32) for agent in agents}
        return obs, {"a": 1.0, "b": 1.0}, {"a": False, "b": t == 1}, {"a": False, "b": False}, {}

    env = scripted(back_at_once)
    env.step(np.zeros((2, 1), np.int64))
    env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, True] and env.env.acted == [["a", "b"], ["a"]]
    env.env.agents = ["a", "b"]
    env.step(np.zeros((2, 1), np.int64))
    assert env._episode_length.tolist() == [3, 1]  # b's second life: only the step it acted in


def test_feature_parser_output_space_is_inferred_for_bools_and_needs_agents_at_reset():
    binding = shoal.Binding(env_creator=ScriptedEnv, env_args=(all_end_unseen,), feature_parser=lambda obs: obs > 0)
    assert binding.raw_single_observation_space == spaces.Box(0, 1, (1,), bool)
    with pytest.raises(EnvError, match=r"reset\(seed=0\) returned no observations, so the feature_parser's output "
                                       r"space cannot be inferred: pass feature_space="):
        shoal.Binding(env_creator=ScriptedEnv, env_args=(all_end_unseen,), env_kwargs={"reset_agents": ()},
                      feature_parser=lambda obs: obs)


def test_an_env_without_spaces_or_with_an_empty_feature_space_is_refused():
    class NoSpaces(gymnasium.Env):
        def reset(self, seed=None, options=None):
            return np.zeros(2), {}

    with pytest.raises(EnvError, match="NoSpaces: observation_space and action_space must be gymnasium spaces, got "
                                       "NoneType and NoneType"):
        shoal.Binding(env_cls=NoSpaces)
    with pytest.raises(SpaceError, match=r"space Dict\(\) has no leaves"):
        shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",), feature_parser=lambda obs: {},
                      feature_space=spaces.Dict({}))


def test_an_agent_listed_before_it_is_seen_gets_a_neutral_action_for_an_invalid_one():
    # "b" is in env.agents from the start but has no observation: its slot is dark, so its row is not
    # the caller's to check (a vec env ignores dead slots' actions): shoal sends the env a valid one.
    def late(t, env):
        return ({"a": np.ones(1, np.float32)}, {"a": 0.0}, {"a": False}, {"a": False}, {})

    class LateEnv(ScriptedEnv):
        def reset(self, seed=None, options=None):
            obs, infos = super().reset(seed, options)
            return {"a": obs["a"]}, infos

    env = shoal.Binding(env_creator=LateEnv, env_args=(late,)).make_env()
    env.reset(seed=0)
    assert env.masks.tolist() == [True, False]
    env.step(np.array([[1], [7]]))
    assert {agent: int(action) for agent, action in env.env.sent.items()} == {"a": 1, "b": 0}
    with pytest.raises(APIUsageError, match="agent 'a' \\(slot 0\\): action \\[7\\] is out of range"):
        env.step(np.array([[7], [0]]))


def test_binding_and_env_arguments_of_the_wrong_kind_are_named():
    with pytest.raises(APIUsageError, match="env_kwargs must be a dict of keyword arguments, got list"):
        shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",), env_kwargs=[1])
    with pytest.raises(APIUsageError, match="emulate_flat_atn must be True or False, got None"):
        shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",), emulate_flat_atn=None)
    with pytest.raises(APIUsageError, match="EmulatedEnv needs a shoal.Binding, got TimeLimit"):
        shoal.EmulatedEnv(gymnasium.make("CartPole-v1"))
    binding = shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",))
    with pytest.raises(APIUsageError, match="num_envs must be a positive int, got -1"):
        Buffers.allocate(binding, -1)
    for seed in (True, -1, 2.0):
        with pytest.raises(APIUsageError, match=f"CartPole-v1: seed must be an int >= 0, got {seed}"):
            binding.make_env().reset(seed=seed)


@pytest.mark.parametrize("flag", ["False", None, 2.5, np.array([True, False])])
def test_a_flag_that_is_not_a_bool_is_named(flag):
    def flagged(t, env):
        obs = {agent: np.ones(1, np.float32) for agent in ("a", "b")}
        return obs, {"a": 0.0, "b": 0.0}, {"a": False, "b": flag}, {"a": False, "b": False}, {}

    env = scripted(flagged)
    with pytest.raises(EnvError, match="scripted, agent 'b', step 1: terminated must be a bool, got"):
        env.step(np.zeros((2, 1), np.int64))


def test_a_reward_shaper_rewarding_an_unknown_agent_is_named():
    binding = shoal.Binding(env_creator=ScriptedEnv, env_args=(all_end_unseen,),
                            reward_shaper=lambda rewards, infos: {"nobody": 1.0})
    env = binding.make_env()
    env.reset(seed=0)
    with pytest.raises(APIUsageError, match="reward_shaper returned a reward for agent 'nobody', which is not in possible_agents"):
        env.step(np.zeros((2, 1), np.int64))

    def team_info(rewards, infos):  # infos of an id the trainer has no slot for
        infos["team"] = {"score": 1}
        return rewards

    def text_info(rewards, infos):
        infos["a"] = "scored"
        return rewards

    for shaper, message in ((team_info, "reward_shaper added infos for agent 'team', which is not in possible_agents"),
                            (text_info, "agent 'a', step 1: reward_shaper made its info str 'scored': expected a dict")):
        env = shoal.Binding(env_creator=ScriptedEnv, env_args=(all_end_unseen,), reward_shaper=shaper).make_env()
        env.reset(seed=0)
        with pytest.raises(APIUsageError, match=message):
            env.step(np.zeros((2, 1), np.int64))
    single = shoal.Binding(env_cls=NestedSingleAgentEnv, reward_shaper=team_info)
    with pytest.raises(APIUsageError, match=r"reward_shaper added infos for agent 'team', which is not in "
                                            r"possible_agents \[0\]"):
        started(single).step(flat_actions(single))


def test_an_empty_dict_in_the_observation_space_and_an_env_info_named_like_shoals_keys():
    class EmptyDictEnv(ScriptedEnv):
        def observation_space(self, agent):
            return spaces.Dict({"x": spaces.Discrete(2), "y": spaces.Dict({})})

        def reset(self, seed=None, options=None):
            self.t, self.agents = 0, ["a", "b"]
            return {agent: {"x": 1, "y": {}} for agent in self.agents}, {}

    env = shoal.Binding(env_creator=EmptyDictEnv, env_args=(all_end_unseen,)).make_env()
    assert env.reset(seed=0)[0].tolist() == [[1], [1]]

    def ends_unseen_with_its_own_key(t, env):
        env.agents = []
        return {}, {"a": 1.0, "b": 1.0}, {"a": True, "b": True}, {"a": False, "b": False}, {
            "a": {"final_observation": "the env's own", "kept": 1}}

    _, _, _, _, infos = scripted(ends_unseen_with_its_own_key).step(np.zeros((2, 1), np.int64))
    assert "final_observation" not in infos["a"] and infos["a"]["kept"] == 1


@pytest.mark.parametrize("key", ["final_observation", "episode"])
def test_an_env_info_named_like_shoals_keys_is_dropped_when_it_is_the_ending_agents_only_info(key):
    def b_appears_ending_unseen(t, env):  # b never acted, has no observation: shoal has nothing to add
        env.agents = ["a", "b"]
        return {"a": np.ones(1, np.float32)}, {"a": 0.0, "b": 1.0}, {"a": False, "b": True}, {"a": False, "b": False}, {
            "b": {key: "the env's own"}}

    env = scripted(b_appears_ending_unseen, reset_agents=("a",))
    _, rewards, terminals, _, infos = env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, True] and terminals.tolist() == [False, True] and rewards.tolist() == [0, 1]
    assert "b" not in infos


def test_a_value_that_is_no_array_is_named_in_shape_errors():
    binding = shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",))
    with pytest.raises(SpaceError, match=r"expected shape \(4,\), got \(\) \(NoneType None\)$"):
        binding.flatten_observation(None)
    env = binding.make_env()
    env.reset(seed=0)
    with pytest.raises(APIUsageError, match=r"actions must have shape \(1, 1\) \(max_agents, action size\), got \(\) "
                                            r"\(str '0'\)$"):
        env.step("0")


def test_an_empty_multidiscrete_action_leaf_steps_alone_and_beside_other_leaves():
    seen = []

    class EmptyActionEnv(gymnasium.Env):
        observation_space = spaces.Box(-1, 1, (2,), np.float32)

        def __init__(self, action_space):
            self.action_space = action_space

        def reset(self, seed=None, options=None):
            return np.zeros(2, np.float32), {}

        def step(self, action):
            seen.append(action)
            return np.zeros(2, np.float32), 0.0, False, False, {}

    alone = shoal.Binding(env_cls=EmptyActionEnv, env_args=(spaces.MultiDiscrete(np.array([], np.int64)),))
    assert alone.single_action_space == spaces.MultiDiscrete(np.array([], np.int64))
    env = alone.make_env()
    env.reset(seed=0)
    env.step(np.zeros((1, 0), np.int64))
    assert seen.pop().shape == (0,)
    beside = shoal.Binding(env_cls=EmptyActionEnv, env_args=(spaces.Dict({
        "none": spaces.MultiDiscrete(np.array([], np.int64)), "move": spaces.Discrete(3)}),))
    env = beside.make_env()
    env.reset(seed=0)
    env.step(np.array([[2]]))
    action = seen.pop()
    assert action["move"] == 2 and action["none"].shape == (0,)


def test_an_agent_that_ended_at_an_autoreset_and_spawns_in_the_next_episode_has_not_acted_yet():
    def spawn_then_end(t, env):  # each episode: "b" appears at step 1, everyone ends at step 2
        agents = ["a", "b"]
        env.agents = agents if t == 1 else []
        obs = {agent: np.full(1, t, np.float32) for agent in agents}
        done = {agent: t == 2 for agent in agents}
        return obs, {"a": 1.0, "b": 1.0}, done, {agent: False for agent in agents}, {}

    env = scripted(spawn_then_end, reset_agents=("a",))
    lengths = []
    for _ in range(4):
        *_, infos = env.step(np.zeros((2, 1), np.int64))
        lengths += [infos[agent]["episode"]["length"] for agent in ("a", "b") if "episode" in infos.get(agent, {})]
    assert lengths == [2, 1, 2, 1]  # b acts at step 2 only, in both episodes


def steady(t, env):
    """Both agents seen with reward 1 at every step, no ends."""
    obs = {agent: np.full(1, t, np.float32) for agent in ("a", "b")}
    return obs, {"a": 1.0, "b": 1.0}, {"a": False, "b": False}, {"a": False, "b": False}, {}


def test_a_reward_for_a_listed_agent_without_an_observation_counts_in_its_episode_statistics():
    def unobserved_reward(t, env):  # b is listed throughout, unseen at step 1 yet rewarded 5; both end at step 2
        seen = ("a",) if t == 1 else ("a", "b")
        obs = {agent: np.full(1, t, np.float32) for agent in seen}
        return obs, {"a": 1.0, "b": 5.0 if t == 1 else 1.0}, {"a": t == 2, "b": t == 2}, {"a": False, "b": False}, {}

    env = scripted(unobserved_reward)
    _, rewards, *_ = env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, False] and rewards.tolist() == [1, 0]  # no observation: no transition
    *_, infos = env.step(np.zeros((2, 1), np.int64))
    assert infos["b"]["episode"] == {"return": 6.0, "length": 2} and infos["a"]["episode"]["return"] == 2.0


def test_an_agent_listed_again_before_it_is_seen_respawns_and_gets_the_neutral_action():
    def listed_first(t, env):  # b ends at step 1 and leaves, is listed again at step 2, seen from step 3
        env.agents = ["a"] if t == 1 else ["a", "b"]
        seen = ("a",) if t == 2 else ("a", "b")
        obs = {agent: np.full(1, t, np.float32) for agent in seen}
        ends = {"a": t == 4, "b": t in (1, 4)}
        return obs, {agent: 1.0 for agent in seen}, ends, {"a": False, "b": False}, {}

    env = scripted(listed_first)
    env.step(np.zeros((2, 1), np.int64))
    env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, False]
    env.step(np.array([[1], [7]]))  # b's slot is dark: its invalid row becomes the neutral action
    assert {agent: int(action) for agent, action in env.env.sent.items()} == {"a": 1, "b": 0}
    assert env.masks.tolist() == [True, True]
    *_, infos = env.step(np.zeros((2, 1), np.int64))
    assert env.env.acted == [["a", "b"], ["a"], ["a", "b"], ["a", "b"]]
    assert infos["b"]["episode"] == {"return": 2.0, "length": 2}  # its second life: steps 3 and 4


def test_a_numpy_seed_reaches_the_env_as_a_python_int():
    binding = shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",))
    first = binding.make_env().reset(seed=np.int64(3))[0].copy()
    assert first.tolist() == binding.make_env().reset(seed=3)[0].tolist()

    class SeedRecorder(ScriptedEnv):
        def reset(self, seed=None, options=None):
            self.seed = seed
            return super().reset(seed, options)

    env = shoal.Binding(env_creator=SeedRecorder, env_args=(steady,)).make_env()
    env.reset(seed=np.uint32(3))
    assert type(env.env.seed) is int and env.env.seed == 3


@pytest.mark.parametrize("what", ["observations", "infos"])
def test_a_multiagent_reset_returning_something_else_than_dicts_is_a_clear_error(what):
    class ListReset(ScriptedEnv):
        def reset(self, seed=None, options=None):
            obs, infos = super().reset(seed, options)
            return (list(obs.values()), infos) if what == "observations" else (obs, [{}, {}])

    env = shoal.Binding(env_creator=ListReset, env_args=(steady,)).make_env()
    with pytest.raises(EnvError, match=rf"scripted: reset\(\) returned {what} of type list: expected a dict keyed by "
                                       rf"agent, the PettingZoo Parallel API"):
        env.reset(seed=0)


def test_raw_actions_are_checked_against_the_raw_space_and_passed_on_unchanged():
    env = shoal.Binding(env_creator=ScriptedEnv, env_args=(steady,), emulate_flat_atn=False).make_env()
    env.reset(seed=0)
    with pytest.raises(APIUsageError, match=r"scripted, step 1: no action for agent 'b': expected one for every agent "
                                            r"with mask True that has not ended, got actions for \['a'\]"):
        env.step({"a": 1})
    with pytest.raises(APIUsageError, match=r"scripted, agent 'a', step 1: raw action does not fit the action space "
                                            r"Discrete\(2\): action leaf \(the whole space\): expected values from "
                                            r"\[0\] to \[1\], got 7"):
        env.step({"a": 7, "b": 0})
    with pytest.raises(APIUsageError, match=r"agent 'b', step 1: raw action .*: expected integers \(its dtype is "
                                            r"int64\), got <U1"):
        env.step({"a": 1, "b": "x"})
    with pytest.raises(APIUsageError, match=r"agent 'a', step 1: raw action .*: expected one action, got a batch"):
        env.step({"a": np.array([0, 1]), "b": 0})
    action = np.int64(1)
    env.step({"a": action, "b": 0})
    assert env.env.sent["a"] is action and env.env.acted == [["a", "b"]]

    cartpole = shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",), emulate_flat_atn=False).make_env()
    cartpole.reset(seed=0)
    with pytest.raises(APIUsageError, match=r"CartPole-v1, agent 0, step 1: raw action does not fit the action space "
                                            r"Discrete\(2\)"):
        cartpole.step(2)


def test_raw_actions_of_a_space_mixing_discrete_and_box_leaves_are_checked_leaf_by_leaf():
    """No flat layout holds such a space; its raw actions get the checks of every other space, naming the leaf."""
    space = spaces.Dict({"c": spaces.Box(-1, 1, (2,), np.float32), "d": spaces.Discrete(3)})

    class Mixed(gymnasium.Env):
        observation_space = spaces.Box(-1, 1, (2,), np.float32)
        action_space = space

        def reset(self, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(2, np.float32), {}

        def step(self, action):
            self.sent = action
            return np.zeros(2, np.float32), 0.0, False, False, {}

    env = shoal.Binding(env_cls=Mixed, emulate_flat_atn=False).make_env()
    env.reset(seed=0)
    for action in ({"c": np.array([0.5, -0.5]), "d": 2}, {"c": [0.5, 0.5], "d": np.int64(0)}):  # float64 fits too
        env.step(action)
        assert env.env.sent is action
    for action, problem in (({"c": np.zeros(2, np.float32), "d": 3}, r"action leaf \['d'\]: expected values from "
                                                                      r"\[0\] to \[2\], got 3"),
                            ({"c": np.array([5.0, 0.0]), "d": 0}, r"action leaf \['c'\]: action \[5. 0.\] lies "
                                                                   r"outside the action space"),
                            ({"c": np.zeros(2), "d": 0.5}, r"action leaf \['d'\]: expected integers"),
                            ({"c": np.zeros(2), "e": 0}, r"value has no entry 'd': expected the structure of "
                                                          r"Dict.*got dict"),
                            ([np.zeros(2), 0], r"value has no entry 'c': expected the structure of Dict.*got list"),
                            ({"c": np.zeros(2), "d": 0, "e": 0}, r"entries"),
                            ({"c": np.zeros((3, 2)), "d": 0}, r"action leaf \['c'\]: expected one action")):
        with pytest.raises(APIUsageError, match=r"agent 0, step \d+: raw action does not fit the action space .*"
                                                + problem):
            env.step(action)


def test_an_unseen_agent_gets_the_neutral_raw_action_when_the_caller_gives_none():
    class LateEnv(ScriptedEnv):  # b is listed from the start, never seen
        def reset(self, seed=None, options=None):
            obs, infos = super().reset(seed, options)
            return {"a": obs["a"]}, infos

    def late(t, env):
        return {"a": np.ones(1, np.float32)}, {"a": 0.0}, {"a": False}, {"a": False}, {}

    env = shoal.Binding(env_creator=LateEnv, env_args=(late,), emulate_flat_atn=False).make_env()
    env.reset(seed=0)
    env.step({"a": 1})
    assert {agent: int(action) for agent, action in env.env.sent.items()} == {"a": 1, "b": 0}


def test_an_agent_that_ended_with_the_episode_and_is_dark_in_the_next_gets_the_neutral_raw_action():
    class DarkAfterReset(ScriptedEnv):  # each episode lists both, shows only a at reset
        def reset(self, seed=None, options=None):
            obs, infos = super().reset(seed, options)
            return {"a": obs["a"]}, infos

    def all_end(t, env):
        env.agents = []
        return {"a": np.ones(1, np.float32)}, {"a": 0.0, "b": 0.0}, {"a": True, "b": True}, {"a": False, "b": False}, {}

    env = shoal.Binding(env_creator=DarkAfterReset, env_args=(all_end,), emulate_flat_atn=False).make_env()
    env.reset(seed=0)
    env.step({"a": 1})  # both end (mask True with their flags); the next episode shows a only
    assert env.masks.tolist() == [True, True]
    env.step({"a": 1})  # b ended, and is dark now: it needs no action (it was an APIUsageError)
    assert {agent: int(action) for agent, action in env.env.sent.items()} == {"a": 1, "b": 0}


def test_an_agent_that_leaves_env_agents_without_a_flag_is_truncated_there():
    def dropped(t, env):  # b leaves unflagged at step 2 (seen) and step 4 (unseen); listed again at step 3
        env.agents = ["a"] if t in (2, 4, 5) else ["a", "b"]
        seen = ("a",) if t >= 4 else ("a", "b")
        obs = {agent: np.full(1, t, np.float32) for agent in seen}
        return obs, {"a": 1.0, "b": 1.0}, {"a": False, "b": False}, {"a": False, "b": False}, {}

    env = scripted(dropped)
    env.step(np.zeros((2, 1), np.int64))
    obs, _, terminals, truncations, infos = env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, True] and terminals.tolist() == [False, False]
    assert truncations.tolist() == [False, True] and infos["b"]["final_observation"].tolist() == [2]
    assert infos["b"]["episode"] == {"return": 2.0, "length": 2}
    env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, True]  # listed and seen again: a new life, which has not acted yet
    obs, rewards, _, truncations, infos = env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, True] and obs[1].tolist() == [0] and truncations.tolist() == [False, True]
    assert infos["b"] == {"episode": {"return": 1.0, "length": 1}}  # no observation: no final_observation
    env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, False] and env.env.acted[-1] == ["a"]


class AttributeSpaces(TwoAgents):
    metadata = {"name": "attribute_spaces"}
    observation_space = spaces.Box(0, 1, (2,), np.float32)


class ShapeForSpace(TwoAgents):
    metadata = {"name": "shape_for_space"}

    def action_space(self, agent):
        return (2,)


class NoPossibleAgents(TwoAgents):
    metadata = {"name": "no_possible_agents"}
    possible_agents = None


class ListIds(TwoAgents):
    metadata = {"name": "list_ids"}
    possible_agents = [["a"], ["b"]]


@pytest.mark.parametrize("env_cls, message", [
    (AttributeSpaces, r"attribute_spaces: observation_space must be a method observation_space\(agent\) -> gymnasium "
                      r"space, the PettingZoo API, got Box"),
    (ShapeForSpace, r"shape_for_space: action_space\('a'\) must return a gymnasium space, got tuple \(2,\)"),
    (NoPossibleAgents, r"no_possible_agents: possible_agents must be a list of agent ids, set when the env is built "
                       r"\(shoal reads it before the first reset\), got NoneType None"),
    (ListIds, r"list_ids: possible_agents holds list \['a'\]: expected hashable agent ids"),
])
def test_a_parallel_env_with_spaces_or_possible_agents_of_the_wrong_kind_is_named(env_cls, message):
    with pytest.raises(EnvError, match=message):
        shoal.Binding(env_cls=env_cls)


@pytest.mark.parametrize("index, what", [(1, "a reward"), (2, "terminated"), (3, "truncated"), (4, "infos")])
def test_rewards_flags_and_infos_for_an_agent_not_in_possible_agents_are_named(index, what):
    def intruder(t, env):
        result = list(steady(t, env))
        result[index] = {**result[index], "zz": {} if what == "infos" else 0}
        return tuple(result)

    with pytest.raises(EnvError, match=rf"scripted, step 1: the env returned {what} for agent 'zz', which is not in "
                                       rf"possible_agents \['a', 'b'\]"):
        scripted(intruder).step(np.zeros((2, 1), np.int64))


def test_reset_infos_for_an_agent_not_in_possible_agents_are_named():
    class IntruderInfos(ScriptedEnv):
        def reset(self, seed=None, options=None):
            obs, _ = super().reset(seed, options)
            return obs, {"a": {}, "zz": {"r": 1}}

    env = shoal.Binding(env_creator=IntruderInfos, env_args=(steady,)).make_env()
    with pytest.raises(EnvError, match=r"scripted, step 0: the env returned reset infos for agent 'zz', which is not "
                                       r"in possible_agents"):
        env.reset(seed=0)


def test_a_multiagent_reward_beyond_float32_or_infinite_is_named():
    def huge(t, env):
        obs, rewards, *rest = steady(t, env)
        return (obs, {**rewards, "b": 1e300}, *rest)

    with pytest.raises(EnvError, match=r"scripted, agent 'b', step 1: reward must be a finite number within float32's "
                                       r"range \(\+-3.403e\+38\), got float 1e\+300"):
        scripted(huge).step(np.zeros((2, 1), np.int64))


def test_a_feature_space_without_a_feature_parser_is_refused():
    with pytest.raises(APIUsageError, match=r"Binding: feature_space Box\(0.0, 1.0, \(8,\), float32\) needs a "
                                            r"feature_parser"):
        shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",),
                      feature_space=spaces.Box(0, 1, (8,), np.float32))


def test_a_ragged_observation_of_one_agent_is_named():
    def ragged(t, env):
        obs, *rest = steady(t, env)
        return ({**obs, "b": [[1.0], 2.0]}, *rest)

    with pytest.raises(EnvError, match=r"scripted, agent 'b', step 1: observation does not fit .*: observation leaf "
                                       r"\(the whole space\) must be one array .* got list: setting an array element"):
        scripted(ragged).step(np.zeros((2, 1), np.int64))


def test_at_an_autoreset_each_agent_of_the_new_episode_has_reset_info_and_dark_agents_keep_their_infos():
    binding = shoal.Binding(env_cls=ScriptedLives, env_kwargs=dict(
        reset=(("a",), ("a",)), script=[(("a", "b"), (), ("a", "b")), (("a",), (), ("a", "b")),
                                        (("a", "b"), ("a", "b"), ())]))
    env = binding.make_env()
    env.reset(seed=0)
    env.step(np.zeros((2, 1), np.int64))
    _, _, _, _, infos = env.step(np.zeros((2, 1), np.int64))  # "b" is listed but not shown: dark
    assert env.masks.tolist() == [True, False] and infos["b"] == {"step": 2}
    _, _, terminals, _, infos = env.step(np.zeros((2, 1), np.int64))  # both end; the next episode has only "a"
    assert terminals.tolist() == [True, True] and env.masks.tolist() == [True, True]
    assert infos["a"]["reset_info"] == {} and "reset_info" not in infos["b"]  # "a"'s obs is the new episode's
    single = shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",)).make_env()
    single.reset(seed=0)
    while True:
        _, _, terminals, truncations, infos = single.step(np.zeros((1, 1), np.int64))
        if terminals[0] or truncations[0]:
            assert infos[0]["reset_info"] == {}
            break


def test_env_agents_that_is_not_a_list_is_named():
    binding = shoal.Binding(env_cls=ScriptedLives, env_kwargs=dict(script=[(("a", "b"), (), ("a", "b"))] * 3))
    env = binding.make_env()
    env.reset(seed=0)
    env.env.unwrapped.agents = None
    with pytest.raises(EnvError, match="step 0: env.agents must be a list of agent ids, got NoneType None"):
        env.step(np.zeros((2, 1), np.int64))


def test_an_env_info_named_reset_info_does_not_pass_for_a_reset():
    binding = shoal.Binding(env_cls=ScriptedLives, env_kwargs=dict(script=[(("a", "b"), (), ("a", "b"))] * 3))
    env = binding.make_env()
    env.reset(seed=0)
    env.env.unwrapped.step = lambda actions: ({"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)},
                                              {"a": 0.0, "b": 0.0}, {}, {}, {"a": {"reset_info": 1, "hp": 3}})
    _, _, _, _, infos = env.step(np.zeros((2, 1), np.int64))
    assert infos == {"a": {"hp": 3}}


def test_a_closed_env_refuses_reset_step_and_render_and_closes_once():
    class Counted(NestedSingleAgentEnv):
        closes = 0

        def close(self):
            type(self).closes += 1

    for binding in (shoal.Binding(env_cls=Counted), nested_binding()):
        env = started(binding)
        env.close()
        env.close()
        name = binding.env_name
        actions = np.zeros((binding.max_agents, binding.atn_layout.size), np.int64)
        for call, message in ((lambda: env.step(actions), "step"), (lambda: env.reset(seed=0), "reset"),
                              (env.render, "render")):
            with pytest.raises(APIUsageError, match=rf"{name}: {message}\(\) on a closed EmulatedEnv: make a new "
                                                    rf"one with binding.make_env\(\)"):
                call()
    assert Counted.closes == 2  # the Binding's probe env, then the emulated env's: closing again did nothing


def test_a_dict_of_actions_for_flat_actions_says_a_dict_came_and_how_to_pass_raw_actions():
    binding = nested_binding()
    env = started(binding)
    action = {"move": 0, "attack": {"target": 0, "style": np.zeros(2, np.int64)}}
    with pytest.raises(APIUsageError, match=r"nested_multiagent_v0, step 1: actions came as a dict with keys "
                                            r"\['agent_0', .*\]: with emulate_flat_atn=True, step takes one array of "
                                            r"shape \(4, 4\) \(max_agents, action size\).* to pass a dict of raw "
                                            r"actions by agent id, build the Binding with emulate_flat_atn=False"):
        env.step({agent: action for agent in binding.possible_agents})
    single = started(shoal.Binding(env_cls=NestedSingleAgentEnv))
    with pytest.raises(APIUsageError, match=r"NestedSingleAgentEnv, step 1: actions came as a dict with keys "
                                            r"\['move', 'attack'\]: .* to pass the raw action, build the Binding "
                                            r"with emulate_flat_atn=False"):
        single.step(action)
    cartpole = started(shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",)))
    with pytest.raises(APIUsageError, match=r"CartPole-v1, step 1: actions came as dicts: .* to pass the raw action"):
        cartpole.step([{0: 1}])


def test_an_env_whose_close_raises_is_named_when_the_binding_probes_it():
    class BadClose(BadObservationEnv):
        def close(self):
            raise RuntimeError("the server is gone")

    with pytest.raises(EnvError, match=r"BadClose: close\(\) of the env built to read its spaces raised "
                                       r"RuntimeError: the server is gone"):
        shoal.Binding(env_cls=BadClose)


def test_an_env_whose_reset_takes_no_seed_or_options_gets_a_clear_error():
    class NoSeed(BadObservationEnv):
        def reset(self):
            return np.zeros(3, np.float32), {}

    class NoOptions(BadObservationEnv):
        def reset(self, seed=None):
            return np.zeros(3, np.float32), {}

    class NoSeedParallel(TwoAgents):
        def reset(self):
            return {}, {}

    class OwnTypeError(BadObservationEnv):  # the env's own bug: its TypeError goes on unchanged
        def reset(self, seed=None, options=None):
            return self.helper(seed=seed)

        def helper(self):
            pass

    with pytest.raises(EnvError, match=r"NoSeed: NoSeed.reset\(\) cannot take seed= and options= \(.*unexpected "
                                       r"keyword argument 'seed'\): expected reset\(self, \*, seed=None, "
                                       r"options=None\), the Gymnasium API .* shimmy's GymV21CompatibilityV0"):
        shoal.Binding(env_cls=NoSeed).make_env().reset()
    # A wrapper passes options= on: the wrapped env's reset is the one named.
    with pytest.raises(EnvError, match=r"NoOptions.reset\(seed=None\) cannot take seed= and options= \(.*unexpected "
                                       r"keyword argument 'options'\)"):
        shoal.Binding(env_creator=lambda: gymnasium.wrappers.OrderEnforcing(NoOptions())).make_env().reset(seed=1)
    with pytest.raises(EnvError, match=r"NoSeedParallel.reset\(\) cannot take seed= and options= .* the PettingZoo "
                                       r"Parallel API$"):
        shoal.Binding(env_cls=NoSeedParallel).make_env().reset()
    with pytest.raises(TypeError, match=r"helper\(\) got an unexpected keyword argument 'seed'"):
        shoal.Binding(env_cls=OwnTypeError).make_env().reset()

    class NoDefaults(BadObservationEnv):  # shoal calls reset(seed=...) alone, as Gymnasium's own vector envs do
        def reset(self, seed, options):
            return np.zeros(3, np.float32), {}

    with pytest.raises(EnvError, match=r"NoDefaults.reset\(seed, options\) cannot take seed= and options= \(.*missing "
                                       r"1 required positional argument: 'options'\)"):
        shoal.Binding(env_cls=NoDefaults).make_env().reset()

    class SeedOnlyWrapper(gymnasium.Wrapper):  # a wrapper narrower than the env it wraps: it is the one named
        def reset(self, seed=None):
            return self.env.reset(seed=seed)

    with pytest.raises(EnvError, match=r"SeedOnlyWrapper.reset\(seed=None\) cannot take seed= and options= "):
        shoal.Binding(env_creator=lambda: SeedOnlyWrapper(gymnasium.make("CartPole-v1"))).make_env().reset(
            seed=0, options={"level": 2})



class EndedButListed(ParallelEnv):
    """Agent "a" terminates at step 1 but stays in env.agents until the episode ends at step 3; like
    PettingZoo's aec_to_parallel, step needs an action for every listed agent."""

    metadata = {"name": "ended_but_listed"}
    possible_agents = ["a", "b"]

    def observation_space(self, agent):
        return spaces.Box(0, 1, (1,), np.float32)

    def action_space(self, agent):
        return spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        self.t, self.agents = 0, ["a", "b"]
        return {agent: np.zeros(1, np.float32) for agent in self.agents}, {}

    def step(self, actions):
        missing = [agent for agent in self.agents if agent not in actions]
        if missing:
            raise KeyError(missing[0])
        self.t += 1
        obs = {agent: np.ones(1, np.float32) for agent in self.agents}
        terminated = {"a": self.t == 1, "b": self.t == 3}
        if self.t == 3:
            self.agents = []
        return obs, {agent: 1.0 for agent in obs}, terminated, {agent: False for agent in obs}, {}


@pytest.mark.parametrize("flat", [True, False])
def test_an_ended_agent_the_env_still_lists_gets_an_action_but_stays_dark(flat):
    env = shoal.Binding(env_cls=EndedButListed, emulate_flat_atn=flat).make_env()
    env.reset(seed=0)
    both = np.ones((2, 1), np.int64) if flat else {"a": 1, "b": 1}
    _, _, terminals, _, infos = env.step(both)
    assert terminals.tolist() == [True, False] and infos["a"]["episode"] == {"return": 1.0, "length": 1}
    *_, infos = env.step(both if flat else {"b": 1})  # raw actions: "a" gets the neutral one
    assert env.masks.tolist() == [False, True] and "a" not in infos
    *_, infos = env.step(both)
    assert infos["b"]["episode"] == {"return": 3.0, "length": 3} and "episode" not in infos.get("a", {})


def test_an_ended_agent_the_env_still_lists_goes_without_an_action_where_no_neutral_one_exists():
    class MixedActions(EndedButListed):  # no flat form, so no neutral action; this env takes missing actions
        def action_space(self, agent):
            return spaces.Dict({"move": spaces.Discrete(2), "force": spaces.Box(-1, 1, (1,), np.float32)})

        def step(self, actions):
            self.sent = actions
            return super().step({agent: actions.get(agent) for agent in self.agents})

    env = shoal.Binding(env_cls=MixedActions, emulate_flat_atn=False).make_env()
    env.reset(seed=0)
    act = {"move": 1, "force": np.zeros(1, np.float32)}
    env.step({"a": act, "b": act})
    env.step({"b": act})  # "a" ended at step 1: it needs none (an APIUsageError asked for one)
    assert list(env.env.sent) == ["b"]


def test_agents_that_appear_ending_or_are_shown_unlisted_are_delivered_once_and_every_info_passes_through():
    # b appears at step 1 already terminated, listed but with no observation: its flag and reward come with mask
    # True, and it never acts in an episode of its own (it used to be reported truncated at step 3); the env,
    # which lists it at steps 2 and 3, still gets an action for it there, as the Parallel API asks
    def appears_ending(t, env):
        env.agents = ["a", "b"] if t < 3 else ["a"]
        rewards = {"a": 1.0, "b": 5.0 if t == 1 else 7.0}
        return ({"a": np.full(1, t, np.float32)}, rewards, {"a": False, "b": t == 1}, {"a": False, "b": False},
                {"b": {"note": t}})

    env = scripted(appears_ending, reset_agents=("a",))
    _, rewards, terminals, truncations, infos = env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, True] and terminals.tolist() == [False, True] and rewards.tolist() == [1, 5]
    assert infos["b"] == {"note": 1}  # no final observation, and no episode: it never acted
    for t in (2, 3):
        _, rewards, terminals, truncations, infos = env.step(np.zeros((2, 1), np.int64))
        assert env.masks.tolist() == [True, False] and not terminals[1] and not truncations[1]
        assert infos == {"b": {"note": t}}  # an ended agent's own infos pass through
    assert env.env.acted == [["a"], ["a", "b"], ["a", "b"]]

    # b is shown at step 1 but never listed and not flagged: it is truncated there, with its final observation
    def shown_unlisted(t, env):
        return ({agent: np.full(1, t, np.float32) for agent in ("a", "b") if t == 1 or agent == "a"},
                {"a": 0.0}, {"a": False}, {"a": False}, {})

    env = scripted(shown_unlisted, reset_agents=("a",))
    _, _, terminals, truncations, infos = env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, True] and truncations.tolist() == [False, True]
    assert infos["b"]["final_observation"].tolist() == [1.0] and "episode" not in infos["b"]
    env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, False] and env.env.acted == [["a"], ["a"]]


def test_an_agent_that_leaves_unflagged_and_unseen_with_nothing_to_say_has_no_infos_entry():
    def leaves(t, env):
        env.agents = ["a"]
        return {"a": np.ones(1, np.float32)}, {"a": 0.0}, {"a": False}, {"a": False}, {}

    binding = shoal.Binding(env_creator=ScriptedEnv, env_args=(leaves,), record_episode_statistics=False)
    env = binding.make_env()
    env.reset(seed=0)
    _, _, _, truncations, infos = env.step(np.zeros((2, 1), np.int64))
    assert truncations.tolist() == [False, True] and infos == {}


def test_flags_of_agents_the_env_never_listed_are_ignored_and_a_bare_reset_info_leaves_no_entry():
    # some envs flag every possible agent, inactive ones True: those are no episodes
    def flags_everyone(t, env):
        return ({"a": np.full(1, t, np.float32)}, {"a": 1.0}, {"a": False, "b": True}, {"a": False, "b": False},
                {"a": {"reset_info": "the env's"}})

    env = scripted(flags_everyone, reset_agents=("a",))
    for _ in range(3):
        _, _, terminals, _, infos = env.step(np.zeros((2, 1), np.int64))
        assert env.masks.tolist() == [True, False] and not terminals.any() and infos == {}


def test_an_agent_shown_but_not_listed_at_reset_is_not_live():
    class ShownAtReset(ScriptedEnv):
        def reset(self, seed=None, options=None):
            obs, infos = super().reset(seed, options)
            self.agents = ["b"]  # a is shown but will not act
            return obs, infos

    binding = shoal.Binding(env_creator=ShownAtReset, env_args=(lambda t, env: (
        {"b": np.ones(1, np.float32)}, {"b": 0.0}, {"b": False}, {"b": False}, {}),))
    env = binding.make_env()
    obs, _ = env.reset(seed=0)
    assert env.masks.tolist() == [False, True] and obs.tolist() == [[0], [0]]
    env.step(np.zeros((2, 1), np.int64))
    assert env.env.acted == [["b"]]


def test_more_corners_of_emulation_from_probing():
    # Agents whose Box bounds differ a little (np.allclose calls them equal) are refused all the same.
    class CloseBounds(TwoAgents):
        def observation_space(self, agent):
            return spaces.Box(0, 100_000 if agent == "a" else 100_001, (1,), np.float32)

    with pytest.raises(SpaceError, match=r"every agent needs the same observation_space.*'b' has Box\(0.0, 100001.0"):
        shoal.Binding(env_cls=CloseBounds)

    class CloserBounds(TwoAgents):  # gymnasium prints both Boxes alike: the message names what differs
        def observation_space(self, agent):
            return spaces.Box(-1, np.array([1, 1, 1 + (agent == "b") * 1e-9]), (3,), np.float64)

    with pytest.raises(SpaceError, match=r"\(the high bound differs at element \[2\]: 1.0 vs 1.000000001\)"):
        shoal.Binding(env_cls=CloserBounds)
    # Ids whose digits int() cannot read ("²" is a digit to str.isdigit) sort as text.
    class OddIds(TwoAgents):
        possible_agents = ["x1²", "x1"]

    assert shoal.Binding(env_cls=OddIds).possible_agents == ("x1", "x1²")
    # A feature_parser whose output does not fit its space is blamed, not the env.
    grows = iter(range(100))
    binding = shoal.Binding(env_cls=NestedSingleAgentEnv,
                            feature_parser=lambda obs: np.zeros(2 + 2 * min(next(grows), 1)))  # (2,), then (4,)
    with pytest.raises(APIUsageError, match=r"the feature_parser's output does not fit the featurized observation "
                                            r"space Box\(-inf, inf, \(2,\), float64\).*expected shape \(2,\), got \(4,\)"):
        binding.make_env().reset(seed=0)


def test_the_rows_of_the_agents_shown_at_the_last_step_must_hold_valid_actions():
    # The rule vec envs check too: a row whose mask was True (an agent that just ended included) must hold a
    # valid action; a dark agent's row gets the neutral action; other rows may hold anything.
    def b_ends_then_a_goes_on(t, env):
        env.agents = ["a"] if t == 1 else env.agents
        return ({"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)} if t == 1 else {"a": np.ones(1, np.float32)},
                {}, {"b": t == 1}, {}, {})

    env = scripted(b_ends_then_a_goes_on)
    env.step(np.zeros((2, 1), np.int64))
    assert env.masks.tolist() == [True, True]  # b delivered with its terminal flag
    with pytest.raises(APIUsageError, match=r"agent 'b' \(slot 1\): action \[-1\] is out of range"):
        env.step(np.array([[0], [-1]]))
    env.step(np.array([[1], [0]]))
    env.step(np.array([[1], [-1]]))  # b's slot is dark now: anything goes
    assert env.env.acted[-1] == ["a"]


def test_single_agent_hooks_and_options_work_as_for_many_agents():
    # A reward shaper that replaces the agent's infos: its infos show in step's, as with a multi-agent env.
    def shaper(rewards, infos):
        infos[0] = {"shaped_from": rewards[0]}
        return rewards

    env = shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",), reward_shaper=shaper).make_env()
    env.reset(seed=0)
    assert env.step([[0]])[4] == {0: {"shaped_from": 1.0}}
    # emulate_flat_obs=False: the final observation in infos is nested, as the observations are.
    binding = shoal.Binding(env_creator=NestedSingleAgentEnv, env_kwargs={"max_steps": 2}, emulate_flat_obs=False)
    env = binding.make_env()
    env.reset(seed=0)
    action = binding.flatten_action(binding.raw_single_action_space.sample())[None]
    env.step(action)
    infos = env.step(action)[4]
    final = infos[0]["final_observation"]
    assert isinstance(final, dict) and final["self"]["pos"].tolist() == [2.0, -2.0]
    assert binding.raw_single_observation_space.contains(final)
    # With buffers (as vec envs build them) the flat contract holds whatever the options say.
    flat_env = binding.make_env(Buffers.allocate(binding))
    flat_env.reset(seed=0)
    flat_env.step(action)
    assert isinstance(flat_env.step(action)[4][0]["final_observation"], np.ndarray)
    # A bfloat16 CPU tensor of actions is taken like any other.
    pendulum = shoal.Binding(env_creator=gymnasium.make, env_args=("Pendulum-v1",)).make_env()
    pendulum.reset(seed=0)
    pendulum.step(torch.tensor([[0.5]], dtype=torch.bfloat16))


def test_what_the_env_returns_is_checked_where_shoal_passes_it_over_too():
    # A reward for an agent shoal does not deliver (not listed, not shown) must still be a number.
    def reward_for_a_stranger(t, env):
        env.agents = ["a"]
        return {"a": np.ones(1, np.float32)}, {"a": 1.0, "b": float("nan")}, {}, {}, {}

    for rewards in ({"a": 1.0, "b": float("nan")}, {"b": float("nan")}):  # whatever else the env rewards
        env = scripted(lambda t, env, rewards=rewards: reward_for_a_stranger(t, env)[:1] + (rewards, {}, {}, {}),
                       reset_agents=("a",))
        with pytest.raises(EnvError, match=r"agent 'b', step 1: reward must be a finite number"):
            env.step(np.zeros((2, 1), np.int64))
    # Agents whose observations shoal cannot flatten (Text), made flat by a feature_parser, share one space.
    class TextAgents(TwoAgents):
        def observation_space(self, agent):
            return spaces.Text(8)

        def reset(self, seed=None, options=None):
            self.agents = ["a", "b"]
            return {agent: "hello" for agent in self.agents}, {}

    binding = shoal.Binding(env_cls=TextAgents, feature_parser=lambda text: np.array([len(text)], np.float32),
                            feature_space=spaces.Box(0, 8, (1,), np.float32))
    assert binding.make_env().reset(seed=0)[0].tolist() == [[5.0], [5.0]]
    # Integers for a float leaf pass where the float holds them exactly, and are refused where it would round.
    layout = shoal.Binding(env_cls=NestedSingleAgentEnv).obs_layout
    with pytest.raises(SpaceError, match=r"expected dtype float32, got int64 with integers it cannot hold exactly"):
        layout.flatten({"self": {"pos": np.array([2**40 + 1, 0]), "hp": 0}, "map": np.zeros((3, 3), np.uint8),
                        "inventory": (np.zeros(3, np.int8), np.zeros(2, np.int64))})
    # An empty id sorts among the names, after the numbers.
    class EmptyId(TwoAgents):
        possible_agents = ["", 3]

    assert shoal.Binding(env_cls=EmptyId).possible_agents == (3, "")


def test_a_failed_automatic_reset_says_so_and_the_env_then_needs_reset():
    env = shoal.Binding(env_cls=SecondResetFails).make_env()
    env.reset(seed=0)
    env.step([[0]])
    with pytest.raises(RuntimeError, match="lost its ROM") as caught:
        env.step([[0]])
    assert caught.value.__notes__ == ["raised in the automatic reset that starts the next episode, at step 2"]
    with pytest.raises(APIUsageError, match=r"step\(\) needs reset\(\) first \(it was not called yet, the "
                                            r"automatic reset at the end of an episode failed, or a step failed once "
                                            r"the env had stepped\)"):
        env.step([[0]])  # its episode statistics would mix two episodes
    env.reset(seed=1)
    env.step([[0]])
    # An explicit reset that fails mid-episode leaves it half begun too (step went on before).
    env = shoal.Binding(env_cls=SecondResetFails).make_env()
    env.reset(seed=0)
    with pytest.raises(RuntimeError, match="lost its ROM"):
        env.reset(seed=1)
    with pytest.raises(APIUsageError, match=r"step\(\) needs reset\(\) first"):
        env.step([[0]])


def test_a_step_that_fails_once_the_env_stepped_needs_reset_and_one_before_does_not():
    """The env stepped, but the step's bookkeeping (episode statistics, slots) is half done: going on would count
    a wrong episode. A step refused before the env stepped (a bad action) leaves everything as it was."""
    calls = []

    def parser(obs):  # raises at the env's third step
        calls.append(1)
        if len(calls) == 4:
            raise ValueError("featurizing failed")
        return obs

    for binding in (shoal.Binding(env_cls=NestedSingleAgentEnv, feature_parser=parser,
                                  feature_space=NestedSingleAgentEnv.observation_space),
                    shoal.Binding(env_cls=NestedMultiAgentEnv, feature_parser=lambda obs: obs,
                                  feature_space=OBS_SPACE)):
        env = started(binding)
        with pytest.raises(APIUsageError, match="out of range"):
            env.step(np.full_like(flat_actions(binding), 99))
        env.step(flat_actions(binding))  # no harm done
        if binding.is_multiagent:
            env.env.step = lambda actions: 1 / 0
        else:
            env.step(flat_actions(binding))
        with pytest.raises((ValueError, ZeroDivisionError)):
            env.step(flat_actions(binding))
        with pytest.raises(APIUsageError, match=r"or a step failed once the env had stepped"):
            env.step(flat_actions(binding))
        calls.clear()


def test_an_env_whose_close_fails_does_not_hide_why_the_binding_refused_it():
    class TextObservations(SecondResetFails):
        observation_space = spaces.Text(5)

        def close(self):
            raise RuntimeError("close failed too")

    with pytest.raises(SpaceError, match="Text"):
        shoal.Binding(env_cls=TextObservations)


def test_reset_options_reach_the_env_and_are_checked():
    env = shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",)).make_env()
    obs, _ = env.reset(seed=0, options={"low": 0.2, "high": 0.3})
    assert ((obs >= 0.2) & (obs <= 0.3)).all()
    with pytest.raises(APIUsageError, match=r"reset options must be a dict or None, got list"):
        env.reset(seed=0, options=[0.2, 0.3])

    class SeedOnly(SecondResetFails):  # takes seed= only: fine until options are passed
        def reset(self, seed=None):
            return super().reset(seed=seed)

    seed_only = shoal.Binding(env_cls=SeedOnly).make_env()
    seed_only.reset(seed=0)
    with pytest.raises(EnvError, match=r"cannot take seed= and options="):
        seed_only.reset(seed=0, options={})
