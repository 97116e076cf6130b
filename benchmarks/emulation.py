"""What emulation costs: steps/s of the emulated env divided by steps/s of the raw env it wraps.

    python benchmarks/emulation.py            # about 2 minutes
    python benchmarks/emulation.py --quick    # a smoke run, about 15 s

Both loops do the same work apart from emulation: one env, actions drawn in advance from the same
seeded source (raw nested actions for the raw env, the same actions flattened for the emulated one),
and a reset when the episode ends (the emulated env resets itself, same-step).

Made for a shared, noisy machine: time is this process's CPU time (``time.process_time``: time spent
waiting for a core does not count); raw and emulated run in alternating short chunks (A/B, B/A, ...),
both envs playing the same steps in each pair of chunks (same seed, same actions, so the same episode
ends), and the table reports the median over all pairs of each pair's ratio, so a burst of load from
another process moves a few pairs, not the result. ``--clock wall`` uses wall-clock time instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gymnasium
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the nested test env

from shoal import Binding  # noqa: E402

NUM_PREPARED_ACTIONS = 256  # steps cycle through these: longer than an episode of the nested env, no pattern


@dataclass
class Case:
    """One row of the table: how to build the env, and the ratio it must reach."""

    name: str
    make_raw: Callable[[], Any]
    target: float


def make_breakout():
    import ale_py

    gymnasium.register_envs(ale_py)
    return gymnasium.make("ALE/Breakout-v5")


def make_nested_100():
    from envs import NestedMultiAgentEnv

    return NestedMultiAgentEnv(num_agents=99, max_steps=50)  # 99 + the "late" spawner = 100 agents


CASES = [
    Case("CartPole-v1", lambda: gymnasium.make("CartPole-v1"), 0.8),
    Case("ALE/Breakout-v5", make_breakout, 0.95),
    Case("nested, 100 agents", make_nested_100, 0.8),
]


# ---------------------------------------------------------------- the two loops


def prepare_actions(binding: Binding, num: int) -> tuple[list, np.ndarray]:
    """``num`` random valid raw actions (one per agent) and the same actions flattened.

    Returns (raw, flat): raw[i] is one action (single agent) or a dict by agent id; flat is
    ``(num, max_agents, atn_size)``.
    """
    space = binding.raw_single_action_space
    space.seed(0)
    flat = np.zeros((num, binding.max_agents, binding.atn_layout.size), binding.atn_layout.dtype)
    raw = []
    for step in range(num):
        by_agent = {agent: space.sample() for agent in binding.possible_agents}
        for agent, action in by_agent.items():
            flat[step, binding.agent_slots[agent]] = binding.flatten_action(action)
        raw.append(by_agent if binding.is_multiagent else by_agent[binding.possible_agents[0]])
    return raw, flat


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def run_raw_single(env, actions: list, num_steps: int, clock: Callable[[], float]) -> float:
    """Seconds for ``num_steps`` steps of a Gymnasium env, resetting when an episode ends."""
    num_actions = len(actions)
    start = clock()
    for step in range(num_steps):
        _, _, terminal, truncation, _ = env.step(actions[step % num_actions])
        if terminal or truncation:
            env.reset()
    return clock() - start


def run_raw_multi(env, actions: list, num_steps: int, clock: Callable[[], float]) -> float:
    """Seconds for ``num_steps`` steps of a PettingZoo ParallelEnv, resetting when no agent is left."""
    num_actions = len(actions)
    start = clock()
    for step in range(num_steps):
        env.step(actions[step % num_actions])
        if not env.agents:
            env.reset()
    return clock() - start


def run_emulated(env, actions: np.ndarray, num_steps: int, clock: Callable[[], float]) -> float:
    """Seconds for ``num_steps`` steps of an emulated env (it resets itself at an episode's end)."""
    num_actions = len(actions)
    start = clock()
    for step in range(num_steps):
        env.step(actions[step % num_actions])
    return clock() - start


# ---------------------------------------------------------------- measurement


@dataclass
class Result:
    name: str
    raw_sps: float
    emulated_sps: float
    ratio: float
    target: float


def measure(case: Case, rounds: int, seconds: float, clock: Callable[[], float], chunks: int) -> Result:
    binding = Binding(env_creator=case.make_raw, env_name=case.name)
    raw_actions, flat_actions = prepare_actions(binding, NUM_PREPARED_ACTIONS)
    raw_env = binding.create_raw_env()  # the same env the emulated one wraps, without emulation
    emulated = binding.make_env()
    raw_env.reset(seed=0)
    emulated.reset(seed=0)
    run_raw = run_raw_multi if binding.is_multiagent else run_raw_single

    # Calibrate (and warm up): steps per chunk so that a round, `chunks` pairs of chunks, takes about `seconds`.
    num_steps = 8
    while (raw_elapsed := run_raw(raw_env, raw_actions, num_steps, clock)) < 0.05 * seconds / chunks:
        num_steps *= 2
    emulated_elapsed = run_emulated(emulated, flat_actions, num_steps, clock)
    num_steps = max(8, int(num_steps * seconds / chunks / (raw_elapsed + emulated_elapsed)))

    raw_sps, emulated_sps, ratios = [], [], []
    for _ in range(rounds * chunks):
        # A pair of chunks: both envs play the same steps (same seed, same actions, same resets).
        if len(ratios) % 2:  # B/A every other pair: slow drift in load favours neither side
            emu = num_steps / run_emulated(emulated, flat_actions, num_steps, clock)
            raw = num_steps / run_raw(raw_env, raw_actions, num_steps, clock)
        else:
            raw = num_steps / run_raw(raw_env, raw_actions, num_steps, clock)
            emu = num_steps / run_emulated(emulated, flat_actions, num_steps, clock)
        raw_sps.append(raw)
        emulated_sps.append(emu)
        ratios.append(emu / raw)
    raw_env.close()
    emulated.close()
    return Result(case.name, statistics.median(raw_sps), statistics.median(emulated_sps),
                  statistics.median(ratios), case.target)


def print_table(results: list[Result], rounds: int, chunks: int, clock: str) -> None:
    print(f"\nemulated ÷ raw steps/s ({clock} time), one env: median over {rounds * chunks} interleaved pairs "
          f"of chunks that play the same steps\n")
    header = f"{'env':<20} {'raw steps/s':>12} {'emulated steps/s':>17} {'ratio':>7} {'target':>7}  ok"
    print(header)
    print("-" * len(header))
    for r in results:
        verdict = "yes" if r.ratio >= r.target else "NO"
        print(f"{r.name:<20} {r.raw_sps:>12,.0f} {r.emulated_sps:>17,.0f} {r.ratio:>7.3f} {r.target:>7.2f}  {verdict}")


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~15 s smoke run (fewer, shorter rounds)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per env (default 12, quick 4)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds per round, raw and emulated together (default 2.0, quick 0.5)")
    parser.add_argument("--chunks", type=int, default=8, help="pairs of raw/emulated chunks per round")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: this process's CPU time (robust to other load); wall: wall-clock time")
    parser.add_argument("--only", default=None, help="run only the envs whose name contains this")
    args = parser.parse_args(argv)
    rounds = args.rounds or (4 if args.quick else 12)
    seconds = args.seconds or (0.5 if args.quick else 2.0)
    cases = [case for case in CASES if args.only is None or args.only.lower() in case.name.lower()]
    results = []
    for case in cases:
        print(f"measuring {case.name} ...", flush=True)
        results.append(measure(case, rounds, seconds, CLOCKS[args.clock], args.chunks))
    print_table(results, rounds, args.chunks, args.clock)
    return results


if __name__ == "__main__":
    main()
