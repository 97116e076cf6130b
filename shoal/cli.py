"""The ``shoal`` command: ``train``, ``eval`` and ``plot``.

    shoal train                                  # CartPole to solved, with the live dashboard
    shoal train --env atari:Breakout             # CleanRL's Atari settings
    shoal train --env gym:Acrobot-v1 --backend multiprocessing --num-envs 8
    shoal train --resume runs/cartpole__1__20250101-120000 --total-timesteps 200000 --stop-at-return None
    shoal eval runs/cartpole__1__20250101-120000 --episodes 20
    shoal plot runs/a runs/b --out curves.png

``shoal train``'s flags are generated from :class:`shoal.ppo.PPOConfig`; their defaults are the
env's preset (``shoal.envs.preset``), so ``--help`` after ``--env`` shows what will run.
Bad input gets one message and exit status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import math
import os
import re
import select
import shlex
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Sequence

import tyro

from shoal.__main__ import no_command_status
from shoal.errors import ShoalError, stdout_to_devnull
from shoal.ppo import PPOConfig


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's preemption or time limit): the run stops as on Ctrl-C, with a checkpoint."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


class UsageError(ShoalError):
    """Bad command-line input."""


@dataclass
class TrainArgs:
    """Train a policy with PPO. Defaults come from the env's preset (see shoal.envs.PRESETS)."""

    config: Annotated[PPOConfig, tyro.conf.OmitArgPrefixes]
    resume: str | None = None
    """continue a run: its directory (from its newest checkpoint) or one checkpoint file; its config, unless flags override it"""


@dataclass
class EvalArgs:
    """Play episodes with a trained policy and print return statistics."""

    checkpoint: tyro.conf.Positional[str]
    """a checkpoint file, or a run directory (its newest checkpoint)"""
    episodes: int = 10
    """episodes to play (on a multi-agent env, agent-episodes: each agent's episode counts as one)"""
    deterministic: bool = False
    """take the most likely action instead of sampling"""
    env: str | None = None
    """evaluate on this env instead of the one trained on (its spaces must match)"""
    seed: int = 0
    """seed of the env and the action sampling"""
    device: str = "cpu"
    """torch device"""
    max_steps: int = 100_000
    """stop after this many env steps, even if fewer episodes ended (an env without a time limit)"""


@dataclass
class PlotArgs:
    """Draw learning curves (one line per run) into a PNG."""

    run_dirs: tyro.conf.Positional[tuple[str, ...]]
    """run directories written by `shoal train` (or their progress.csv files)"""
    out: str = "learning_curves.png"
    """the PNG to write"""
    metric: str = "episode/return_mean20"
    """a progress.csv column to plot against global_step"""


