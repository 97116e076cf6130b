"""What a pipe round trip costs on this machine, with no shoal code: the ceiling of any worker protocol.

    python benchmarks/pipe_ceiling.py            # about 2 minutes
    python benchmarks/pipe_ceiling.py --rounds 2

Two worker processes each hold raw ALE Breakout envs. "limit" steps them alone, with no
communication (the limit of benchmarks/vector.py). "sync" steps all of a worker's envs per message:
the worker sends one byte when done and waits for one byte back, which the parent sends at once, as
shoal's Multiprocessing does with a batch of one worker. "groups" splits each worker's envs into two
groups with a message each, so a worker can step one group while the parent answers the other.
Every runner is timed once per round; the table gives the median of each round's ratio to the limit.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from multiprocessing import connection


def make_breakout():
    import ale_py
    import gymnasium

    gymnasium.register_envs(ale_py)
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    return gymnasium.make("ALE/Breakout-v5")


def worker(conn, num_envs: int, groups: int, alone_seconds: float) -> None:
    """Step ``num_envs`` envs: alone for ``alone_seconds`` (answering with steps/s), else one group per message."""
    envs = [make_breakout() for _ in range(num_envs)]
    for env in envs:
        env.reset(seed=0)
    size = num_envs // groups

    def step(group_envs) -> None:
        for env in group_envs:
            _, _, terminal, truncation, _ = env.step(1)
            if terminal or truncation:
                env.reset()

    conn.send_bytes(b"ready")
    if alone_seconds:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < alone_seconds:
            step(envs)
            count += num_envs
        conn.send(count / (time.perf_counter() - start))
        return
    while (message := conn.recv_bytes()) != b"x":
        group = message[0]
        step(envs[group * size:(group + 1) * size])
        conn.send_bytes(bytes([group]))


def measure(num_envs: int, groups: int, seconds: float, alone: bool) -> float:
    """Env steps per second of 2 workers of ``num_envs`` envs each."""
    ctx = multiprocessing.get_context("forkserver")
    pipes, processes = [], []
    for _ in range(2):
        mine, theirs = ctx.Pipe()
        processes.append(ctx.Process(target=worker, args=(theirs, num_envs, groups, seconds if alone else 0),
                                     daemon=True))
        processes[-1].start()
        pipes.append(mine)
    for pipe in pipes:
        pipe.recv_bytes()
    if alone:
        rate = sum(pipe.recv() for pipe in pipes)
    else:
        for pipe in pipes:
            for group in range(groups):
                pipe.send_bytes(bytes([group]))
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for pipe in connection.wait(pipes):
                group = pipe.recv_bytes()
                count += num_envs // groups
                pipe.send_bytes(group)  # at once: the parent does nothing else
        rate = count / (time.perf_counter() - start)
        for pipe in pipes:
            pipe.send_bytes(b"x")
    for process in processes:
        process.join(10)
    return rate


RUNNERS = {  # name: (envs per worker, groups per worker, alone)
    "limit, 2 x 4 envs": (4, 1, True),
    "sync, 2 x 4 envs": (4, 1, False),
    "groups, 2 x 4 envs in 2 groups": (4, 2, False),
    "sync, 2 x 8 envs": (8, 1, False),
    "groups, 2 x 8 envs in 2 groups": (8, 2, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds; every runner is timed once per round")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds each runner is timed per round")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in RUNNERS}
    for _ in range(args.rounds):
        for name, (num_envs, groups, alone) in RUNNERS.items():
            rates[name].append(measure(num_envs, groups, args.seconds, alone))
    limit = rates["limit, 2 x 4 envs"]
    print(f"\nraw Breakout, 2 workers, no shoal code: median of {args.rounds} rounds\n")
    print("| runner | env steps/s | vs limit |")
    print("| --- | ---: | ---: |")
    for name, values in rates.items():
        ratio = statistics.median(value / base for value, base in zip(values, limit))
        print(f"| {name} | {statistics.median(values):,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
