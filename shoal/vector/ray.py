"""Ray backend: one actor per worker, each holding ``envs_per_worker`` envs, on this machine or a cluster.

Ray places the actors and owns their lifetime; how commands reach them depends on where they run:

- Actors on the driver's own node map the driver's buffers and write results straight into them, as
  the multiprocessing backend does. The buffers are a file with no name (``memfd_create``), so there is
  nothing in ``/dev/shm`` to leak even if the driver is killed while actors start; actors open it
  through ``/proc/<driver pid>/fd/<fd>``, which needs Linux, the same node and the same user (as shared
  memory does anyway). When every actor is local, commands skip Ray too: each actor serves a Unix
  socket (abstract namespace, so no file to leak) from a thread, with the multiprocessing workers' own loop, because a
  Ray call costs about a millisecond of CPU, as much as several Atari steps. A dead actor closes its
  socket, which the driver notices at once.
- Otherwise each reset/step is one remote call per actor (never per env); an actor on another node
  steps into its own buffers and returns them, and the driver copies them in.

``ray`` is imported only when a :class:`Ray` vec env is built.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import threading
import traceback
import uuid
from multiprocessing import connection
from typing import Any

import numpy as np

from shoal.emulation import Binding, Buffers
from shoal.errors import APIUsageError, WorkerError, deferred_interrupt, install_hint
from shoal.vector.base import (ArrayLayout, AsyncState, Command, EnvGroup, Failure, Poller, Status, VecEnv,
                               _unpicklable, check_seconds, cloudpickle_dumps, command_bytes, default_num_workers,
                               handle_in_worker, send_command, serve, split_arrays, start_worker,
                               unpickled_arguments_error)

_ACCESS = (Command.CALL, Command.GET_ATTR, Command.SET_ATTR)  # the commands that run code the caller chose
_RESOURCE_OPTIONS = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}  # ray.remote option -> Ray resource


def import_ray():
    """The ``ray`` module, or an error that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise APIUsageError(
            f"the Ray backend needs ray, which is not installed ({error}): {install_hint('ray')}") from error
    return ray


def _asked_resources(actor_options: dict) -> dict[str, tuple[str, float]]:
    """Ray resource -> (the option that asks for it, amount), for what ``actor_options`` ask of each actor."""
    asked = {resource: (f"{option}={actor_options[option]}", actor_options[option])
             for option, resource in _RESOURCE_OPTIONS.items() if actor_options.get(option)}
    asked.update({name: (f"resources={{{name!r}: {amount}}}", amount)
                  for name, amount in (actor_options.get("resources") or {}).items() if amount})
    return asked


def _amounts(resources: dict[str, float]) -> str:
    """``ray.cluster_resources()`` or ``ray.available_resources()`` for a message, without Ray's bookkeeping
    (per-node markers, placement-group bundles)."""
    return ", ".join(f"{name} {amount:g}" for name, amount in sorted(resources.items())
                     if not name.startswith("node:") and "_group_" not in name and name != "object_store_memory"
                     ) or "nothing"


_JOINING = threading.Lock()