def _flag(name: str, value) -> str:
    """The flag that sets config field ``name`` to ``value``: ``--hidden-size``, ``--lstm``, ``--no-lstm``."""
    return f"--{'no-' if value is False else ''}{name.replace('_', '-')}"


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in argv (the last one wins), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _make_default_run_dir(env: str, seed: int) -> str:
    """Make ``runs/<env>__<seed>__<time>`` and return it; while that name is taken (a run started in the same
    second), the first free one of ``..._2``, ``..._3`` ... Made exclusively, so two runs never get one name."""
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in env)
    name = f"{slug}__{seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        Path("runs").mkdir(exist_ok=True)
    except FileExistsError:  # a file named runs: say that, not "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "runs") from None
    for number in itertools.count(1):
        run_dir = Path("runs") / (name if number == 1 else f"{name}_{number}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return str(run_dir)


def _network(config: PPOConfig, binding) -> tuple:
    """The default policy ``config`` builds for ``binding``: its class and parameter shapes (sized on the meta
    device, nothing allocated)."""
    import torch

    from shoal.ppo import make_policy

    with torch.device("meta"):
        policy = make_policy(config, binding)
    return type(policy).__name__, [(name, tuple(parameter.shape)) for name, parameter in policy.named_parameters()]


def _is_run_dir(directory: Path, checkpoint: dict) -> bool:
    """Whether a checkpoint's file lies in the checkpoints/ of a run directory of its run: one whose config.json
    names its env (not any folder that keeps checkpoints/)."""
    try:
        config = json.loads((directory / "config.json").read_text())
        inside = (directory / "checkpoints").samefile(Path(checkpoint["path"]).parent)
    except (OSError, ValueError):
        return False
    return inside and isinstance(config, dict) and config.get("env") == checkpoint["env"]


def _run_binding(checkpoint: dict):
    """The binding of the checkpoint's env, built with the keyword arguments the run's binding had
    (``make_binding("atari:Breakout", frame_skip=2)`` in Python), not with the env's defaults."""
    from shoal.envs import make_binding
    from shoal.spaces import _short

    env_kwargs = checkpoint.get("env_kwargs", {})  # absent from checkpoints written before it was recorded
    if env_kwargs is None:
        raise UsageError(f"{checkpoint['path']}: the run's env {checkpoint['env']!r} was built with keyword "
                         f"arguments a checkpoint cannot hold (not numbers, strings, lists or dicts of them), so the "
                         f"shoal command cannot build it again: go on in Python with that binding (train(..., "
                         f"resume_from=...)), or play it with shoal eval --env NAME")
    if not (isinstance(env_kwargs, dict) and all(isinstance(key, str) for key in env_kwargs)):
        raise UsageError(f"{checkpoint['path']} holds env_kwargs {_short(env_kwargs)}: expected a dict of keyword "
                         f"arguments by name, as train() records them")
    if not env_kwargs:
        return make_binding(checkpoint["env"])
    try:
        return make_binding(checkpoint["env"], **env_kwargs)
    except ShoalError as error:  # a binding of the run's own, not one of this name's (or the env changed since)
        raise UsageError(f"{checkpoint['path']}: the run's binding had env_kwargs {_short(env_kwargs)}, with "
                         f"which {checkpoint['env']!r} cannot be built ({error}). A run given a binding of its own "
                         f"in Python goes on in Python with it (train(..., resume_from=...)); shoal eval --env NAME "
                         f"plays it on any env of its spaces") from None


def _train(argv: list[str]) -> int:
    from shoal.checkpoint import list_checkpoints, load_checkpoint
    from shoal.envs import check_env_name, make_binding, preset
    from shoal.ppo import POLICY_FIELDS, config_from_checkpoint, train

    resume = _flag_value(argv, "--resume")
    checkpoint = None
    if resume is not None:
        checkpoint = load_checkpoint(resume)  # a run directory's newest, or the file given
        # The run goes on in the checkpoint's run directory; a file kept elsewhere starts a new one.
        given = Path(checkpoint["path"])
        directory = Path(os.path.abspath(given)).parent.parent  # also for a file named from inside checkpoints/
        if not given.is_absolute():
            directory = Path(os.path.relpath(directory))  # as it was spelled: from here
        run_dir = str(directory) if _is_run_dir(directory, checkpoint) else None
        default = dataclasses.replace(config_from_checkpoint(checkpoint), run_dir=run_dir)
    else:
        env = _flag_value(argv, "--env") or PPOConfig.env
        check_env_name(env)
        default = PPOConfig(env=env, **preset(env))
    args = tyro.cli(TrainArgs, default=TrainArgs(config=default), args=argv, prog="shoal train")
    config = args.config
    if checkpoint is not None and config.env != checkpoint["env"]:
        raise UsageError(f"--resume {resume}: that run trained on env {checkpoint['env']!r}, not {config.env!r}; "
                         f"drop --env or start a new run")
    config.validate()
    binding = make_binding(config.env) if checkpoint is None else _run_binding(checkpoint)
    trained = None if checkpoint is None else config_from_checkpoint(checkpoint)
    changed = "" if trained is None else ", ".join(_flag(name, getattr(config, name)) for name in POLICY_FIELDS
                                                   if getattr(config, name) != getattr(trained, name))
    if changed:  # (a run of a policy of its own is told apart when its weights load: load_policy_state)
        try:
            why = "" if _network(config, binding) == _network(trained, binding) else "another network than the run's"
        except ShoalError as error:  # a policy kind these observations cannot have
            why = f"no network ({error})"
        if why:
            built = ", ".join(f"{name}={getattr(trained, name)!r}" for name in POLICY_FIELDS)
            raise UsageError(f"--resume {resume}: {changed} would build {why}; the run's was built with {built}: "
                             f"drop {changed} or start a new run")
    made_run_dir = config.run_dir is None
    made_runs = made_run_dir and not Path("runs").exists()
    if made_run_dir:
        config.run_dir = _make_default_run_dir(config.env, config.seed)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set a signal handler
    on_term = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        result = train(config, binding, resume_from=checkpoint)  # the checkpoint as loaded: damage is told once
    except (KeyboardInterrupt, BrokenPipeError) as error:  # train wrote a final checkpoint: say where, how to go on
        why, status = (("terminated (SIGTERM)", 143) if isinstance(error, Terminated)
                       else ("interrupted", 130) if isinstance(error, KeyboardInterrupt)
                       else (f"error: {'stdout was closed (broken pipe)' if _stdout_closed() else error}: the run "
                             f"stopped", 2))
        saved = list_checkpoints(config.run_dir)
        if not saved:
            _to_stderr(f"shoal train: {why} before a checkpoint was written ({config.run_dir})")
            return status
        last = load_checkpoint(saved[-1])
        _to_stderr(f"shoal train: {why}; checkpoint at step {last['global_step']:,} of {config.total_timesteps:,} "
                   f"(update {last['update']}): {saved[-1]}\n"
                   f"resume with: shoal train --resume {shlex.quote(config.run_dir)}")
        return status
    except BaseException:
        if made_run_dir:
            with contextlib.suppress(OSError):  # only while empty: a run refused before it wrote anything
                Path(config.run_dir).rmdir()
                if made_runs:
                    Path("runs").rmdir()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, on_term)
    resumed_at = result.start_step  # this call's steps and time only: say from where
    reached = result.first_reached(475.0) if config.env == "cartpole" and not resumed_at else None
    # The run's own last 20 episodes, as progress.csv and the dashboard have them: across a resume too.
    recent = result.history[-1]["episode/return_mean20"] if result.history else math.nan
    print(f"trained {result.global_step - resumed_at:,} steps"
          + (f" (from step {resumed_at:,} to {result.global_step:,})" if resumed_at else "")
          + f" in {result.wall_time:.1f} s ({result.steps_per_second:,.0f} steps/s); "
          + (f"mean return of the last 20 episodes: {recent:.1f}" if not math.isnan(recent)
             else "no episode ended in this run")
          + (f"; first >= 475 at step {reached[0]:,} ({reached[1]:.1f} s)" if reached else ""))
    quoted = shlex.quote(config.run_dir)  # commands to copy: a path with spaces stays one argument
    tensorboard = (f" · tensorboard --logdir {shlex.quote(str(Path(config.run_dir).parent))}"
                   if config.tensorboard else "")
    print(f"run directory: {config.run_dir}   (shoal eval {quoted} · shoal plot {quoted}{tensorboard})")
    return 0


