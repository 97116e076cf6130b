"""The errors shoal raises (every message says what was expected, what came, and where), the checks of
argument values they share, and holding a Ctrl-C back over steps it must not cut in two."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shlex
import signal
import sys
import threading
from typing import Any, Iterator

import numpy as np


class ShoalError(Exception):
    """Base class of every error shoal raises on purpose."""


class SpaceError(ShoalError):
    """A space shoal cannot handle, or a value that does not fit its space."""


class APIUsageError(ShoalError):
    """A call that breaks shoal's API: wrong argument, wrong shape, wrong order of calls."""


class EnvError(ShoalError):
    """The wrapped env broke its own contract (e.g. returned an observation outside its space)."""


class TrainingError(ShoalError):
    """Training cannot go on: the policy's losses or actions are no longer finite numbers."""


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer, Python's or numpy's (a bool is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number, Python's or numpy's (a bool is not)."""
    return is_int(value) or isinstance(value, (float, np.floating))


def check_int(what: str, value: Any, minimum: int = 1) -> int:
    """``int(value)`` if it is an integer >= ``minimum``; else APIUsageError naming ``what``."""
    if not is_int(value) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise APIUsageError(f"{what} must be {kind}, got {value!r}")
    return int(value)


class WorkerError(ShoalError):
    """An env failed inside a vectorization worker; the message carries the worker's traceback."""

    def __init__(self, message: str, worker_traceback: str = "", env_id: int | None = None):
        super().__init__(message + (f"\n\nWorker traceback:\n{worker_traceback}" if worker_traceback else ""))
        self.worker_traceback = worker_traceback
        self.env_id = env_id


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) back until the block is done, then deliver it to the handler as usual.

    For steps that an interrupt must not cut in two: starting a worker process (a half-started one
    would outlive its vec env), starting Ray, or importing torch (its C++ import code aborts the
    process). A second Ctrl-C during the block raises KeyboardInterrupt at once: a block that hangs
    (Ray waiting on an address) must not take the only way out. Off the main thread, which can set no
    handler (and never gets KeyboardInterrupt), the block just runs.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # (None: a handler set outside Python, which could not be put back)
        return
    held = []

    def hold(signum, frame) -> None:
        held.append(signum)
        if len(held) == 2:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if len(held) == 1:
            signal.raise_signal(signal.SIGINT)


def stdout_to_devnull() -> None:
    """Point stdout's file descriptor at /dev/null once its reader is gone: nothing more can go there, and
    Python's flush at exit must not fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no descriptor behind sys.stdout
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def install_hint(extra: str) -> str:
    """How to install shoal's extra ``extra``, for messages: pip with the extra's packages as the installed
    shoal's metadata lists them, and a checkout's ``./install.sh``, which pins the tested versions."""
    try:
        requirements = importlib.metadata.requires("shoal") or []
    except importlib.metadata.PackageNotFoundError:  # shoal on the path, not installed
        requirements = []
    packages = [shlex.quote(requirement.partition(";")[0].strip()) for requirement in requirements
                if f'extra == "{extra}"' in requirement]
    pip = f"pip install {' '.join(packages)}" if packages else f"pip install -e '.[{extra}]'"
    return f"{pip} (in a checkout of shoal: ./install.sh {extra})"
