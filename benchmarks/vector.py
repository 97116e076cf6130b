"""How fast shoal.vector steps envs, against Gymnasium's vector envs and against the machine's limit.

    python benchmarks/vector.py                      # the table in docs/vector.md, a few minutes
    python benchmarks/vector.py --envs cartpole --rounds 1

Every number comes from this one run on this machine. For each env, every runner steps the same number
of envs with fixed random actions (their cost is not measured). The runners are built first, then timed
in turn for ``--seconds`` each, ``--rounds`` times. A shared VM's speed drifts by up to 2x within
seconds, so one round times every runner back to back (about the same machine for all of them), and the
table reports medians: a runner's steps/s is the median of its rounds, and a ratio is the median over
rounds of the ratio within the round (a paired comparison, immune to the drift between rounds; the
best round of each runner, as reported before, favoured whichever runner happened to catch the fast
moments). The Ray rows are timed in a second phase with Ray started only for them, since Ray's own
processes use CPU while they run; that phase times Multiprocessing again beside them ("beside Ray"), and
the last column compares each Ray row with its Multiprocessing twin from the same rounds; a ratio
between the phases (Ray against the limit) is the ratio of the medians. The table gives env steps per
second and ratios against:
  - the limit: one independent process per core, each stepping its share of the raw envs in a loop
    (as many per process as a Multiprocessing worker has), with no communication;
  - the emulated limit: the same with shoal's emulated envs (``EmulatedEnv.step`` in a loop): the ceiling
    for any vectorization of them, so "vs emulated limit" is the vectorization layer's own efficiency;
  - Gymnasium's ``AsyncVectorEnv`` (one process per env, its design) and shoal's ``Serial``.
Gymnasium cannot vectorize a PettingZoo env, so for the multi-agent env its vector envs run shoal's
emulated env behind a small gymnasium.Env adapter.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import statistics
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
    seconds: float = 0.4
    """How long each runner is timed in each round."""
    rounds: int = 15
    """Rounds; every runner is timed once per round; medians over rounds are reported."""
    envs: tuple[str, ...] = ("cartpole", "breakout", "nested")
    """Which envs to run: cartpole, breakout, nested."""
    cores: int = 0
    """Workers (and limit processes) to use; 0 means one per core."""
    ray: bool = True
    """Include the Ray backend (starts a local Ray)."""
    num_envs: int = 0
    """Envs each runner steps; 0 means each env's own default (CartPole 64, Breakout 8, nested 16)."""


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


# ---------------------------------------------------------------- runners
# A runner is built once, then asked to run for a while in every round: (measure(seconds) -> env steps/s, close).


def _timed(step: Callable[[], int], seconds: float) -> float:
    """Env steps per second of ``step()`` (which returns how many env steps it made)."""
    count, start = 0, time.perf_counter()
    end = start + seconds
    while (now := time.perf_counter()) < end:
        count += step()
    return count / (now - start)


def _limit_process(creator: Callable, emulated: bool, num_envs: int, conn) -> None:
    """Step ``num_envs`` envs in turn, alone, with no communication while timed; answer each request with
    env steps per second. Actions cycle through 16 fixed random ones, as the other runners' do: a game
    stepped with one constant action (Breakout's NOOP never launches the ball, so it never ends an
    episode) runs faster than one played."""
    rng = np.random.default_rng(0)
    turn = 0
    if emulated:
        binding = shoal.Binding(env_creator=creator)
        envs = [binding.make_env() for _ in range(num_envs)]
        for env in envs:
            env.reset(seed=0)
        nvec = binding.single_action_space.nvec
        actions = [rng.integers(0, nvec, size=(binding.max_agents, len(nvec))) for _ in range(16)]

        def step() -> int:
            nonlocal turn
            for index, env in enumerate(envs):
                env.step(actions[(turn + index) % 16])
            turn += 1
            return num_envs
    else:
        envs = [creator() for _ in range(num_envs)]
        for env in envs:
            env.reset(seed=0)
        multiagent = not isinstance(envs[0], gymnasium.Env)
        space = envs[0].action_space(envs[0].possible_agents[0]) if multiagent else envs[0].action_space
        space.seed(0)
        actions = [space.sample() for _ in range(16)]

        def step() -> int:
            nonlocal turn
            for index, env in enumerate(envs):
                action = actions[(turn + index) % 16]
                if multiagent:
                    env.step({agent: action for agent in env.agents})
                    if not env.agents:
                        env.reset()
                else:
                    _, _, terminal, truncation, _ = env.step(action)
                    if terminal or truncation:
                        env.reset()
            turn += 1
            return num_envs
    conn.send("ready")
    while (seconds := conn.recv()) is not None:
        conn.send(_timed(step, seconds))


