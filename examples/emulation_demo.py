"""What emulation does to a nested multi-agent env: spaces before and after, a few steps, masks.

Run: .venv/bin/python examples/emulation_demo.py
"""

import sys
from pathlib import Path

import numpy as np

import shoal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from envs import NestedMultiAgentEnv  # noqa: E402  (a small test env where agents die and spawn)

binding = shoal.Binding(env_cls=NestedMultiAgentEnv, env_kwargs={"num_agents": 3, "max_steps": 6})
print("agents (slot order):", binding.possible_agents)
print("raw observation space: ", binding.raw_single_observation_space)
print("flat observation space:", binding.single_observation_space)
print("raw action space: ", binding.raw_single_action_space)
print("flat action space:", binding.single_action_space)

env = binding.make_env()
obs, infos = env.reset(seed=0)
rng = np.random.default_rng(0)
print(f"\nreset: obs {obs.shape} {obs.dtype}, masks {env.masks.astype(int)}")
for step in range(1, 8):
    actions = np.stack([binding.single_action_space.sample() for _ in range(binding.max_agents)])
    obs, rewards, terminals, truncations, infos = env.step(actions)
    ended = [agent for agent, info in infos.items() if "episode" in info]
    print(f"step {step}: masks {env.masks.astype(int)} rewards {rewards.round(2)} "
          f"terminals {terminals.astype(int)} truncations {truncations.astype(int)} ended {ended}")

nested = binding.unflatten_observation(obs)  # views into the flat buffer: no copy
print("\nunflattened hp per slot:", nested["self"]["hp"], " map[0,0] per slot:", nested["map"][:, 0, 0])
