"""Multiprocessing backend: one process per worker, all results in shared memory.

Data path: the parent writes a worker's actions into shared memory and sends one small message down
its pipe; the worker steps its ``envs_per_worker`` envs, which write observations, rewards and flags
straight into the worker's rows of shared memory, and answers with one byte when every info is empty,
else with a status byte and its pickled infos (the wire format is described in ``shoal.vector.base``).
No observation is ever pickled.

Waiting: the parent blocks in ``poll`` on the workers' pipes *and* their process sentinels (one
:class:`~shoal.vector.base.Poller`), and workers block in ``recv``. Nobody spins, so on a 2-core
machine the parent does not steal the core a worker needs, and a worker killed by a signal is noticed
at once.

Lifetime: the shared memory is a file that is unlinked as soon as it is created (``RawArray``), so it
leaves no ``/dev/shm`` entry behind even if this process is killed; workers are daemons, exit when their
pipe or their parent goes away, and are terminated by :meth:`close` if they do not stop by themselves.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import multiprocessing
import multiprocessing.util
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing import connection
from typing import Any

import numpy as np

from shoal.emulation import Binding, Buffers
from shoal.errors import APIUsageError, WorkerError, deferred_interrupt
from shoal.vector.base import (ArrayLayout, Command, EnvGroup, Failure, Poller, Status, VecEnv, check_seconds,
                               cloudpickle_dumps, command_bytes, default_num_workers, read_answer, send_answer,
                               send_command, serve, split_arrays, start_worker)

class SharedArrays:
    """The arrays of an :class:`ArrayLayout` in one block of shared memory that child processes map too.

    Pass it to a child as a ``Process`` argument (it pickles only while a process is being started).
    """

    def __init__(self, ctx, layout: ArrayLayout):
        self.layout = layout
        self.raw = ctx.RawArray(ctypes.c_uint8, layout.nbytes)

    def arrays(self) -> dict[str, np.ndarray]:
        return self.layout.arrays(np.frombuffer(self.raw, np.uint8))


def _kill_group(pid: int) -> None:
    """SIGKILL what is left of an ended worker's process group: processes its envs started and did not stop."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # none left (or the worker died before it made the group)
        pass


def _exit_with_parent() -> None:
    """Exit this worker, with its process group, as soon as the parent process is gone (even if it was killed).

    A thread waits for the parent's end of the sentinel pipe to close. It cannot run while an env's C
    code holds the GIL, so on Linux the kernel is asked too: a pipe whose writer closes signals its
    asynchronous readers (O_ASYNC), here with SIGKILL. (Linux's parent-death signal would not do: a
    forkserver worker's parent is the forkserver, which outlives the parent while any worker lives.)
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    if hasattr(fcntl, "F_SETSIG"):  # to the whole process group (a negative owner): processes the envs started too
        fcntl.fcntl(parent.sentinel, fcntl.F_SETOWN, -os.getpgrp())
        fcntl.fcntl(parent.sentinel, fcntl.F_SETSIG, signal.SIGKILL)
        fcntl.fcntl(parent.sentinel, fcntl.F_SETFL, fcntl.fcntl(parent.sentinel, fcntl.F_GETFL) | os.O_ASYNC)

    def watch() -> None:
        connection.wait([parent.sentinel])
        os.killpg(0, signal.SIGKILL)  # this worker's process group: it and what its envs started

    threading.Thread(target=watch, name="shoal-parent-watch", daemon=True).start()


def _leave_to_parent(signum: int, frame: Any) -> None:
    """A worker's handler of SIGINT and SIGTERM: nothing (see _worker_main)."""


def _worker_main(binding: Binding | bytes, worker: int, env_ids: range, rows: slice, shared: SharedArrays,
                 conn: connection.Connection) -> None:
    """A worker process: build the envs, report how that went, then serve commands.

    ``binding`` comes as cloudpickle bytes unless the worker was forked.
    """
    # Ctrl-C, and SIGTERM to the whole job (a scheduler's preemption), are the parent's to handle: it closes us
    # (a worker that died first would turn its checkpoint-and-stop into a worker error), and we die with it.
    # A handler that does nothing, not SIG_IGN: an ignored signal stays ignored in the processes an env starts
    # (a game server its close() stops with terminate()), a handler goes back to the default there.
    signal.signal(signal.SIGINT, _leave_to_parent)
    signal.signal(signal.SIGTERM, _leave_to_parent)
    # A process group of our own: processes an env starts (a game server) join it, and close() ends what
    # is left of the group, also when this worker had to be killed before its envs' close() ran.
    os.setpgrp()
    _exit_with_parent()
    if isinstance(binding, bytes):
        try:
            binding = pickle.loads(binding)
        except BaseException as error:
            failure = Failure(None, 0, "start", f"the binding does not unpickle in the worker process: "
                              f"{type(error).__name__}: {error}. A module it names must be importable there "
                              f"too: installed, or on PYTHONPATH (or use context='fork')", traceback.format_exc())
            try:
                send_answer(conn, Status.FAILED, failure)
            finally:
                conn.close()
            return
    arrays = shared.arrays()
    buffers, actions = split_arrays(arrays)
    group = EnvGroup(binding, env_ids, Buffers(*(array[rows] for array in buffers)), actions[rows],
                     progress=arrays["progress"][worker:worker + 1])
    started = start_worker(group)
    try:
        send_answer(conn, *started)
    except (EOFError, OSError):  # the parent is gone already
        started = Status.FAILED, None
    if started[0] is Status.FAILED:
        group.close()
        conn.close()
    else:
        serve(group, conn)


