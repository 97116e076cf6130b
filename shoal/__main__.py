"""The ``shoal`` command's entry point (also ``python -m shoal``): :func:`shoal.cli.main`, imported here so that
a Ctrl-C in the seconds its imports take (torch) ends the command as any other interrupt does, not with a
traceback."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shoal`` command; returns its exit status (130 when interrupted while it starts)."""
    try:
        from shoal.cli import main as run
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
