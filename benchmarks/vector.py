"""How fast shoal.vector steps envs, against Gymnasium's vector envs and against the machine's limit.

    python benchmarks/vector.py                      # the table in docs/vector.md, a few minutes
    python benchmarks/vector.py --seconds 1 --envs cartpole

Every number comes from this one run on this machine. For each env, every runner steps the same number
of envs with fixed random actions (their cost is not measured) for ``--seconds``, and the table gives env
steps per second and ratios against:
  - the limit: one independent process per core, each stepping the raw env in a loop, no communication;
  - the emulated limit: the same with shoal's emulated env (the ceiling for any vectorization of it,
    so "x emulated" is the vectorization layer's own efficiency);
  - Gymnasium's ``AsyncVectorEnv`` (one process per env, its design) and shoal's ``Serial``.
Gymnasium cannot vectorize a PettingZoo env, so for the multi-agent env its vector envs run shoal's
emulated env behind a small gymnasium.Env adapter.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Callable

import gymnasium
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests.envs`, also in worker processes

import shoal  # noqa: E402
from shoal.vector import Multiprocessing, Ray, Serial, default_num_workers  # noqa: E402
from tests.envs import ReseedingNestedMultiAgentEnv  # noqa: E402


@dataclasses.dataclass
class Config:
    seconds: float = 3.0
    """How long each runner is timed (after a short warm-up)."""
    envs: tuple[str, ...] = ("cartpole", "breakout", "nested")
    """Which envs to run: cartpole, breakout, nested."""
    cores: int = 0
    """Workers (and limit processes) to use; 0 means one per core."""
    ray: bool = True
    """Include the Ray backend (starts a local Ray)."""


# ---------------------------------------------------------------- envs (module level, so workers can import them)


def make_cartpole():
    return gymnasium.make("CartPole-v1")


def make_breakout():
    import ale_py

    gymnasium.register_envs(ale_py)
    return gymnasium.make("ALE/Breakout-v5")


def make_nested():
    return ReseedingNestedMultiAgentEnv(num_agents=4, max_steps=50)


@dataclasses.dataclass(frozen=True)
class Bench:
    label: str
    creator: Callable
    num_envs: int


BENCHES = {
    "cartpole": Bench("CartPole-v1", make_cartpole, 64),
    "breakout": Bench("ALE Breakout-v5", make_breakout, 8),
    "nested": Bench("nested multi-agent (5 agents)", make_nested, 16),
}


class EmulatedAsGymnasium(gymnasium.Env):
    """shoal's emulated env as a gymnasium.Env, so Gymnasium's vector envs can run a multi-agent env."""

    def __init__(self, creator: Callable):
        self.emulated = shoal.Binding(env_creator=creator).make_env()
        binding = self.emulated.binding
        self.observation_space = gymnasium.spaces.Box(0, 255, self.emulated.obs.shape, np.uint8)
        self.action_space = gymnasium.spaces.MultiDiscrete(
            np.tile(binding.single_action_space.nvec, (binding.max_agents, 1)))

    def reset(self, seed=None, options=None):
        obs, _ = self.emulated.reset(seed=seed)
        return obs.copy(), {}

    def step(self, action):
        obs, rewards, _, _, _ = self.emulated.step(action)  # it resets itself at the episode's end
        return obs.copy(), float(rewards.sum()), False, False, {}


# ---------------------------------------------------------------- the limit


def _limit_process(creator: Callable, emulated: bool, num_envs: int, seconds: float, results) -> None:
    """Step envs in a loop, alone; put env steps per second in ``results``."""
    if emulated:
        vecenv = Serial(shoal.Binding(env_creator=creator), envs_per_worker=num_envs)
        vecenv.reset(seed=0)
        actions = _actions(vecenv, 1)[0]

        def step() -> int:
            vecenv.step(actions)
            return num_envs
    else:
        env = creator()
        env.reset(seed=0)
        multiagent = not isinstance(env, gymnasium.Env)
        if multiagent:
            action = env.action_space(env.possible_agents[0]).sample()

        def step() -> int:
            if multiagent:
                env.step({agent: action for agent in env.agents})
                if not env.agents:
                    env.reset()
            else:
                _, _, terminal, truncation, _ = env.step(0)
                if terminal or truncation:
                    env.reset()
            return 1
    results.put(_timed(step, seconds))


def limit(bench: Bench, cores: int, seconds: float, emulated: bool) -> float:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    processes = [ctx.Process(target=_limit_process, args=(bench.creator, emulated, bench.num_envs // cores,
                                                           seconds, results)) for _ in range(cores)]
    for process in processes:
        process.start()
    rates = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return sum(rates)


# ---------------------------------------------------------------- runners


def _timed(step: Callable[[], int], seconds: float) -> float:
    """Env steps per second of ``step()`` (which returns how many env steps it made), after a warm-up."""
    warm_until = time.perf_counter() + min(0.5, seconds / 4)
    while time.perf_counter() < warm_until:
        step()
    count, start = 0, time.perf_counter()
    end = start + seconds
    while (now := time.perf_counter()) < end:
        count += step()
    return count / (now - start)


def _actions(vecenv, batches: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    nvec = vecenv.single_action_space.nvec
    rows = vecenv.batch_size * vecenv.max_agents
    return [rng.integers(0, nvec, size=(rows, len(nvec))) for _ in range(batches)]


def run_shoal(cls, bench: Bench, seconds: float, **kwargs) -> float:
    with cls(shoal.Binding(env_creator=bench.creator), **kwargs) as vecenv:
        actions = _actions(vecenv, 16)
        turn = 0
        vecenv.async_reset(seed=0)

        def step() -> int:
            nonlocal turn
            vecenv.recv()
            vecenv.send(actions[turn % 16])
            turn += 1
            return vecenv.batch_size
        rate = _timed(step, seconds)
        vecenv.recv()
    return rate


def run_gymnasium(vector_cls, bench: Bench, seconds: float, emulated: bool) -> float:
    creator = (lambda: EmulatedAsGymnasium(bench.creator)) if emulated else bench.creator
    vecenv = vector_cls([creator] * bench.num_envs)
    try:
        vecenv.reset(seed=0)
        actions = [vecenv.action_space.sample() for _ in range(16)]
        turn = 0

        def step() -> int:
            nonlocal turn
            vecenv.step(actions[turn % 16])
            turn += 1
            return bench.num_envs
        return _timed(step, seconds)
    finally:
        vecenv.close()


# ---------------------------------------------------------------- the table


def main(config: Config) -> None:
    cores = config.cores or default_num_workers()
    rows: list[tuple[str, str, str, float]] = []  # env, runner, layout, steps/s
    rates: dict[tuple[str, str], float] = {}

    def record(bench: Bench, runner: str, layout: str, rate: float) -> None:
        rows.append((bench.label, runner, layout, rate))
        rates[bench.label, runner] = rate
        print(f"  {runner:<28} {layout:<34} {rate:>12,.0f} env steps/s", file=sys.stderr, flush=True)

    for name in config.envs:
        bench = BENCHES[name]
        n, s = bench.num_envs, config.seconds
        print(f"{bench.label}: {n} envs, {cores} cores", file=sys.stderr, flush=True)
        multiagent = name == "nested"
        per_core = f"{cores} processes x {n // cores} envs"
        record(bench, "limit", f"{cores} processes x 1 raw env", limit(bench, cores, s, emulated=False))
        record(bench, "limit (emulated)", per_core, limit(bench, cores, s, emulated=True))
        record(bench, "gymnasium SyncVectorEnv", f"{n} envs", run_gymnasium(
            gymnasium.vector.SyncVectorEnv, bench, s, multiagent))
        record(bench, "gymnasium AsyncVectorEnv", f"{n} processes x 1 env", run_gymnasium(
            gymnasium.vector.AsyncVectorEnv, bench, s, multiagent))
        record(bench, "shoal Serial", f"1 x {n} envs", run_shoal(Serial, bench, s, envs_per_worker=n))
        record(bench, "shoal Multiprocessing", f"{cores} workers x {n // cores} envs", run_shoal(
            Multiprocessing, bench, s, num_workers=cores, envs_per_worker=n // cores))
        record(bench, "shoal Multiprocessing async", f"{2 * cores} workers x {n // cores // 2} envs, batch {n // 2}",
               run_shoal(Multiprocessing, bench, s, num_workers=2 * cores, envs_per_worker=n // cores // 2,
                         batch_size=n // 2))
    if config.ray:
        import ray

        ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
        for name in config.envs:
            bench = BENCHES[name]
            n, s = bench.num_envs, config.seconds
            print(f"{bench.label}: Ray", file=sys.stderr, flush=True)
            record(bench, "shoal Ray", f"{cores} actors x {n // cores} envs", run_shoal(
                Ray, bench, s, num_workers=cores, envs_per_worker=n // cores))
            record(bench, "shoal Ray async", f"{2 * cores} actors x {n // cores // 2} envs, batch {n // 2}",
                   run_shoal(Ray, bench, s, num_workers=2 * cores, envs_per_worker=n // cores // 2,
                             batch_size=n // 2))
        ray.shutdown()

    order = {runner: i for i, runner in enumerate([
        "limit", "limit (emulated)", "gymnasium SyncVectorEnv", "gymnasium AsyncVectorEnv", "shoal Serial",
        "shoal Multiprocessing", "shoal Multiprocessing async", "shoal Ray", "shoal Ray async"])}
    rows.sort(key=lambda row: (list(BENCHES).index(next(k for k, b in BENCHES.items() if b.label == row[0])),
                               order[row[1]]))

    def ratio(env: str, rate: float, baseline: str) -> str:
        base = rates.get((env, baseline))
        return f"{rate / base:.2f}x" if base else "-"

    print(f"\nshoal.vector benchmark: {cores} cores ({os.cpu_count()} visible), {config.seconds:g} s per runner, "
          f"env steps per second (higher is better)\n")
    print("| env | runner | layout | steps/s | vs limit | vs emulated limit | vs gym Async | vs shoal Serial |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for env, runner, layout, rate in rows:
        print(f"| {env} | {runner} | {layout} | {rate:,.0f} | {ratio(env, rate, 'limit')} | "
              f"{ratio(env, rate, 'limit (emulated)')} | {ratio(env, rate, 'gymnasium AsyncVectorEnv')} | "
              f"{ratio(env, rate, 'shoal Serial')} |")


if __name__ == "__main__":
    main(tyro.cli(Config))
