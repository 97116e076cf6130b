"""Train an Atari game with shoal's PPO for a step budget and write its learning curve.

    python benchmarks/atari.py --game Breakout --steps 1000000
    python benchmarks/atari.py --game Pong --steps 10000000 --backend multiprocessing

Settings are CleanRL's ``ppo_atari.py`` (shoal's Atari preset: 8 envs x 128 steps, 4 minibatches,
4 epochs, clip 0.1, lr 2.5e-4 annealed over the budget) with the standard preprocessing of
``shoal.envs.atari``. Returns are real game scores (all lives, unclipped), the quantity CleanRL
reports: ``ppo_atari`` reaches 415 ± 28 on Breakout and 20.4 on Pong at 10M steps (agent steps x 4
frames = 40M frames). Writes ``OUT/progress.csv``, ``OUT/curve.png`` and prints one table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

CLEANRL_10M = {"Breakout": "415 ± 28", "Pong": "20.4"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", default="Breakout", help="ALE game name (Breakout, Pong, ...)")
    parser.add_argument("--steps", type=int, default=1_000_000, help="agent steps (x4 frames)")
    parser.add_argument("--backend", default="multiprocessing", choices=["serial", "multiprocessing", "ray"])
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--envs-per-batch", type=int, default=0, help="0: synchronous; num_envs/2: double-buffered")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="run directory (default runs/atari_<game>_<time>)")
    parser.add_argument("--dashboard", action="store_true", help="show the live dashboard")
    args = parser.parse_args()

    from shoal.envs import make_binding, preset
    from shoal.logging import plot_runs, read_progress
    from shoal.ppo import PPOConfig, train

    out = Path(args.out or f"runs/atari_{args.game}_{time.strftime('%Y%m%d-%H%M%S')}")
    env = f"atari:{args.game}"
    config = PPOConfig(**{**preset(env), "env": env, "total_timesteps": args.steps, "backend": args.backend,
                          "num_envs": args.num_envs, "envs_per_batch": args.envs_per_batch, "device": args.device,
                          "seed": args.seed, "run_dir": str(out), "dashboard": args.dashboard})
    result = train(config, make_binding(env))
    curve = plot_runs([out], out / "curve.png", metric="episode/return_mean20")
    rows = read_progress(out)
    best = max((row.get("episode/return_mean20", float("-inf")) for row in rows), default=float("nan"))
    print(f"\n{args.game}: {result.global_step:,} agent steps ({4 * result.global_step:,} frames) in "
          f"{result.wall_time / 60:.1f} min, {result.steps_per_second:,.0f} steps/s on {config.backend} x "
          f"{config.num_envs} envs\n")
    print("| game | agent steps | mean return, last 20 games | best 20-game mean | CleanRL ppo_atari @ 10M |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| {args.game} | {result.global_step:,} | {result.mean_return():.1f} | {best:.1f} | "
          f"{CLEANRL_10M.get(args.game, '–')} |")
    print(f"\ncurve: {curve}   log: {out / 'progress.csv'}")


if __name__ == "__main__":
    main()