def _join(ray, address: str | None, timeout: float) -> None:
    """``ray.init(address)``; APIUsageError when no Ray cluster answers there (Ray itself retries for minutes
    on an address where nothing listens, so a host:port is tried first, within ``timeout``)."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if host and port.isdecimal():
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout or 10.0, 10.0)).close()
        except OSError as error:
            raise APIUsageError(f"Ray: nothing answers at address={address!r} ({error}): start a Ray cluster there "
                                f"(ray start --head), or pass address=None to start a local one") from None
    try:
        if threading.current_thread() is threading.main_thread():
            # A Ray cut short in its start leaves its agent processes running, or crashes at exit (Ray 2.60 frees
            # its C++ core worker under its own io thread)
            with deferred_interrupt():
                own_handler = signal.getsignal(signal.SIGTERM)
                ray.init(address=address, include_dashboard=False)
                if callable(own_handler):  # the program's own (shoal train's: stop with a checkpoint), not Ray's abort
                    signal.signal(signal.SIGTERM, own_handler)
        else:
            _init_in_lasting_thread(ray, address)
    except (ConnectionError, ValueError) as error:  # ValueError: an address Ray cannot parse
        raise APIUsageError(f"Ray: cannot join a Ray cluster at address={address!r}: {error}") from None


def _init_in_lasting_thread(ray, address: str | None) -> None:
    """``ray.init`` from a daemon thread that lives as long as this process: the Ray node processes it starts
    die with the thread that started them (the kernel's parent-death signal fires when that thread ends), and
    the caller's thread may end long before the vec envs and Ray it leaves behind."""
    done, failure = threading.Event(), []

    def start_and_stay() -> None:
        try:
            ray.init(address=address, include_dashboard=False)
        except BaseException as error:  # raised again in the caller's thread
            failure.append(error)
        done.set()
        threading.Event().wait()

    threading.Thread(target=start_and_stay, name="shoal-ray-init", daemon=True).start()
    done.wait()
    if failure:
        raise failure[0]


def _last_line(error: Exception) -> str:
    """The last line of a Ray error's text: the exception raised where Ray ran the code."""
    return (str(error).strip().splitlines() or [""])[-1]


def _map_driver_memory(path: str, identity: tuple[int, int], layout: ArrayLayout) -> dict[str, np.ndarray]:
    """The driver's buffers, opened through ``path`` (``/proc/<driver pid>/fd/<fd>``); OSError if that fails.

    ``identity`` is the file's (st_dev, st_ino): in another PID namespace that pid is another process.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        stats = os.fstat(fd)
        if (stats.st_dev, stats.st_ino) != identity:
            raise OSError(f"{path} is not the driver's buffer file (is this actor in another PID namespace?)")
        memory = mmap.mmap(fd, layout.nbytes)
    finally:
        os.close(fd)  # the mapping keeps the memory
    return layout.arrays(np.frombuffer(memory, np.uint8))


class RayWorker:
    """The body of one Ray actor (wrapped with ``ray.remote`` when a vec env is built).

    ``shared``: (node id, path, identity, layout, worker, authkey) of the driver's buffers (see
    :func:`_map_driver_memory`), used when this actor runs on that node; it then also serves commands on
    a socket that only ``authkey`` opens.
    """

    def __init__(self, binding: Binding, env_ids: range, shared: tuple | None):
        self.shared = False
        failure = None
        if shared is not None:
            import ray

            node, path, identity, layout, worker, authkey = shared
            if ray.get_runtime_context().get_node_id() == node:
                try:
                    arrays = _map_driver_memory(path, identity, layout)
                except OSError as error:
                    failure = Failure(None, 0, "start", (
                        f"this actor runs on the driver's node but cannot open the driver's shared memory through "
                        f"{path}: {type(error).__name__}: {error}; pass shared_memory=False (results then travel "
                        f"through Ray's object store)"), traceback.format_exc())
                else:
                    buffers, actions = split_arrays(arrays)
                    rows = slice(env_ids.start * binding.max_agents, env_ids.stop * binding.max_agents)
                    self.buffers, self.actions = Buffers(*(a[rows] for a in buffers)), actions[rows]
                    self.progress = arrays["progress"][worker:worker + 1]
                    self.shared = True
        if not self.shared:
            self.buffers = Buffers.allocate(binding, len(env_ids))
            self.actions = np.zeros((len(self.buffers.masks), binding.atn_layout.size), binding.atn_layout.dtype)
            self.progress = None
        self.group = EnvGroup(binding, env_ids, self.buffers, self.actions, self.progress)
        self.started = start_worker(self.group) if failure is None else (Status.FAILED, failure)
        self.address, self.server = None, None
        if self.shared and self.started[0] is Status.OK:
            listener = connection.Listener(f"\0shoal-ray-{uuid.uuid4().hex}", "AF_UNIX", authkey=authkey)
            self.address = listener.address
            self.server = threading.Thread(target=self._serve, args=(listener,), name="shoal-serve", daemon=True)
            self.server.start()

    def _serve(self, listener: connection.Listener) -> None:
        from ray import cloudpickle  # the copy of cloudpickle that brought the binding's classes here

        with listener:
            conn = listener.accept()
        serve(self.group, conn, cloudpickle)

    def ready(self) -> tuple[Status, Any]:
        """How building the envs went, and where this actor serves commands (None: by Ray calls only)."""
        status, failure = self.started
        return status, (failure if status is Status.FAILED else (self.shared, self.address))

    def run(self, command: Command, payload: Any) -> tuple[Status, Any]:
        """Answer one command; reset/step answers are ``(buffers or None when shared, infos)``."""
        if command is Command.STEP and payload is not None:
            self.actions[:] = payload
        status, answer = handle_in_worker(self.group, command, payload)
        if status is Status.OK and command in (Command.RESET, Command.STEP):
            # Serialized right here, so reusing the buffers for the next step is safe.
            return status, (None if self.shared else self.buffers, answer)
        if status is Status.OK and command in (Command.CALL, Command.GET_ATTR):
            from ray import cloudpickle

            try:  # an unpicklable result is the caller's mistake: say so, and keep the actor
                cloudpickle_dumps(answer, cloudpickle)
            except BaseException as error:  # SystemExit from a result's __reduce__ too: no exit of the actor's
                return _unpicklable(self.group, command, answer, error)
        return status, answer

    def close(self) -> None:
        if self.server is not None:  # the driver sent CLOSE on the socket: let the server close its envs
            self.server.join(1.0)
        self.group.close()


class Ray(VecEnv):
    """Envs in ``num_workers`` Ray actors with ``envs_per_worker`` envs each.

    Args:
        num_workers: actors to start; default one per core of this machine.
        envs_per_worker: envs each actor steps per remote call.
        batch_size: envs per :meth:`recv` batch (a multiple of ``envs_per_worker``); default all.
        timeout: seconds a reset/step/call may take before its actors count as hung (WorkerError).
        startup_timeout: seconds the actors may take to be scheduled and build their envs.
        address: the Ray cluster to join when Ray is not initialized yet (None starts a local one);
            when it is, None, "auto" or that cluster's address. shoal leaves a Ray it started running;
            call ``ray.shutdown()`` when done with it.
        actor_options: passed to ``ray.remote`` for each actor, e.g. ``{"num_cpus": 1}``. Resources that all
            actors together ask for beyond what the cluster has are an APIUsageError before any actor starts.
        shared_memory: let actors on this node write into this process's memory (default True; Linux only,
            elsewhere results travel through Ray's object store).
    """

    backend = "ray"

    def __init__(self, binding: Binding, num_workers: int | None = None, envs_per_worker: int = 1,
                 batch_size: int | None = None, *, timeout: float | None = None, startup_timeout: float = 120.0,
                 address: str | None = None, actor_options: dict | None = None, shared_memory: bool = True):
        ray = import_ray()
        super().__init__(binding, default_num_workers() if num_workers is None else num_workers,
                         envs_per_worker, batch_size, timeout)
        startup_timeout = check_seconds("Ray", "startup_timeout", startup_timeout)
        if not isinstance(shared_memory, bool):
            raise APIUsageError(f"Ray: shared_memory must be True or False, got {shared_memory!r}")
        if address is not None and not isinstance(address, str):
            raise APIUsageError(f"Ray: address must be a str such as 'auto' or '10.0.0.1:6379', got {address!r}")
        try:
            actor_class = ray.remote(**actor_options)(RayWorker) if actor_options else ray.remote(RayWorker)
        except (TypeError, ValueError) as error:
            raise APIUsageError(f"Ray: actor_options must be a dict of ray.remote options such as {{'num_cpus': 1}}, "
                                f"got {actor_options!r}: {error}") from None
        self._ray = ray
        self._actors: list = []
        self._refs: dict = {}  # ObjectRef -> (worker, command) of every call still out
        self._shared_fd: int | None = None  # the buffers' file, open until every actor has mapped it
        self._conns: list = []  # one socket per actor when every actor is local; else commands go by Ray calls
        self._poller = Poller()
        with _JOINING:  # threads that build Ray vec envs at once start one Ray, not one each
            joined_here = not ray.is_initialized()
            if joined_here:
                _join(ray, address, startup_timeout)
        if not joined_here and address not in (None, "auto", ray.get_runtime_context().gcs_address):
            raise APIUsageError(f"Ray: address={address!r}, but this process is already connected to the Ray cluster "
                                f"at {ray.get_runtime_context().gcs_address}: pass address=None to use that one, or "
                                f"call ray.shutdown() first")
        self._asked = _asked_resources(actor_options or {})
        self._check_resources()
        try:
            cloudpickle_dumps(binding, ray.cloudpickle)
        except Exception as error:
            self.close()
            raise APIUsageError(
                f"Ray: the binding of {binding.env_name} cannot be sent to the actors: {type(error).__name__}: "
                f"{error}. Everything it holds (env creator, env_args, env_kwargs, hooks) must pickle with "
                f"cloudpickle") from error
        layout = self._array_layout()
        memory = None  # how actors on this node open our buffers
        if shared_memory and hasattr(os, "memfd_create"):  # Linux: a file with no name, nothing to leak
            self._shared_fd = fd = os.memfd_create("shoal-ray")
            os.ftruncate(fd, layout.nbytes)
            arrays = layout.arrays(np.frombuffer(mmap.mmap(fd, layout.nbytes), np.uint8))
            stats = os.fstat(fd)
            memory = f"/proc/{os.getpid()}/fd/{fd}", (stats.st_dev, stats.st_ino), layout
        else:
            arrays = layout.arrays(np.zeros(layout.nbytes, np.uint8))
        buffers, actions = split_arrays(arrays)
        self._progress = arrays["progress"]  # written by actors that map our memory: which env each one runs
        self._progress[:] = -1  # none yet
        self._buffers = buffers
        self._shared = [False] * self.num_workers  # which actors write into our memory
        node = ray.get_runtime_context().get_node_id()
        authkey = os.urandom(32)
        try:
            for worker in range(self.num_workers):
                shared = None if memory is None else (node, *memory, worker, authkey)
                self._actors.append(actor_class.remote(binding, self._envs_of(worker), shared))
                self._refs[self._actors[-1].ready.remote()] = (worker, None)
        except BaseException:
            self.close()
            raise
        addresses = {}
        for worker, _, (shared, address) in self._collect(set(range(self.num_workers)), "startup (building its envs)",
                                                          timeout=startup_timeout):
            self._shared[worker], addresses[worker] = shared, address
        self._close_shared_fd()  # every actor that maps it has; the mappings keep the memory
        if all(addresses.values()):
            try:
                self._conns = [connection.Client(addresses[worker], "AF_UNIX", authkey=authkey)
                               for worker in range(self.num_workers)]
            except BaseException:
                self.close()
                raise
        self._start(buffers, actions)

    def _check_resources(self) -> None:
        """APIUsageError when the cluster has less of a resource than all actors together ask for: Ray would keep
        them waiting to be scheduled until ``startup_timeout``."""
        have = self._ray.cluster_resources()
        for resource, (option, amount) in self._asked.items():
            if amount * self.num_workers > have.get(resource, 0):
                actors = "1 actor" if self.num_workers == 1 else f"{self.num_workers} actors"
                raise APIUsageError(
                    f"Ray: actor_options ask for {option} per actor, {amount * self.num_workers:g} {resource} for "
                    f"{actors}, but the Ray cluster has {resource} {have.get(resource, 0):g} in all (it has "
                    f"{_amounts(have)}), so Ray could never schedule them: ask for less, use fewer workers, or add "
                    f"nodes that have it (an autoscaling cluster: ray.autoscaler.sdk.request_resources first)")

    def _why_late(self, workers: set[int]) -> str:
        why = super()._why_late(workers)
        if self._state is not AsyncState.CLOSED or any(self._running_env(worker) is not None for worker in workers):
            return why  # the vec env has started, or an actor builds its envs: it was scheduled
        asks = ", ".join(option for option, _ in self._asked.values()) or "no resources"
        available = self._ray.available_resources()  # leaves out what is used up
        free = ", ".join(f"{name} {available.get(name, 0):g}" for name in self._asked) or _amounts(available)
        pending = self._pending(workers)
        if pending is None:
            return f"{why}; or Ray never scheduled its actor (each asks for {asks}; the cluster has {free} free now)"
        if pending:
            which = f"actor of worker {pending[0]}" if len(pending) == 1 else f"actors of workers {pending}"
            if not self._asked:  # it asks for nothing, so no resource keeps it waiting
                return f"{why} (Ray counts the {which} pending creation until its envs are built)"
            # Ray counts an actor pending until its envs are built: where the parent cannot see an actor's
            # progress (no shared memory), a constructor that hangs looks the same as missing resources
            building = "an env's constructor hangs or is too slow, or " if self._progress is None else ""
            mapping = ("" if self._progress is None else "; or, on a node that cannot map this process's memory, "
                       "building its envs hangs")
            return (f"Ray never finished creating the {which}: {building}it waits for resources no node has free "
                    f"(each actor asks for {asks}; the cluster has {free} free now): free them, ask for less in "
                    f"actor_options, or use fewer workers{mapping} (Ray counts an actor pending until its envs are "
                    f"built)")
        return why

    def _pending(self, workers: set[int]) -> list[int] | None:
        """Which of ``workers`` Ray has not created an actor for yet; None when Ray cannot tell."""
        try:  # Ray's public state API (ray.util.state) needs the dashboard, which a Ray that shoal starts leaves off
            from ray._private import state

            return [worker for worker in sorted(workers)
                    if state.actors(self._actors[worker]._actor_id.hex())["State"] == "PENDING_CREATION"]
        except Exception:
            return None

    def _close_shared_fd(self) -> None:
        if self._shared_fd is not None:
            os.close(self._shared_fd)
            self._shared_fd = None

    def _dispatch(self, worker: int, command: Command, payload: Any) -> None:
        if self._conns:
            try:
                send_command(self._conns[worker], command, payload, self._ray.cloudpickle)
            except (OSError, EOFError):  # the actor's end is closed: it died
                raise self._death_error(worker) from None
            return
        if not self._ray.is_initialized():  # a Ray call now would start a new local Ray without our actors
            raise self._death_error(worker)
        if command is Command.STEP and not self._shared[worker]:
            payload = self._actions[self._worker_rows(worker)]
        self._refs[self._actors[worker].run.remote(command, payload)] = (worker, command)

    def _wait(self, workers: set[int], timeout: float | None, need: int = 1) -> list[tuple[int, Status, Any]]:
        if self._conns:
            conns = {self._conns[worker]: worker for worker in workers}
            return self._receive(conns, self._poller.wait(tuple(conns), timeout))
        ray = self._ray
        refs = [ref for ref, (worker, _) in self._refs.items() if worker in workers]
        if need >= len(refs):  # all of them (a full batch): no ray.wait
            done = refs
        else:
            done, rest = ray.wait(refs, num_returns=need, timeout=timeout)
            if done and rest:  # take whatever else is finished too
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                done += more
        try:
            results = ray.get(done, timeout=timeout)  # one call for all of them
        except ray.exceptions.GetTimeoutError:
            if done is refs:  # some did answer: take those
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                results = [None] * len(done)
            else:
                raise
        except (ray.exceptions.RayError, SystemExit):  # find out which one failed, below, among those that
            done, _ = ray.wait(done, num_returns=len(done), timeout=0)  # answered: another may hang
            results = [None] * len(done)
        answers = []
        for ref, result in zip(done, results):
            worker, command = self._refs.pop(ref)
            try:
                status, payload = ray.get(ref) if result is None else result
            except SystemExit as error:  # code that unpickling the answer ran: no exit of ours
                raise self._unreadable_error(worker, error, traceback.format_exc()) from None
            except ray.exceptions.RayActorError as error:
                if error.actor_init_failed:  # Ray's own failure before the actor ran (its __init__ reports env code's)
                    raise WorkerError(f"{self._describe(worker)}: its Ray actor could not be created: "
                                      f"{_last_line(error)}. Where that is an import: every module the binding names "
                                      f"must be importable in the actor too (installed, on PYTHONPATH, or shipped "
                                      f"with Ray's runtime_env)", str(error)) from None
                env = self._crashed_env(worker)
                raise WorkerError(f"{self._describe(worker)}: its Ray actor died at its step {self._steps[worker]}, "
                                  f"running env {env}: {type(error).__name__}", str(error), env) from None
            except ray.exceptions.RayError as error:
                if (command in _ACCESS and isinstance(error, ray.exceptions.RayTaskError)
                        and isinstance(error, ray.exceptions.RaySystemError)):
                    # The actor catches whatever env code raises, so a task that failed before it ran is Ray's
                    # failure to unpickle the arguments there: the caller's, and the actor is unharmed.
                    answers.append((worker, Status.USAGE_ERROR, unpickled_arguments_error(_last_line(error))))
                    continue
                if (isinstance(error, ray.exceptions.RaySystemError) and isinstance(error.client_exc, Exception)
                        and not isinstance(error, ray.exceptions.RayTaskError)):
                    # the answer came, but does not unpickle here (Ray's own trouble carries a str; an argument
                    # that did not unpickle in the actor comes as a RayTaskError)
                    raise self._unreadable_error(worker, error.client_exc, error.traceback_str or "") from None
                raise WorkerError(f"{self._describe(worker)}: its Ray call failed at its step {self._steps[worker]}: "
                                  f"{type(error).__name__}", str(error), self._envs_of(worker).start) from None
            if status is Status.OK and command in (Command.RESET, Command.STEP):
                buffers, payload = payload
                if buffers is not None:  # an actor on another node: copy its results in
                    rows = self._worker_rows(worker)
                    for mine, theirs in zip(self._buffers, buffers):
                        mine[rows] = theirs
            answers.append((worker, status, payload))
        return answers

    def _death_error(self, worker: int) -> WorkerError:
        env = self._crashed_env(worker)
        if not self._ray.is_initialized():
            return WorkerError(f"{self._describe(worker)}: Ray was shut down (ray.shutdown()) while this vec env "
                               f"was open, at its step {self._steps[worker]}: its actors are gone; make a new vec "
                               f"env", env_id=env)
        return WorkerError(f"{self._describe(worker)}: its Ray actor died at its step {self._steps[worker]}, "
                           f"running env {env}: it closed its connection without a Python error (out of memory? "
                           f"killed? a crash in C code?)", env_id=env)

    def _check_sendable(self, value: Any) -> None:
        command_bytes(value, self._ray.cloudpickle)  # as they go on the actors' sockets; Ray's calls use it too

    def _shutdown(self) -> None:
        ray, actors = getattr(self, "_ray", None), getattr(self, "_actors", [])
        if hasattr(self, "_poller"):
            self._poller.clear()
        for conn in getattr(self, "_conns", []):
            try:
                conn.send((Command.CLOSE, None))
            except (OSError, EOFError):
                pass
            conn.close()
        self._conns = []
        if actors and ray.is_initialized():
            try:  # let the envs close, but do not wait for a hung one
                ray.wait([actor.close.remote() for actor in actors], num_returns=len(actors), timeout=1.0)
            except Exception:
                pass
            for actor in actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already dead
                    pass
        self._actors, self._refs = [], {}
        if hasattr(self, "_shared_fd"):
            self._close_shared_fd()
