"""Checkpoints: written atomically, found again by run directory, loaded with clear errors.

A checkpoint is one ``torch.save`` file holding the model, the optimizer, the config, the global
step and every RNG state. It is written to a temporary file in the same directory, flushed to disk,
and renamed over its final name (``os.replace`` is atomic on POSIX), so a run killed mid-write
leaves the previous checkpoint intact and never a half-written one under a checkpoint's name.

Layout: ``RUN_DIR/checkpoints/update_000050.pt`` ... the newest is the one with the highest number.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.errors import APIUsageError, check_int

FORMAT = "shoal-checkpoint-1"
_NAME = re.compile(r"^update_(\d+)\.pt$")


def save_atomic(payload: dict, path: str | os.PathLike) -> Path:
    """``torch.save(payload)`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def rng_states() -> dict:
    """The state of every RNG training touches (Python, numpy, torch, CUDA when present)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    if not (isinstance(states, dict) and {"python", "numpy", "torch"} <= states.keys()):
        got = sorted(states) if isinstance(states, dict) else type(states).__name__
        raise APIUsageError(f"set_rng_states takes what rng_states() returned, a dict with python, numpy and torch "
                            f"states (and cuda where present), got {got}")
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, update: int, payload: dict, keep: int = 3) -> Path:
    """Write ``payload`` as ``RUN_DIR/checkpoints/update_{update:06d}.pt``; keep the newest ``keep``."""
    check_int("save_checkpoint: update", update, minimum=0)
    keep = check_int("save_checkpoint: keep (0 keeps every checkpoint)", keep, minimum=0)
    if not isinstance(payload, dict):
        raise APIUsageError(f"save_checkpoint: payload must be a dict, got {type(payload).__name__}")
    directory = Path(run_dir) / "checkpoints"
    path = save_atomic({"format": FORMAT, **payload}, directory / f"update_{update:06d}.pt")
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest first (temporary files of interrupted writes are ignored)."""
    return [path for _, path in _numbered_checkpoints(run_dir)]


def _numbered_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(update, path) of each of the run's checkpoints, oldest first."""
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted((int(match.group(1)), path) for path in directory.iterdir() if (match := _NAME.match(path.name)))


def check_run_dir(run_dir: str | os.PathLike, resumed_update: int | None) -> None:
    """Before a run writes checkpoints into ``run_dir``: APIUsageError unless those there are its own past.

    A new run (``resumed_update`` None) needs a directory without checkpoints; a resumed one refuses
    checkpoints beyond the one it resumes from (the two histories would mix, and pruning would delete
    the new ones), except a damaged one that :func:`load_checkpoint` skipped: it is renamed
    ``*.damaged``, with a warning, so the run's new checkpoints are the newest. A resumed run removes the
    temporary files of checkpoint writes the killed run left unfinished.
    """
    found = _numbered_checkpoints(run_dir)
    if resumed_update is None:
        if found:
            raise APIUsageError(f"run_dir {str(run_dir)!r} already holds checkpoints of an earlier run (newest "
                                f"{found[-1][1].name}): resume it (resume_from=..., shoal train --resume {run_dir}) "
                                f"or choose a new run_dir")
        return
    for update, path in found:
        if update <= resumed_update:
            continue
        try:
            _load_file(path, "cpu")
        except APIUsageError as error:
            os.replace(path, path.with_name(path.name + ".damaged"))
            warnings.warn(f"{error}: renamed it {path.name}.damaged", stacklevel=2)
            continue
        raise APIUsageError(f"run_dir {str(run_dir)!r} holds {path.name}, newer than the checkpoint resumed from "
                            f"(update {resumed_update}): continue into a new run_dir (--run-dir), or delete the "
                            f"newer checkpoints")
    for stale in (Path(run_dir) / "checkpoints").glob(".update_*.tmp"):  # writes a killed run left unfinished
        stale.unlink(missing_ok=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest checkpoint of a run directory, or an error that says what was looked for."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise APIUsageError(f"run directory {str(run_dir)!r} does not exist: expected a directory made by `shoal train`")
    found = list_checkpoints(run_dir)
    if not found:
        raise APIUsageError(
            f"no checkpoint in {str(run_dir)!r}: expected files like checkpoints/update_000050.pt "
            f"(a run writes one every checkpoint_interval updates and at its end)"
        )
    return found[-1]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the newest one of a run directory that can be read (an older one,
    with a warning, if the newest is damaged)."""
    path = Path(path)
    if not path.is_dir():
        return _load_file(path, map_location)
    latest_checkpoint(path)  # the errors for a missing directory or one without checkpoints
    damaged = []
    for candidate in reversed(list_checkpoints(path)):
        try:
            payload = _load_file(candidate, map_location)
        except APIUsageError as error:
            damaged.append(str(error))
            continue
        if damaged:
            warnings.warn(f"{'; '.join(damaged)}: loaded the newest one that can be, {candidate}", stacklevel=2)
        return payload
    raise APIUsageError(damaged[0] + (f"; nor can the {len(damaged) - 1} older one(s)" if len(damaged) > 1 else ""))


def _load_file(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise APIUsageError(f"{str(path)!r} does not exist: expected a checkpoint (.pt) or a run directory written "
                            f"by shoal train")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # a foreign or damaged file: say which, and what it is not
        raise APIUsageError(f"checkpoint {str(path)!r} cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise APIUsageError(f"{str(path)!r} is not a shoal checkpoint: expected format {FORMAT!r}")
    payload["path"] = str(path)
    return payload
