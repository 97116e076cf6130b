"""Checkpoints: written atomically, found again by run directory, loaded with clear errors.

A checkpoint is one ``torch.save`` file holding the model, the optimizer, the config, the global
step and every RNG state. It is written to a temporary file in the same directory, flushed to disk,
and renamed over its final name (``os.replace`` is atomic on POSIX), so a run killed mid-write
leaves the previous checkpoint intact and never a half-written one under a checkpoint's name.

Layout: ``RUN_DIR/checkpoints/update_000050.pt`` ... the newest is the one with the highest number.
One run at a time writes into a run directory: :func:`lock_run_dir`.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import random
import re
import shlex
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import torch

from shoal.errors import APIUsageError, TrainingError, check_int

FORMAT = "shoal-checkpoint-1"
# What a checkpoint holds besides tensors and plain Python values: numpy's RNG state, an array of one of numpy's
# dtypes. torch.load allows these and no other callable, so a foreign file cannot run code while it is read.
_NUMPY_GLOBALS = [np.ndarray, np.dtype, np.core.multiarray._reconstruct, np.core.multiarray.scalar,
                  *{type(np.dtype(code)) for code in np.typecodes["All"]}]
_NAME = re.compile(r"^update_(\d+)\.pt$")


@contextlib.contextmanager
def replaced_atomically(path: Path, mode: str = "wb", **open_args: Any) -> Iterator[IO]:
    """A temporary file (``.<name>.*.tmp`` beside ``path``) to write ``path``'s new content into; it replaces
    ``path`` in one rename when the block ends, or is removed if the block fails, leaving ``path`` as it was.
    The file keeps ``path``'s mode, or gets the one ``open`` gives a new file (mkstemp's is private, 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if path.exists():
            shutil.copymode(path, tmp)
        else:
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode, **open_args) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.errno is not None and error.filename is None:  # a write names no file
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def save_atomic(payload: dict, path: str | os.PathLike) -> Path:
    """``torch.save(payload)`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as file:
        try:
            torch.save(payload, file)
        except RuntimeError as error:  # torch's zip writer, closing after a failed write, hides its error by its own
            if isinstance(error.__context__, (OSError, KeyboardInterrupt)):
                raise error.__context__ from None
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
    if not Path(run_dir).is_dir():  # made by the run: gone means deleted under it, with its progress.csv
        raise TrainingError(f"run directory {str(run_dir)!r} is gone (deleted while the run went on?): its "
                            f"checkpoint of update {update} has nowhere to go, and its progress.csv went with it")
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


@contextlib.contextmanager
def lock_run_dir(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (made if missing) while the block runs; APIUsageError if another run
    holds it.

    The lock is ``flock`` on the directory itself, so it leaves no file behind and ends with the process, however
    that dies. ``run_dir``, if made here and still empty at the end (the run was refused before writing), is
    removed, with the folders above it that were made for it.
    """
    run_dir = Path(run_dir)
    missing = list(itertools.takewhile(lambda folder: not folder.exists(), [run_dir, *run_dir.parents]))
    while True:
        try:
            run_dir.mkdir(parents=True)
            made = True
        except FileExistsError:
            made = False
        descriptor = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)  # a file there: NotADirectoryError
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise APIUsageError(f"another run is using run_dir {str(run_dir)!r} (it holds the directory's lock): "
                                f"wait until it ends, or choose another run_dir") from None
        try:  # locked the directory that is there now, not one a refused run removed meanwhile?
            if os.path.samestat(os.fstat(descriptor), os.stat(run_dir)):
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)
    try:
        yield
    finally:
        if made:
            for folder in missing:  # run_dir first, while still locked: no other run can be inside it yet
                try:
                    folder.rmdir()
                except OSError:  # as it should, once the run (or anything else) wrote there
                    break
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def check_run_dir(run_dir: str | os.PathLike, resumed: dict | None) -> None:
    """Before a run writes checkpoints into ``run_dir``: APIUsageError unless those there are its own past.

    ``resumed`` is the checkpoint the run resumes from (:func:`load_checkpoint`), None for a new run. A new run, and
    one resumed from a checkpoint of another directory, need a directory without checkpoints. A run resumed in its
    own directory refuses checkpoints beyond the one it resumes from (the two histories would mix, and pruning
    would delete the new ones), except a damaged one: it is renamed ``*.damaged``, with a warning unless
    :func:`load_checkpoint` already skipped it with one, so the run's new checkpoints are the newest. A resumed run
    removes the temporary files of checkpoint writes a killed run left unfinished, and so does a new run.
    """
    found = _numbered_checkpoints(run_dir)
    if resumed is None:
        if found:
            raise APIUsageError(f"run_dir {str(run_dir)!r} already holds checkpoints of an earlier run (newest "
                                f"{found[-1][1].name}): resume it (resume_from=..., shoal train --resume "
                                f"{shlex.quote(str(run_dir))}) or choose a new run_dir")
        _remove_unfinished(run_dir)
        return
    origin = resumed.get("path")  # absent from a checkpoint dict not made by load_checkpoint
    if origin is None or Path(origin).parent.resolve() != (Path(run_dir) / "checkpoints").resolve():
        if found:
            raise APIUsageError(f"run_dir {str(run_dir)!r} holds checkpoints of another run (newest "
                                f"{found[-1][1].name}), and the checkpoint resumed from"
                                f"{f', {origin},' if origin else ''} is not one of them: continue into a run_dir "
                                f"without checkpoints (--run-dir)")
        return
    reported = {Path(path).name for path in resumed.get("damaged", ())}
    for update, path in found:
        if update <= resumed["update"]:
            continue
        try:
            _load_file(path, "cpu")
        except APIUsageError as error:
            os.replace(path, path.with_name(path.name + ".damaged"))
            if path.name not in reported:
                warnings.warn(f"{error}: renamed it {path.name}.damaged", stacklevel=2)
            continue
        raise APIUsageError(f"run_dir {str(run_dir)!r} holds {path.name}, newer than the checkpoint resumed from "
                            f"(update {resumed['update']}): continue into a new run_dir (--run-dir), or delete the "
                            f"newer checkpoints")
    _remove_unfinished(run_dir)


