"""The ``shoal`` command's entry point (also ``python -m shoal``): usage and unknown commands answered at once,
then :func:`shoal.cli.main`, imported here so that a Ctrl-C in the seconds its imports take (torch) ends the
command as any other interrupt does once they are done, not with a traceback or an abort."""

from __future__ import annotations

import sys
from typing import Sequence

from shoal.errors import deferred_interrupt, stdout_to_devnull

COMMANDS = ("train", "eval", "plot")
USAGE = """usage: shoal {train,eval,plot} [options]

  train   train a policy with PPO (default: CartPole until solved)
  eval    play episodes with a checkpoint and print return statistics
  plot    draw learning curves of runs into a PNG

`shoal <command> --help` lists each command's options."""


def no_command_status(argv: list[str]) -> int | None:
    """For ``argv`` that names no command to run (nothing, ``--help``, an unknown one): print the usage and
    return the exit status; else None."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"shoal: error: unknown command {argv[0]!r}: expected train, eval or plot\n\n{USAGE}", file=sys.stderr)
        return 2
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shoal`` command; returns its exit status (130 when interrupted while it starts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = no_command_status(argv)
        sys.stdout.flush()  # a closed stdout shows here, not in Python's flush at exit
    except BrokenPipeError:  # shoal --help | true: the reader of stdout ended
        stdout_to_devnull()
        return 2
    if status is not None:
        return status
    try:
        with deferred_interrupt():  # torch's import aborts the process (SIGABRT) when a Ctrl-C cuts into it
            from shoal.cli import main as run
    except KeyboardInterrupt:
        print(f"shoal {argv[0]}: interrupted", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