def _is_open(process) -> bool:
    """Whether ``process`` was started and not yet closed (a close() that an interrupt cut short closes some)."""
    try:
        return process.pid is not None
    except ValueError:  # "process object is closed"
        return False


@functools.cache
def _forkserver_imports_this_shoal() -> bool:
    """Whether the forkserver would preload this very shoal. It is a fresh interpreter that does not take this
    process's sys.path (Python 3.11 passes it, unused), so a script that put another shoal first on its sys.path
    would get workers with the forkserver's shoal; without a preload each worker imports the parent's."""
    import shoal

    try:
        found = subprocess.run([sys.executable, *multiprocessing.util._args_from_interpreter_flags(), "-c",
                                "import importlib.util; print(importlib.util.find_spec('shoal').origin)"],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return found.returncode == 0 and os.path.realpath(found.stdout.strip()) == os.path.realpath(shoal.__file__)


def _default_context() -> str:
    """'forkserver' where it exists: safe with a threaded parent (torch, Ray), fast after its first start."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class Multiprocessing(VecEnv):
    """Envs in ``num_workers`` processes with ``envs_per_worker`` envs each, results in shared memory.

    Args:
        num_workers: processes to start; default one per core this process may use.
        envs_per_worker: envs each process steps in turn (more amortizes the per-step message).
        batch_size: envs per :meth:`recv` batch (a multiple of ``envs_per_worker``); default all.
        timeout: seconds a reset/step/call may take before its workers count as hung (WorkerError);
            None waits forever (a dead worker is still noticed at once).
        startup_timeout: seconds each worker may take to start and build its envs.
        context: multiprocessing start method, "forkserver" (default on Linux), "spawn" or "fork".
            "fork" starts fastest but is unsafe in a parent that runs threads (torch, Ray). With the
            others the :class:`~shoal.Binding` is sent to the workers with cloudpickle (lambdas and local
            functions are fine; locks, open files and the like are not).

    >>> import gymnasium, shoal, numpy as np
    >>> binding = shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",))
    >>> with Multiprocessing(binding, num_workers=2, envs_per_worker=4) as vecenv:
    ...     obs, infos = vecenv.reset(seed=0)
    ...     obs, rewards, terminals, truncations, infos = vecenv.step(np.zeros((8, 1), np.int64))
    >>> rewards
    array([1., 1., 1., 1., 1., 1., 1., 1.], dtype=float32)
    """

    backend = "multiprocessing"

    def __init__(self, binding: Binding, num_workers: int | None = None, envs_per_worker: int = 1,
                 batch_size: int | None = None, *, timeout: float | None = None, startup_timeout: float = 60.0,
                 context: str | None = None):
        super().__init__(binding, default_num_workers() if num_workers is None else num_workers,
                         envs_per_worker, batch_size, timeout)
        startup_timeout = check_seconds("Multiprocessing", "startup_timeout", startup_timeout)
        method = context or _default_context()
        if method not in multiprocessing.get_all_start_methods():
            raise APIUsageError(f"Multiprocessing: context must be one of {multiprocessing.get_all_start_methods()}, "
                                f"got {context!r}")
        ctx = multiprocessing.get_context(method)
        if context is None and method == "forkserver" and _forkserver_imports_this_shoal():
            # Workers fork from a server that has imported shoal, numpy and gymnasium once (no effect if it runs).
            ctx.set_forkserver_preload([__name__])
        self._processes: list = []
        self._workers_up = False  # every worker reported that it built its envs
        self._conns: list = []
        self._sentinels: dict[int, int] = {}  # process sentinel -> worker
        self._poller = Poller()
        self._shared = SharedArrays(ctx, self._array_layout())
        arrays = self._shared.arrays()
        buffers, actions = split_arrays(arrays)
        self._progress = arrays["progress"]  # the env each worker runs, to name a hung one
        self._progress[:] = -1  # none yet
        # A forked worker has our classes; the others get the binding, then call/set_attr arguments, by cloudpickle.
        self._cloudpickler = None
        if method != "fork":
            import cloudpickle  # a dependency of gymnasium

            self._cloudpickler = cloudpickle
        sent = binding if method == "fork" else self._pickled(binding, method)
        try:
            for worker in range(self.num_workers):
                parent_end, child_end = ctx.Pipe()
                process = ctx.Process(
                    target=_worker_main, name=f"shoal-worker-{worker}", daemon=True,
                    args=(sent, worker, self._envs_of(worker), self._worker_rows(worker), self._shared, child_end))
                self._conns.append(parent_end)
                self._processes.append(process)
                try:
                    with deferred_interrupt():  # a process half started by a Ctrl-C would outlive close()
                        process.start()
                finally:
                    child_end.close()
                self._sentinels[process.sentinel] = worker
        except BaseException:
            self.close()
            raise
        self._buffers = buffers  # _wait may need them before _start
        self._collect(set(range(self.num_workers)), "startup (building its envs)", timeout=startup_timeout)
        self._workers_up = True
        self._start(buffers, actions)

    def _pickled(self, binding: Binding, method: str) -> bytes:
        try:
            return cloudpickle_dumps(binding, self._cloudpickler)
        except Exception as error:
            self.close()
            raise APIUsageError(
                f"Multiprocessing: the binding of {binding.env_name} cannot be sent to a {method!r} worker: "
                f"{type(error).__name__}: {error}. Everything it holds (env creator, env_args, env_kwargs, hooks) "
                f"must pickle with cloudpickle; or use context='fork'") from error

    # -------------------------------------------------------------- backend primitives

    def _dispatch(self, worker: int, command: Command, payload: Any) -> None:
        try:
            send_command(self._conns[worker], command, payload, self._cloudpickler)
        except (OSError, EOFError):  # broken pipe: the worker is gone
            raise self._death_error(worker) from None

    def _wait(self, workers: set[int], timeout: float | None, need: int = 1) -> list[tuple[int, Status, Any]]:
        conns = {self._conns[worker]: worker for worker in workers}
        ready = self._poller.wait((*conns, *self._sentinels), timeout)
        answers = self._receive(conns, ready)
        answered = {worker for worker, _, _ in answers}
        for item in ready:
            worker = self._sentinels.get(item)
            if worker is not None and worker not in answered:
                last = self._last_words(worker)
                if last is None:
                    raise self._death_error(worker)
                answers.append((worker, *last))
        return answers

    def _check_sendable(self, value: Any) -> None:
        command_bytes(value, self._cloudpickler)

    def _last_words(self, worker: int) -> tuple[Status, Any] | None:
        """A dead worker's unread failure report, if it sent one before exiting."""
        conn = self._conns[worker]
        try:
            if conn.poll():
                status, payload = read_answer(conn, self.envs_per_worker)
                if status is Status.FAILED:
                    return status, payload
        except (Exception, SystemExit):  # gone, or an answer this process cannot unpickle: it died all the same
            pass
        return None

    def _death_error(self, worker: int) -> WorkerError:
        process = self._processes[worker]
        process.join(1.0)
        code = process.exitcode
        if code is None:
            how = "closed its pipe"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        env = self._running_env(worker)
        if self._workers_up or code is None or code < 0 or env is not None:  # shoal's code ran in it
            why = ("the process died without a Python error (out of memory? killed? a crash in C code, or code "
                   "that ends the process, such as os._exit?)")
        elif getattr(sys.modules["__main__"], "__file__", None) == "<stdin>":  # `python - < script.py`
            why = ("the process failed while starting: it imports your main script first (start method forkserver "
                   "or spawn), and a script read from stdin cannot be imported again: save it to a file, or pass "
                   "context='fork'")
        else:  # it failed before shoal's code ran in it, so nothing could be reported
            why = ("the process failed while starting, before it could report: it imports your main script first "
                   "(start method forkserver or spawn), so code that builds a vec env must sit under "
                   "`if __name__ == \"__main__\":`. Its own traceback is on stderr above")
        env = self._crashed_env(worker)
        return WorkerError(f"{self._describe(worker)}, process {process.pid}, {how} at its step "
                           f"{self._steps[worker]}, running env {env}: {why}", env_id=env)

    def _shutdown(self) -> None:
        processes, conns = getattr(self, "_processes", []), getattr(self, "_conns", [])
        if hasattr(self, "_poller"):
            self._poller.clear()
        for process, conn in zip(processes, conns):
            if _is_open(process) and process.exitcode is None:
                try:
                    conn.send((Command.CLOSE, None))
                except (OSError, EOFError):
                    pass
        deadline = time.monotonic() + 1.0  # time to close their envs; then they are stopped
        for process in processes:
            if _is_open(process):
                process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if _is_open(process) and process.exitcode is None:  # SIGTERM would not stop it: workers ignore it
                process.kill()
                process.join()
            if _is_open(process):
                _kill_group(process.pid)
                process.close()  # frees its sentinel
        for conn in conns:
            conn.close()
        self._processes, self._conns, self._sentinels = [], [], {}