def _remove_unfinished(run_dir: str | os.PathLike) -> None:
    """Remove the temporary files of checkpoint writes a killed run left unfinished."""
    for stale in (Path(run_dir) / "checkpoints").glob(".update_*.tmp"):
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
    with a warning, if the newest is damaged; the paths of those it skipped are under ``"damaged"``)."""
    path = Path(path)
    if path.name == "checkpoints" and list_checkpoints(path.parent):  # a run's checkpoints/ itself: its run's
        path = path.parent
    if not path.is_dir():
        return _load_file(path, map_location)
    latest_checkpoint(path)  # the errors for a missing directory or one without checkpoints
    damaged: dict[str, str] = {}  # path -> why it cannot be read
    for candidate in reversed(list_checkpoints(path)):
        try:
            payload = _load_file(candidate, map_location)
        except APIUsageError as error:
            damaged[str(candidate)] = str(error)
            continue
        if damaged:
            warnings.warn(f"{'; '.join(damaged.values())}: loaded the newest one that can be, {candidate}",
                          stacklevel=2)
            payload["damaged"] = list(damaged)
        return payload
    errors = list(damaged.values())
    raise APIUsageError(errors[0] + (f"; nor can the {len(errors) - 1} older one(s)" if len(errors) > 1 else ""))


def _load_file(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise APIUsageError(f"{str(path)!r} does not exist: expected a checkpoint (.pt) or a run directory written "
                            f"by shoal train")
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's advice on a file pickle.dump wrote: the error below says it
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:  # not damage: a file this user may not read (never renamed, nor passed over)
        raise
    except Exception as error:  # a foreign or damaged file: say which, and what it is not
        text = str(error)
        if "Weights only load failed" in text:  # torch's safe unpickler: what it found, without its advice
            found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", text)
            if found:
                raise APIUsageError(
                    f"checkpoint {str(path)!r} refers to {found.group(1) or found.group(2)}: shoal reads only tensors, "
                    f"numbers, text and numpy arrays from a checkpoint, so that reading a file runs no code; if you "
                    f"trust it, load it yourself with torch.load(path, weights_only=False)") from None
            lines = [line.strip() for line in text.splitlines()]
            text = " ".join(line for line in lines if line and not line.startswith(
                ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")))
        raise APIUsageError(f"checkpoint {str(path)!r} cannot be read ({type(error).__name__}: {text}): expected a "
                            f"file torch.save wrote, as shoal's checkpoints are") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise APIUsageError(f"{str(path)!r} is not a shoal checkpoint: expected format {FORMAT!r}")
    payload["path"] = str(path)
    return payload
