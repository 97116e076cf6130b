"""shoal PPO against Stable-Baselines3 PPO on CartPole-v1: one run, one table.

    python benchmarks/ppo.py                      # everything (about 5 minutes on 2 cores)
    python benchmarks/ppo.py --throughput-steps 20000 --skip ray
    python benchmarks/ppo.py --sections a         # only the matched throughput rows

Rows:
  (a) throughput with matched hyper-parameters (same envs, rollout length, minibatch size, epochs,
      64x64 tanh actor and critic), a fixed step budget, no early stop, in three settings: CleanRL's
      defaults (4 envs x 128 steps, 4 epochs: the rollout dominates), rl-zoo's CartPole shape
      (8 envs x 32 steps, 20 epochs: the update dominates) and SB3's own PPO defaults on 4 envs
      (2048 steps, minibatch 64, 10 epochs, constant learning rate: 160 small gradient steps per
      1,000 env steps, the heaviest update);
  (b) steps and wall time until the mean return of the last 20 training episodes first reaches 475,
      each library with its best settings (shoal: its CartPole preset; SB3: rl-zoo's tuned CartPole);
  (c) shoal's CartPole preset on each vectorization backend.
Each measurement runs in a fresh process with torch limited to one thread (both libraries), and
every result is stated as a ratio to the SB3 row measured in the same run.
Needs `pip install -c constraints.txt stable-baselines3` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import deque

TARGET = 475.0
WINDOW = 20

# Matched settings, the same for both libraries: CleanRL's ppo.py defaults (a light update: the
# rollout dominates), rl-zoo's tuned CartPole shape (a heavy update: 20 epochs dominate) and SB3's
# PPO defaults on 4 envs (the heaviest update: many minibatches of 64). clip_vloss: the value loss is
# clipped around the old values as CleanRL does (SB3: clip_range_vf), or not, as SB3 and rl-zoo do.
MATCHED = {
    "cleanrl": dict(num_envs=4, num_steps=128, minibatch_size=128, epochs=4, learning_rate=2.5e-4, anneal_lr=True,
                    gamma=0.99, gae_lambda=0.95, ent_coef=0.01, clip=0.2, clip_vloss=True),
    "rl-zoo": dict(num_envs=8, num_steps=32, minibatch_size=256, epochs=20, learning_rate=1e-3, anneal_lr=True,
                   gamma=0.98, gae_lambda=0.8, ent_coef=0.0, clip=0.2, clip_vloss=False),
    "sb3-defaults": dict(num_envs=4, num_steps=2048, minibatch_size=64, epochs=10, learning_rate=3e-4,
                         anneal_lr=False, gamma=0.99, gae_lambda=0.95, ent_coef=0.0, clip=0.2, clip_vloss=False),
}


# ---------------------------------------------------------------- one measurement per process


def _shoal(kind: str, seed: int, steps: int, backend: str = "serial", envs_per_batch: int = 0) -> dict:
    import torch

    from shoal.envs import make_binding, preset
    from shoal.ppo import PPOConfig, train

    torch.set_num_threads(1)
    common = dict(seed=seed, dashboard=False, tensorboard=False, backend=backend, envs_per_batch=envs_per_batch)
    if kind in MATCHED:
        m = MATCHED[kind]
        config = PPOConfig(**common, num_envs=m["num_envs"], num_steps=m["num_steps"], update_epochs=m["epochs"],
                           num_minibatches=m["num_envs"] * m["num_steps"] // m["minibatch_size"],
                           learning_rate=m["learning_rate"], anneal_lr=m["anneal_lr"], gamma=m["gamma"],
                           gae_lambda=m["gae_lambda"], ent_coef=m["ent_coef"], clip_coef=m["clip"],
                           clip_vloss=m["clip_vloss"], total_timesteps=steps)
    else:  # best settings: the preset `shoal train` uses, stopping at the target
        config = PPOConfig(**{**preset("cartpole"), **common, "total_timesteps": steps})
    started, cpu = time.perf_counter(), time.process_time()
    result = train(config, make_binding("cartpole"))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    reached = result.first_reached(TARGET, WINDOW)
    loop_sps = result.history[-1]["perf/steps_per_second"]  # from the first rollout on: setup excluded
    return dict(steps=result.global_step, seconds=elapsed, sps=loop_sps, cpu_seconds=cpu,
                reached=reached and [reached[0], reached[1]])


def _sb3(kind: str, seed: int, steps: int) -> dict:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import Logger

    torch.set_num_threads(1)

    class Target(BaseCallback):
        """Stops when the mean return of the last 20 finished training episodes reaches the target."""

        def __init__(self, stop: bool):
            super().__init__()
            self.returns: deque = deque(maxlen=WINDOW)
            self.reached = None
            self.stop = stop
            self.started = self.loop_started = time.perf_counter()

        def _on_training_start(self) -> None:
            self.loop_started = time.perf_counter()

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    self.returns.append(info["episode"]["r"])
                    if self.reached is None and len(self.returns) == WINDOW and sum(self.returns) / WINDOW >= TARGET:
                        self.reached = [self.num_timesteps, time.perf_counter() - self.started]
            return not (self.stop and self.reached)

    def linear(start: float):
        return lambda progress_remaining: progress_remaining * start

    m = MATCHED.get(kind, MATCHED["rl-zoo"])
    kwargs = dict(n_steps=m["num_steps"], batch_size=m["minibatch_size"], n_epochs=m["epochs"], gamma=m["gamma"],
                  gae_lambda=m["gae_lambda"], ent_coef=m["ent_coef"], seed=seed, device="cpu", verbose=0)
    if kind in MATCHED:
        kwargs.update(learning_rate=linear(m["learning_rate"]) if m["anneal_lr"] else m["learning_rate"],
                      clip_range=m["clip"], clip_range_vf=m["clip"] if m["clip_vloss"] else None)
    else:  # rl-zoo's tuned CartPole-v1 (hyperparams/ppo.yml): the above plus linear clip-range decay
        kwargs.update(learning_rate=linear(1e-3), clip_range=linear(0.2))
    started, cpu = time.perf_counter(), time.process_time()
    env = make_vec_env("CartPole-v1", n_envs=m["num_envs"], seed=seed)
    model = PPO("MlpPolicy", env, **kwargs)
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default makes a /tmp/SB3-* folder every run
    callback = Target(stop=kind == "best")
    callback.started = started
    model.learn(total_timesteps=steps, callback=callback)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    loop_sps = model.num_timesteps / (time.perf_counter() - callback.loop_started)  # setup excluded
    return dict(steps=model.num_timesteps, seconds=elapsed, sps=loop_sps, cpu_seconds=cpu, reached=callback.reached)


def measure(job: tuple) -> dict:
    """Run one measurement in a fresh Python process (clean imports, thread settings, memory)."""
    done = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measurement {job} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--throughput-steps", type=int, default=50_000, help="steps per throughput row (a)")
    parser.add_argument("--solve-budget", type=int, default=200_000, help="step budget of the time-to-475 rows")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds for the time-to-475 rows")
    parser.add_argument("--skip", default="", help="comma-separated rows to skip: sb3, multiprocessing, ray")
    parser.add_argument("--sections", default="abc", help="which sections to run: any of a, b, c")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each row keeps its best")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one measurement, print its JSON
    args = parser.parse_args()
    if args.job:
        library, *job = json.loads(args.job)
        print(json.dumps(_shoal(*job) if library == "shoal" else _sb3(*job)))
        return
    seeds = [int(seed) for seed in args.seeds.split(",")]
    skip = set(filter(None, args.skip.split(",")))

    # Every row: (section, name, job, the name of its SB3 baseline row or None).
    plan: list[tuple[str, str, list, str | None]] = []
    for setting in MATCHED if "a" in args.sections else []:  # (a) matched hyper-parameters, fixed budget
        base = None if "sb3" in skip else f"SB3 PPO, DummyVecEnv [{setting}]"
        if base:
            plan.append(("a", base, ["sb3", setting, None, args.throughput_steps], None))
        plan.append(("a", f"shoal PPO, serial [{setting}]", ["shoal", setting, None, args.throughput_steps], base))
        if "multiprocessing" not in skip:
            half = MATCHED[setting]["num_envs"] // 2
            plan.append(("a", f"shoal PPO, multiprocessing x2, double-buffered [{setting}]",
                         ["shoal", setting, None, args.throughput_steps, "multiprocessing", half], base))
    base = None if "sb3" in skip or "b" not in args.sections else "SB3 PPO, rl-zoo tuned"  # (b) best settings
    if base:
        plan.append(("b", base, ["sb3", "best", None, args.solve_budget], None))
    if "b" in args.sections:
        plan.append(("b", "shoal PPO, `shoal train` preset", ["shoal", "best", None, args.solve_budget], base))
    for backend, envs_per_batch, name in [("serial", 4, "serial, double-buffered"),  # (c) each backend
                                          ("multiprocessing", 0, "multiprocessing x2"),
                                          ("multiprocessing", 4, "multiprocessing x2, double-buffered"),
                                          ("ray", 0, "ray x2")]:
        if backend not in skip and "c" in args.sections:
            plan.append(("c", f"shoal PPO, {name}", ["shoal", "best", None, args.solve_budget, backend, envs_per_batch],
                         base))

    # Rounds interleave the rows, so a burst of load from elsewhere hits all of them alike; each row
    # keeps its best round (the least disturbed), seed by seed.
    results: dict[str, dict[int, list[dict]]] = {name: {seed: [] for seed in seeds} for _, name, _, _ in plan}
    for round_ in range(args.repeats):
        for section, name, job, _ in plan:
            for seed in (seeds if section != "a" else seeds[:1]):
                result = measure([job[0], job[1], seed, *job[3:]])
                results[name][seed].append(result)
                print(json.dumps({"round": round_, "row": name, "seed": seed, **result}), flush=True)
    rows = []
    for section, name, _, base in plan:
        best = [max(runs, key=lambda r: r["sps"]) if section == "a" else min(runs, key=lambda r: r["seconds"])
                for runs in results[name].values() if runs]
        rows.append((section, name, _merge(best), base))
    by_name = {name: merged for _, name, merged, _ in rows}

    print()
    print(f"CartPole-v1, torch 1 thread per process, seeds {args.seeds}, best of {args.repeats} interleaved rounds. "
          f"steps/s: the training loop (setup excluded); seconds to 475: from the call, setup included. Matched: "
          + "; ".join(f"{name} {json.dumps(m)}" for name, m in MATCHED.items()))
    print("| row | run | steps/s | vs SB3 | steps to 475 | seconds to 475 | speed vs SB3 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for section, name, r, base_name in rows:
        base = by_name.get(base_name)
        ratio_sps = f"{r['sps'] / base['sps']:.2f}x" if base else "–"
        steps_to, seconds_to = r.get("reached_steps"), r.get("reached_seconds")
        ratio_time = (f"{base['reached_seconds'] / seconds_to:.2f}x" if base and seconds_to
                      and base.get("reached_seconds") and section != "a" else "–")
        print(f"| {section} | {name} | {r['sps']:,.0f} | {ratio_sps} | "
              f"{f'{steps_to:,.0f}' if steps_to else '–'} | {f'{seconds_to:.1f}' if seconds_to else '–'} | {ratio_time} |")


def _merge(results: list[dict]) -> dict:
    """Means over seeds; a seed that never reached the target makes the time-to-target missing."""
    merged = {key: sum(r[key] for r in results) / len(results) for key in ("steps", "seconds", "sps")}
    if all(r["reached"] for r in results):
        merged["reached_steps"] = sum(r["reached"][0] for r in results) / len(results)
        merged["reached_seconds"] = sum(r["reached"][1] for r in results) / len(results)
    merged["seeds_reached"] = sum(bool(r["reached"]) for r in results)
    return merged


if __name__ == "__main__":
    main()