def limit_runner(bench: Bench, cores: int, emulated: bool):
    """One process per core, each stepping its envs in a loop; their rates add up."""
    ctx = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for _ in range(cores):
        mine, theirs = ctx.Pipe()
        processes.append(ctx.Process(target=_limit_process, args=(
            bench.creator, emulated, bench.num_envs // cores, theirs), daemon=True))
        processes[-1].start()
        pipes.append(mine)
    for pipe in pipes:
        pipe.recv()

    def measure(seconds: float) -> float:
        for pipe in pipes:
            pipe.send(seconds)
        return sum(pipe.recv() for pipe in pipes)

    def close() -> None:
        for pipe, process in zip(pipes, processes):
            pipe.send(None)
            process.join()
    return measure, close


def _actions(vecenv, batches: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    nvec = vecenv.single_action_space.nvec
    rows = vecenv.batch_size * vecenv.max_agents
    return [rng.integers(0, nvec, size=(rows, len(nvec))) for _ in range(batches)]


def shoal_runner(cls, bench: Bench, **kwargs):
    vecenv = cls(shoal.Binding(env_creator=bench.creator), **kwargs)
    actions = _actions(vecenv, 16)
    turn = 0
    vecenv.async_reset(seed=0)

    def step() -> int:
        nonlocal turn
        vecenv.recv()
        vecenv.send(actions[turn % 16])
        turn += 1
        return vecenv.batch_size
    return (lambda seconds: _timed(step, seconds)), vecenv.close


def gymnasium_runner(vector_cls, bench: Bench, emulated: bool, **kwargs):
    creator = functools.partial(EmulatedAsGymnasium, bench.creator) if emulated else bench.creator
    vecenv = vector_cls([creator] * bench.num_envs, **kwargs)
    vecenv.reset(seed=0)
    actions = [vecenv.action_space.sample() for _ in range(16)]
    turn = 0

    def step() -> int:
        nonlocal turn
        vecenv.step(actions[turn % 16])
        turn += 1
        return bench.num_envs
    return (lambda seconds: _timed(step, seconds)), vecenv.close


# ---------------------------------------------------------------- the table

RUNNERS = ["limit", "limit (emulated)", "gymnasium SyncVectorEnv", "gymnasium AsyncVectorEnv", "shoal Serial",
           "shoal Multiprocessing", "shoal Multiprocessing async", "shoal Ray", "shoal Ray async",
           "shoal Multiprocessing, beside Ray", "shoal Multiprocessing async, beside Ray"]
BESIDE_RAY = {"shoal Ray": "shoal Multiprocessing, beside Ray", "shoal Ray async": "shoal Multiprocessing async, beside Ray"}


def build_runners(bench: Bench, cores: int, ray_phase: bool) -> dict[str, tuple[str, Callable, Callable]]:
    """runner name -> (layout, measure, close), all for ``bench.num_envs`` envs: the Ray runners, or all others."""
    n, multiagent = bench.num_envs, bench.creator is make_nested
    multiprocessing_specs = {
        "shoal Multiprocessing": (f"{cores} workers x {n // cores} envs", lambda: shoal_runner(
            Multiprocessing, bench, num_workers=cores, envs_per_worker=n // cores)),
        "shoal Multiprocessing async": (f"{cores} workers x {n // cores} envs, batch {n // 2}",
                                        lambda: shoal_runner(Multiprocessing, bench, num_workers=cores,
                                                             envs_per_worker=n // cores, batch_size=n // 2)),
    }
    if ray_phase:  # with Multiprocessing again, timed beside Ray in the same rounds: a fair comparison
        specs = {
            **{BESIDE_RAY[name]: spec for name, spec in zip(["shoal Ray", "shoal Ray async"],
                                                             multiprocessing_specs.values())},
            "shoal Ray": (f"{cores} actors x {n // cores} envs", lambda: shoal_runner(
                Ray, bench, num_workers=cores, envs_per_worker=n // cores)),
            "shoal Ray async": (f"{cores} actors x {n // cores} envs, batch {n // 2}", lambda: shoal_runner(
                Ray, bench, num_workers=cores, envs_per_worker=n // cores, batch_size=n // 2)),
        }
    else:
        specs = {
            "limit": (f"{cores} processes x {n // cores} raw envs",
                      lambda: limit_runner(bench, cores, emulated=False)),
            "limit (emulated)": (f"{cores} processes x {n // cores} envs",
                                 lambda: limit_runner(bench, cores, emulated=True)),
            "gymnasium SyncVectorEnv": (f"{n} envs", lambda: gymnasium_runner(
                gymnasium.vector.SyncVectorEnv, bench, multiagent)),
            "gymnasium AsyncVectorEnv": (f"{n} processes x 1 env", lambda: gymnasium_runner(
                gymnasium.vector.AsyncVectorEnv, bench, multiagent, context="forkserver")),
            "shoal Serial": (f"1 x {n} envs", lambda: shoal_runner(Serial, bench, envs_per_worker=n)),
            **multiprocessing_specs,
        }
    return {name: (layout, *build()) for name, (layout, build) in specs.items()}


def measure_phase(bench: Bench, cores: int, config: Config, ray_phase: bool) -> dict[str, tuple[str, list[float]]]:
    """runner name -> (layout, env steps/s of each round) for one phase's runners, timed in interleaved rounds."""
    runners = build_runners(bench, cores, ray_phase)
    rates: dict[str, list[float]] = {runner: [] for runner in runners}
    try:
        for measure in [measure for _, measure, _ in runners.values()]:
            measure(min(0.5, config.seconds))  # warm-up
        for round_ in range(config.rounds):  # interleaved, so every runner sees the same machine load
            for runner, (_, measure, _) in runners.items():
                rates[runner].append(measure(config.seconds))
            print(f"  round {round_ + 1}: " + ", ".join(f"{r} {v[-1]:,.0f}" for r, v in rates.items()),
                  file=sys.stderr, flush=True)
    finally:
        for _, _, close in runners.values():
            close()
    return {runner: (runners[runner][0], rates[runner]) for runner in runners}


def cpu_ticks() -> tuple[int, int] | None:
    """(busy, stolen) clock ticks of this machine so far (Linux): stolen is time the hypervisor gave to
    other VMs while ours wanted to run, which slows runners with many processes the most."""
    try:
        with open("/proc/stat") as stat:
            user, nice, system, _, _, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return user + nice + system + irq + softirq, steal


def main(config: Config) -> None:
    cores = config.cores or default_num_workers()
    ticks = cpu_ticks()
    table = []  # (env, runner, phase, layout, env steps/s of each round)
    for name in config.envs:
        bench = BENCHES[name]
        if config.num_envs:
            bench = dataclasses.replace(bench, num_envs=config.num_envs)
        print(f"{bench.label}: {bench.num_envs} envs, {cores} cores", file=sys.stderr, flush=True)
        results = measure_phase(bench, cores, config, ray_phase=False)
        if config.ray:
            # Ray's own processes (GCS, raylet) use CPU while they run: start Ray only for its rows, so
            # they do not slow the other runners' rows on a small machine.
            import ray

            ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
            try:
                results.update(measure_phase(bench, cores, config, ray_phase=True))
            finally:
                ray.shutdown()
        phases = {runner: "ray" if runner in BESIDE_RAY or runner in BESIDE_RAY.values() else "main"
                  for runner in results}
        table += [(bench.label, runner, phases[runner], *results[runner]) for runner in RUNNERS if runner in results]
    print_table(table, cores, config)
    if ticks and (end := cpu_ticks()):
        busy, stolen = end[0] - ticks[0], end[1] - ticks[1]
        print(f"\nStolen by the hypervisor during this run: {stolen / max(busy + stolen, 1):.0%} of the CPU time this "
              f"machine wanted (above a few percent, other VMs were busy: the ratios are less reliable)")


def print_table(table: list, cores: int, config: Config) -> None:
    rounds = {(env, runner): (phase, rates) for env, runner, phase, _, rates in table}

    def ratio(env: str, runner: str, baseline: str) -> str:
        if (env, baseline) not in rounds:
            return "-"
        (phase, rates), (base_phase, base_rates) = rounds[env, runner], rounds[env, baseline]
        if phase == base_phase:  # timed in the same rounds: the median of the ratios within each round
            return f"{statistics.median(a / b for a, b in zip(rates, base_rates)):.2f}x"
        return f"{statistics.median(rates) / statistics.median(base_rates):.2f}x"

    print(f"\nshoal.vector: env steps per second (higher is better), median of {config.rounds} interleaved rounds of "
          f"{config.seconds:g} s; ratios: median of the per-round ratios; {cores} cores ({os.cpu_count()} visible)\n")
    print("| env | runner | layout | steps/s | vs limit | vs emulated limit | vs gym Async | vs shoal Serial | "
          "Ray vs Multiprocessing beside it |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for env, runner, _, layout, rates in table:
        beside = ratio(env, runner, BESIDE_RAY[runner]) if runner in BESIDE_RAY else ""
        print(f"| {env} | {runner} | {layout} | {statistics.median(rates):,.0f} | {ratio(env, runner, 'limit')} | "
              f"{ratio(env, runner, 'limit (emulated)')} | {ratio(env, runner, 'gymnasium AsyncVectorEnv')} | "
              f"{ratio(env, runner, 'shoal Serial')} | {beside} |")


if __name__ == "__main__":
    main(tyro.cli(Config))