def _eval(argv: list[str]) -> int:
    import numpy as np

    from shoal.checkpoint import load_checkpoint
    from shoal.envs import make_binding
    from shoal.ppo import (check_compatible, check_default_policy, config_from_checkpoint, evaluate, load_policy_state,
                           make_policy, resolve_device)

    args = tyro.cli(EvalArgs, args=argv, prog="shoal eval")
    if args.episodes <= 0:
        raise UsageError(f"--episodes must be a positive integer, got {args.episodes}")
    if args.max_steps <= 0:
        raise UsageError(f"--max-steps must be a positive integer, got {args.max_steps}")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be an integer from 0 to 2**32 - 1, got {args.seed}")
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint)
    config = config_from_checkpoint(checkpoint)
    binding = make_binding(args.env) if args.env else _run_binding(checkpoint)
    check_compatible(checkpoint, binding, other_env=args.env is not None)
    check_default_policy(checkpoint)
    policy = make_policy(config, binding)
    load_policy_state(policy, checkpoint)
    returns = evaluate(policy, binding, episodes=args.episodes, seed=args.seed, deterministic=args.deterministic,
                       device=device, max_steps=args.max_steps)
    values = np.asarray(returns)
    episodes = "agent-episode" if binding.is_multiagent else "episode"  # evaluate counts each agent's own
    episodes += "s" * (len(values) != 1)
    if len(values) < args.episodes:
        episodes += f" (of {args.episodes:,} asked: the --max-steps {args.max_steps:,} steps ran out first)"
    print(f"{binding.env_name}: {len(values)} {episodes}, return {values.mean():.2f} ± {values.std():.2f} "
          f"(min {values.min():.2f}, max {values.max():.2f}) · checkpoint {checkpoint['path']} "
          f"(step {checkpoint['global_step']:,})")
    return 0


def _plot(argv: list[str]) -> int:
    from shoal.logging import plot_runs

    args = tyro.cli(PlotArgs, args=argv, prog="shoal plot")
    if not args.run_dirs:
        raise UsageError("shoal plot needs at least one run directory")
    out = plot_runs(args.run_dirs, args.out, metric=args.metric)
    print(f"wrote {out}")
    return 0


COMMANDS = {"train": _train, "eval": _eval, "plot": _plot}


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader is gone (or was, and stdout now leads to /dev/null)."""
    try:
        fd = sys.stdout.fileno()
        if os.path.samestat(os.fstat(fd), os.stat(os.devnull)):
            return True
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no descriptor behind sys.stdout
        return False


def _to_stderr(text: str) -> None:
    """Print ``text`` to stderr, which may be closed too (``shoal train 2>&1 | head``)."""
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shoal`` command; returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    status = no_command_status(argv)
    if status is not None:
        return status
    command, rest = argv[0], argv[1:]

    def show(message, category, *_) -> None:  # one line, not Python's file:line and source line of ours
        kind = "" if category is UserWarning else f"{category.__name__}: "
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(message))  # gymnasium colours its warnings, for a terminal
        _to_stderr(f"shoal {command}: warning: {kind}{text}")

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            status = COMMANDS[command](rest)
        sys.stdout.flush()  # a closed stdout shows here, not in Python's flush at exit
        return status
    except ShoalError as error:  # every error a user can cause: one message, no traceback
        print(f"shoal {command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError as error:
        if not _stdout_closed():  # an env's or a logger's own connection
            _to_stderr(f"shoal {command}: error: {error}")
            return 2
        stdout_to_devnull()  # the reader of stdout ended (shoal eval | head -1): nothing more goes there
        _to_stderr(f"shoal {command}: error: stdout was closed (broken pipe)")
        return 2
    except OSError as error:  # a path that cannot be written or read (a file where a directory goes, no permission)
        print(f"shoal {command}: error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shoal {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
