"""What every vectorization backend shares: the async API, batching, input checks, and the worker.

A vec env runs ``num_envs = num_workers * envs_per_worker`` emulated envs. Worker ``w`` owns envs
``w * envs_per_worker ... (w + 1) * envs_per_worker - 1`` and always steps them together, so a worker
is the unit of batching: ``batch_size`` must be a multiple of ``envs_per_worker``.

All arrays follow the data contract of ``docs/design.md``: env-major over agent slots, so env ``e``
owns rows ``e * max_agents ... (e + 1) * max_agents - 1`` of ``obs``, ``rewards``, ``terminals``,
``truncations``, ``masks`` and of the actions passed to :meth:`VecEnv.send`.

A backend only decides *where* workers run. It implements four primitives (start a command on a
worker, wait for replies, stop everything, and how to build its buffers); this module does the rest.
"""

from __future__ import annotations

import abc
import copy
import enum
import functools
import inspect
import io
import math
import os
import pickle
import select
import sys
import threading
import time
import traceback
from collections import deque
from multiprocessing import connection
from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple, Sequence

import numpy as np

from shoal.emulation import Binding, Buffers
from shoal.errors import APIUsageError, SpaceError, WorkerError, check_int, is_int, is_number
from shoal.spaces import _short, as_array, holds_dict, shape_of


class Batch(NamedTuple):
    """What :meth:`VecEnv.recv` returns: the data contract for the envs in ``env_ids``.

    With ``n = len(env_ids) * max_agents`` slots. The arrays are the vec env's own buffers (views)
    when the batch's envs are contiguous, which the workers write the next step into once :meth:`VecEnv.send`
    steps them: copy what you keep past that.
    """

    obs: np.ndarray  # (n, obs_size)
    rewards: np.ndarray  # float32 (n,)
    terminals: np.ndarray  # bool (n,)
    truncations: np.ndarray  # bool (n,)
    masks: np.ndarray  # bool (n,)
    infos: list  # one {agent_id: dict} per env of the batch
    env_ids: np.ndarray  # int64 (len(env_ids),), ascending


class AsyncState(enum.Enum):
    """Where a vec env stands in its call sequence; the value says what to call next."""

    NEEDS_RESET = "reset() or async_reset()"
    WAITING = "recv()"  # commands are out: collect a batch
    HOLDING = "send(actions)"  # a batch was returned: send its actions
    CLOSED = "nothing: the vec env is closed"


class Command(enum.Enum):
    """What the parent asks a worker to do; the worker answers each with one :class:`Status`."""

    RESET = "reset"  # payload: one seed (or None) per env of the worker
    STEP = "step"  # payload: None (actions are in shared memory) or the worker's actions (Ray)
    CALL = "call"  # payload: (local env indices, method name, args, kwargs)
    GET_ATTR = "get_attr"  # payload: (local env indices, name)
    SET_ATTR = "set_attr"  # payload: (local env indices, name, value)
    CLOSE = "close"  # no answer


class Status(enum.Enum):
    OK = "ok"  # payload: infos per env (reset/step) or values per env (call/get_attr/set_attr)
    FAILED = "failed"  # payload: a Failure; the worker has stopped
    USAGE_ERROR = "usage error"  # payload: a message about a call/get_attr/set_attr gone wrong; the worker goes on


class Failure(NamedTuple):
    """An exception inside a worker, as text so it survives pickling."""

    env_id: int | None  # the env being run, None when the failure is in no one env
    step: int  # the worker's step count when it failed
    command: str
    error: str  # "ValueError: boom"
    traceback: str  # the worker's formatted traceback


_MISSING = object()


class _UsageError(Exception):
    """What went wrong in a call/get_attr/set_attr the caller asked for (a name no env has, or an exception from
    the env's own method or attribute): the caller's business, not a broken worker, which goes on."""


def _owners(env) -> list:
    """Where names are looked up, in order: the emulated env, the env it wraps (``.env``) and, under
    that env's own wrappers (gymnasium.make's, PettingZoo's conversions), which do not pass names on,
    the innermost env (``.env.unwrapped``)."""
    inner = getattr(env.env, "unwrapped", None)
    return [env, env.env] if inner is None or inner is env.env else [env, env.env, inner]


def _lookup(env, name: str) -> tuple[Any, Any]:
    """(owner, value) for ``name`` on the first of :func:`_owners` that has it; (None, None) if none does."""
    for owner in _owners(env):
        value = getattr(owner, name, _MISSING)
        if value is not _MISSING:
            return owner, value
    return None, None


class EnvGroup:
    """The envs one worker owns, each writing into its own rows of the worker's buffers.

    Runs in the worker (a process, a Ray actor, or the caller's process for :class:`Serial`).
    Never raises: :meth:`handle` turns every exception into a :class:`Failure` reply.
    """

    def __init__(self, binding: Binding, env_ids: range, buffers: Buffers, actions: np.ndarray,
                 progress: np.ndarray | None = None):
        self.binding = binding
        self.env_ids = env_ids
        self.steps = 0
        self.current: int | None = None  # the env being run, for failure reports
        # progress[0]: the env being reset or stepped; in shared memory the parent can name a hung env
        self.progress = np.zeros(1, np.int64) if progress is None else progress
        self.exception: BaseException | None = None  # the last failure's exception (Serial chains it)
        agents = binding.max_agents
        self._rows = [slice(i * agents, (i + 1) * agents) for i in range(len(env_ids))]
        self._actions = [actions[rows] for rows in self._rows]  # (max_agents, atn_size) views
        self._buffers = buffers
        self.envs: list = []

    def start(self) -> tuple[Status, Any]:
        """Build the envs; (Status.OK, None) or (Status.FAILED, Failure)."""
        try:
            for env_id, rows in zip(self.env_ids, self._rows):
                self.current = self.progress[0] = env_id
                self.envs.append(self.binding.make_env(buffers=Buffers(*(array[rows] for array in self._buffers))))
            self.current = None
            return Status.OK, None
        except Exception as error:  # reported to the parent, which raises WorkerError
            return Status.FAILED, self._failure("start", error)

    def handle(self, command: Command, payload: Any) -> tuple[Status, Any]:
        """Run one command on this worker's envs and say how it went."""
        try:
            if command is Command.STEP:
                self.steps += 1
                infos = []
                for env_id, env, actions in zip(self.env_ids, self.envs, self._actions):
                    self.current = self.progress[0] = env_id
                    infos.append(env.step(actions)[4])
                return Status.OK, infos
            if command is Command.RESET:
                infos = []
                for env_id, env, seed in zip(self.env_ids, self.envs, payload):
                    self.current = self.progress[0] = env_id
                    infos.append(env.reset(seed=seed)[1])
                return Status.OK, infos
            return Status.OK, self._access(command, payload)
        except _UsageError as mistake:
            self.current = None
            self.exception = mistake.__cause__  # the env's own exception, if any (Serial chains it)
            return Status.USAGE_ERROR, str(mistake)
        except Exception as error:
            return Status.FAILED, self._failure(command.value, error)

    def _access(self, command: Command, payload: Any) -> list:
        indices, name, *rest = payload
        values = []
        for index in indices:
            self.current, env = self.env_ids[index], self.envs[index]
            self.progress[0] = self.current
            try:
                own = copy.deepcopy(rest)  # an env that changes its argument in place changes no other's
            except Exception as error:
                raise _UsageError(f"the arguments cannot be copied for each env: {_exception_text(error)}") from error
            try:
                values.append(self._access_one(env, command, name, own))
            except _UsageError:
                raise
            except Exception as error:  # from the env's own code, which the caller chose to run: the env goes on
                what = {Command.CALL: f"{name}()", Command.GET_ATTR: f"reading {name!r}",
                        Command.SET_ATTR: f"setting {name!r}"}[command]
                raise _UsageError(f"env {self.current} ({self.binding.env_name}): {what} raised "
                                  f"{_exception_text(error)} (the vec env stays open)\n\n"
                                  f"Worker traceback:\n{traceback.format_exc()}") from error
        self.current = None
        return values

    def _access_one(self, env, command: Command, name: str, rest: list) -> Any:
        owner, value = _lookup(env, name)
        if owner is None:
            if command is not Command.SET_ATTR:
                raise _UsageError(
                    f"env {self.current} ({self.binding.env_name}) has no attribute {name!r}: looked up on the "
                    f"emulated env, the env it wraps (.env) and its innermost env (.env.unwrapped)")
            owner = _owners(env)[-1]  # a new attribute goes to the raw env: passthrough is the point
        if command is Command.CALL:
            args, kwargs = rest
            if not callable(value):
                raise _UsageError(f"env {self.current} ({self.binding.env_name}): {name!r} is a "
                                  f"{type(value).__name__}, not a method: use get_attr")
            return value(*args, **kwargs)
        if command is Command.GET_ATTR:
            return value
        if owner is env:  # its buffers, bookkeeping and methods: replaced, the env would write where no one reads
            shadowed = [layer for layer in _owners(env)[1:] if hasattr(layer, name)]
            hint = (f"; the env it wraps has a {name!r} too, which set_attr cannot reach under that name: set it "
                    f"from a method of your env, with call()" if shadowed else "")
            raise _UsageError(f"env {self.current} ({self.binding.env_name}): set_attr({name!r}) would replace the "
                              f"emulated env's own {name!r} (shoal.EmulatedEnv's), which the vec env relies on: "
                              f"refused{hint}")
        setattr(owner, name, rest[0])
        return None

    def _failure(self, command: str, error: BaseException) -> Failure:
        self.exception = error
        return Failure(self.current, self.steps, command, _exception_text(error), traceback.format_exc())

    def close(self) -> None:
        """Close every env, ignoring their errors: this runs on the way out. A KeyboardInterrupt or SystemExit
        from one goes on once every env is closed."""
        interrupted = None
        for env in self.envs:
            try:
                env.close()
            except Exception:
                pass
            except BaseException as error:
                interrupted = interrupted or error
        self.envs = []
        if interrupted is not None:
            raise interrupted


def _one_caller(method):
    """A vec env method that refuses a second call while one is inside the vec env, from another thread or from
    a signal handler that interrupted it: workers answer in order, so two callers would take each other's
    answers. close() stays open to any caller.

    What interrupts a call (Ctrl-C's KeyboardInterrupt, anything that is not an Exception) closes the vec env:
    it may have come between two workers' commands, or between an answer and its bookkeeping."""
    @functools.wraps(method)
    def one_caller(self, *args, **kwargs):
        held = False
        try:
            held = self._caller.acquire(blocking=False)
            if not held:
                raise APIUsageError(f"{type(self).__name__}.{method.__name__}(): another call is inside this vec "
                                    f"env (from another thread, or the one a signal handler interrupted): it serves "
                                    f"one call at a time (close() excepted); give each thread its own vec env")
            return method(self, *args, **kwargs)
        except Exception:
            raise
        except BaseException:
            self.close()
            raise
        finally:
            if held:
                self._caller.release()
    return one_caller


def _exception_text(error: BaseException) -> str:
    """``"Type: message"`` of an exception, also one whose ``__str__`` fails (as the traceback module shows it),
    with its notes (where it happened, e.g. in an automatic reset) in brackets."""
    try:
        text = str(error)
    except Exception:
        text = "<exception str() failed>"
    notes = [note for note in getattr(error, "__notes__", ()) if isinstance(note, str)]
    return f"{type(error).__name__}: {text}" + (f" ({'; '.join(notes)})" if notes else "")


# The wire format of the pipes and sockets between a vec env and its workers. The hot path skips pickle:
# a step whose actions are in shared memory is one byte, and so is the answer "done, every info empty".
# Any other command is a pickled (command, payload); any other answer is its status's byte followed by
# the pickled payload (enum members are never pickled on the hot path: unpickling one costs an import
# lookup and a call).
_STEP = b"s"
_QUIET = b"q"
_STATUS_BYTE = {Status.OK: b"o", Status.USAGE_ERROR: b"u", Status.FAILED: b"f"}
_BYTE_STATUS = {byte[0]: status for status, byte in _STATUS_BYTE.items()}


def send_command(conn, command: Command, payload: Any, cloudpickler=None) -> None:
    """Send ``command`` to the worker at the other end of ``conn`` (see :func:`serve`), pickled by
    :func:`command_bytes` with ``cloudpickler``."""
    if command is Command.STEP and payload is None:
        conn.send_bytes(_STEP)
    else:
        conn.send_bytes(command_bytes((command, payload), cloudpickler))


def command_bytes(value: Any, cloudpickler=None) -> bytes:
    """``value`` pickled for a worker. Where the binding went by cloudpickle (``cloudpickler``: the module that
    sent it), by the same: it sent the classes of the main script by value, and sends them again as the very
    classes the worker's envs have, where pickling them by name would give a worker that imported the main
    script again (spawn, forkserver) its own, different ones. A forked worker has the parent's classes: as
    :func:`_dumps` pickles answers."""
    return _dumps(value) if cloudpickler is None else cloudpickle_dumps(value, cloudpickler)


def cloudpickle_dumps(value: Any, cloudpickler=None) -> bytes:
    """``value`` pickled with ``cloudpickler`` (default: the ``cloudpickle`` package), refusing open files:
    cloudpickle would send a readable one as a copy of its text, so the other process would read a snapshot and
    its writes would be lost."""
    if cloudpickler is None:
        import cloudpickle as cloudpickler  # a dependency of gymnasium
    out = io.BytesIO()
    _file_refusing_pickler(cloudpickler)(out, pickle.HIGHEST_PROTOCOL).dump(value)
    return out.getvalue()


@functools.cache
def _file_refusing_pickler(cloudpickler) -> type:
    class FileRefusingPickler(cloudpickler.CloudPickler):
        def reducer_override(self, obj):
            if isinstance(obj, io.TextIOWrapper) and obj is not sys.stdout and obj is not sys.stderr:
                raise pickle.PicklingError(
                    f"open file {getattr(obj, 'name', obj)!r} cannot be sent to another process (it would get a "
                    f"copy of the text, not the file): open the file in that process, e.g. in the env's constructor")
            return super().reducer_override(obj)
    return FileRefusingPickler


def send_answer(conn, status: Status, payload: Any, cloudpickler=None) -> None:
    """Answer the parent on ``conn``; the payload is pickled before any byte is sent, so one that fails to
    pickle leaves the connection clean. ``cloudpickler``: see :func:`_dumps`."""
    conn.send_bytes(_STATUS_BYTE[status] + _dumps(payload, cloudpickler))


def _dumps(payload: Any, cloudpickler=None) -> bytes:
    """``payload`` pickled for the parent: plain pickle (ForkingPickler's extra reducers are for connections and
    sockets, which no answer holds, and cost a few times more per call), else ``cloudpickler`` (the cloudpickle
    module that sent the binding; default the ``cloudpickle`` package). The envs of a binding sent with
    cloudpickle use its copies of the classes in the main script, which plain pickle cannot name; the same
    cloudpickle sends them back as copies that the parent maps onto its own classes."""
    try:
        return pickle.dumps(payload, pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError):  # a local function or class raises AttributeError
        return cloudpickle_dumps(payload, cloudpickler)


def read_answer(conn, envs: int) -> tuple[Status, Any]:
    """The next answer from a worker of ``envs`` envs on ``conn`` (blocks): (status, payload)."""
    message = conn.recv_bytes()
    if message == _QUIET:
        return Status.OK, [{} for _ in range(envs)]
    return _BYTE_STATUS[message[0]], pickle.loads(memoryview(message)[1:])


def serve(group: EnvGroup, conn, cloudpickler=None) -> None:
    """Answer commands from ``conn`` (a multiprocessing Connection) until CLOSE, a failure or EOF; then close the envs.

    The loop of every worker that talks over a pipe or socket: Multiprocessing workers and local Ray actors
    (whose binding came with Ray's copy of cloudpickle: ``cloudpickler``, see :func:`_dumps`).
    """
    status = Status.OK
    try:
        while status is not Status.FAILED:
            message = conn.recv_bytes()
            try:
                command, payload = (Command.STEP, None) if message == _STEP else ForkingPickler.loads(message)
            except Exception as error:  # arguments that pickled in the parent do not unpickle here: the caller's
                send_answer(conn, Status.USAGE_ERROR, unpickled_arguments_error(f"{type(error).__name__}: {error}"),
                            cloudpickler)
                continue
            if command is Command.CLOSE:
                break
            status, answer = handle_in_worker(group, command, payload)
            if status is Status.OK and command in (Command.STEP, Command.RESET) and not any(answer):
                conn.send_bytes(_QUIET)
                continue
            try:
                send_answer(conn, status, answer, cloudpickler)
            except (EOFError, OSError):
                raise
            except BaseException as error:  # the answer does not pickle (pickling fails before any byte is sent);
                # a SystemExit or KeyboardInterrupt from an info's pickling is env code's, as in handle_in_worker
                status, answer = _unpicklable(group, command, answer, error)
                send_answer(conn, status, answer, cloudpickler)
    except (EOFError, OSError):  # the parent closed our connection or went away
        pass
    finally:
        group.close()
        conn.close()


def unpickled_arguments_error(error: str) -> str:
    """The USAGE_ERROR message for a command whose arguments do not unpickle in the worker (``error``: why)."""
    return f"the command's arguments do not unpickle in the worker: {error}"


def handle_in_worker(group: EnvGroup, command: Command, payload: Any) -> tuple[Status, Any]:
    """``group.handle`` in a worker process or actor, where a SystemExit or KeyboardInterrupt from env code is
    reported too; in :class:`~shoal.vector.serial.Serial` it is the caller's own and goes through."""
    try:
        return group.handle(command, payload)
    except BaseException as error:
        return Status.FAILED, group._failure(command.value, error)


def start_worker(group: EnvGroup) -> tuple[Status, Any]:
    """``group.start()`` in a worker process or actor, where a SystemExit from env code is reported too, as
    :func:`serve` does; in :class:`~shoal.vector.serial.Serial` it is the caller's own and goes through."""
    try:
        return group.start()
    except BaseException as error:
        return Status.FAILED, group._failure("start", error)


def _unpicklable(group: EnvGroup, command: Command, answer: Any, error: Exception) -> tuple[Status, Any]:
    """The answer for a result that cannot be sent: the caller's mistake for call/get_attr, else the env's.

    For reset/step the infos are pickled again one by one to name the env (and agent) at fault: only on
    this path, so the normal one pays nothing.
    """
    problem = f"cannot be sent to the parent: {type(error).__name__}: {error}"
    if command in (Command.CALL, Command.GET_ATTR):
        return Status.USAGE_ERROR, f"the result of {command.value} {problem} (results must pickle)"
    trace = traceback.format_exc()
    env_id, what = _unpicklable_info(group, answer)
    return Status.FAILED, Failure(env_id, group.steps, command.value, f"{what} {problem} (infos must pickle)", trace)


def _unpicklable_info(group: EnvGroup, infos: list) -> tuple[int | None, str]:
    """(env, which info) of the first of ``infos`` (one ``{agent: info}`` per env of ``group``) that does not pickle."""
    for env_id, info in zip(group.env_ids, infos):
        if group.binding.is_multiagent:
            for agent, agent_info in info.items():
                if not _pickles(agent_info):
                    return env_id, f"the info of agent {agent!r}"
        if not _pickles(info):
            return env_id, "the info"
    return None, "the infos"


def _pickles(value: Any) -> bool:
    try:
        _dumps(value)  # as send_answer does
        return True
    except BaseException:  # in a worker: SystemExit from a value's __reduce__ too
        return False


class Poller:
    """``multiprocessing.connection.wait`` for waitables (connections, sentinels) that recur call after call.

    ``connection.wait`` builds and fills a new selector on every call, some 20-50 µs of the parent's CPU
    per batch on a small machine; this keeps one ``select.poll`` and only registers and unregisters
    the file descriptors that changed since the last call.
    """

    def __init__(self):
        self._poll = select.poll() if hasattr(select, "poll") else None  # None on Windows
        self._registered: dict[int, Any] = {}  # fd -> waitable
        self._waitables: tuple = ()  # those of the last call, registered

    def wait(self, waitables: tuple, timeout: float | None) -> list:
        """The ``waitables`` that are ready (readable, or closed at the other end), as ``connection.wait``."""
        if self._poll is None:
            return connection.wait(waitables, timeout)
        if waitables != self._waitables:
            wanted = {(item if isinstance(item, int) else item.fileno()): item for item in waitables}
            for fd in self._registered.keys() - wanted.keys():
                self._poll.unregister(fd)
            for fd in wanted.keys() - self._registered.keys():
                self._poll.register(fd, select.POLLIN)
            self._registered, self._waitables = wanted, waitables
        wanted = self._registered
        # poll takes at most 2**31 - 1 ms (24.8 days): a longer wait just wakes up and is asked again
        events = self._poll.poll(None if timeout is None else min(math.ceil(timeout * 1000), 2**31 - 1))
        return [wanted[fd] for fd, _ in events]

    def clear(self) -> None:
        """Forget every waitable (call before closing any of them)."""
        if self._poll is not None:
            self._poll = select.poll()
        self._registered, self._waitables = {}, ()


class ArrayLayout:
    """Where each named array lies in one block of bytes, so processes can share the block.

    >>> layout = ArrayLayout({"rewards": ((4,), np.float32), "masks": ((4,), bool)})
    >>> layout.nbytes, layout.arrays(np.zeros(layout.nbytes, np.uint8))["masks"].shape
    (128, (4,))
    """

    ALIGN = 64  # bytes: each array starts on its own cache line

    def __init__(self, specs: dict[str, tuple[tuple, Any]]):
        self.specs, offset = {}, 0
        for name, (shape, dtype) in specs.items():
            dtype = np.dtype(dtype)
            self.specs[name] = (offset, tuple(shape), dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            offset += -(-nbytes // self.ALIGN) * self.ALIGN
        self.nbytes = max(offset, 1)

    def arrays(self, memory: np.ndarray) -> dict[str, np.ndarray]:
        """Views of ``memory`` (a uint8 array of ``nbytes``), one per name."""
        return {name: memory[offset:offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize]
                .view(dtype).reshape(shape) for name, (offset, shape, dtype) in self.specs.items()}


def split_arrays(arrays: dict[str, np.ndarray]) -> tuple[Buffers, np.ndarray]:
    """(buffers, actions) from the arrays of :meth:`VecEnv._array_layout`."""
    return Buffers(*(arrays[name] for name in Buffers._fields)), arrays["actions"]


def default_num_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_seconds(backend: str, name: str, value: Any) -> float | None:
    """``value`` if it is a positive number of seconds, None for None or infinity (no limit); else APIUsageError."""
    if value is not None and (not is_number(value) or not value > 0):
        raise APIUsageError(f"{backend}: {name} must be a positive number of seconds or None, got {value!r}")
    return None if value == math.inf else value


class VecEnv(abc.ABC):
    """Many emulated envs behind one async API. Build one with :func:`shoal.vector.make`.

    Sync API (needs ``batch_size == num_envs``)::

        obs, infos = vecenv.reset(seed=0)            # obs: (num_agents, obs_size)
        obs, rewards, terminals, truncations, infos = vecenv.step(actions)  # actions: (num_agents, atn_size)

    Async API (any ``batch_size``; ``step`` is ``send`` then ``recv``)::

        vecenv.async_reset(seed=0)
        while training:
            batch = vecenv.recv()                    # the first batch_size envs to finish
            vecenv.send(policy(batch.obs))           # actions for exactly batch.env_ids
    """

    backend = "VecEnv"

    def __new__(cls, *args: Any, **kwargs: Any) -> "VecEnv":
        # Python's own TypeError for an unknown keyword names none of those the backend takes.
        params = inspect.signature(cls.__init__, follow_wrapped=False).parameters  # a decorator may add keywords
        parameters = [name for name in params if name != "self"]
        unknown = [name for name in kwargs if name not in parameters]
        if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            taken = [f"{name} (None only)" if params[name].annotation in (None, "None") else name
                     for name in parameters]  # Serial's timeout: accepted for uniform calls, never set
            raise APIUsageError(f"{cls.__name__}: unknown keyword argument {unknown[0]!r}: it takes "
                                f"{', '.join(taken)}")
        return super().__new__(cls)

    def __init__(self, binding: Binding, num_workers: int, envs_per_worker: int, batch_size: int | None,
                 timeout: float | None = None):
        self._state = AsyncState.CLOSED  # until the backend has started its workers
        self._caller = threading.Lock()  # held while a public method runs (see _one_caller)
        self._progress: np.ndarray | None = None  # per worker, the env it runs, where the backend can see it
        name = type(self).__name__
        if not isinstance(binding, Binding):
            raise APIUsageError(
                f"{name}: expected a shoal.Binding as first argument, got {type(binding).__name__}: pass how to "
                f"build the env, e.g. shoal.Binding(env_creator=gymnasium.make, env_args=('CartPole-v1',))")
        if binding.atn_layout is None:
            raise APIUsageError(f"{name}: {binding.env_name}: vec envs need flat actions; "
                                f"build the Binding with emulate_flat_atn=True")
        self.num_workers = check_int(f"{name}: num_workers", num_workers)
        self.envs_per_worker = check_int(f"{name}: envs_per_worker", envs_per_worker)
        self.num_envs = self.num_workers * self.envs_per_worker
        self.batch_size = self.num_envs if batch_size is None else check_int(f"{name}: batch_size", batch_size)
        if self.batch_size > self.num_envs or self.batch_size % self.envs_per_worker:
            raise APIUsageError(
                f"{name}: batch_size must be a multiple of envs_per_worker={self.envs_per_worker} (a worker's envs "
                f"step together) and at most num_envs={self.num_envs}, got {self.batch_size}")
        self.timeout = check_seconds(name, "timeout", timeout)
        self.binding = binding
        self.max_agents = binding.max_agents
        self.num_agents = self.num_envs * self.max_agents
        self.single_observation_space = binding.obs_layout.flat_space
        self.single_action_space = binding.atn_layout.flat_space
        self._atn_size = binding.atn_layout.size
        self._workers_per_batch = self.batch_size // self.envs_per_worker
        self._in_flight: set[int] = set()  # workers running reset/step whose answer is not in yet
        self._ready: deque = deque()  # (worker, infos) answered but not yet returned by recv()
        self._batch_workers: list[int] = []  # the workers of the batch recv() returned last
        self._batch_rows: slice | np.ndarray = slice(0, 0)
        self._steps = [0] * self.num_workers  # steps sent to each worker: its own count, as its failures give it
        self._sent: dict[int, tuple[float, Command]] = {}  # worker -> (when, what) of its newest command
        self._owner_pid = os.getpid()
        self._closing = threading.Lock()  # held by the close() that runs _shutdown
        self._closed = False  # close() was called: no more commands
        self._shut_down = False  # from here on the backend may own processes or memory until close() releases them

    # -------------------------------------------------------------- backend primitives

    @abc.abstractmethod
    def _dispatch(self, worker: int, command: Command, payload: Any) -> None:
        """Start ``command`` on ``worker`` without waiting for its answer."""

    @abc.abstractmethod
    def _wait(self, workers: set[int], timeout: float | None, need: int = 1) -> list[tuple[int, Status, Any]]:
        """Block until ``workers`` answered (at least one; ``need`` is how many the caller waits for, a hint)
        or ``timeout`` passed; [] on timeout.

        Raises WorkerError when any worker died. For reset/step answers the backend has already put the
        worker's results into ``self._buffers``.
        """

    @abc.abstractmethod
    def _shutdown(self) -> None:
        """Stop every worker and release every resource. Must be safe to call twice and on a half-built object."""

    # -------------------------------------------------------------- shared machinery

    def _start(self, buffers: Buffers, actions: np.ndarray) -> None:
        """Called by the backend once its buffers exist and its workers are up."""
        self._buffers = buffers  # (num_agents, ...) each
        self._actions = actions  # (num_agents, atn_size)
        self._state = AsyncState.NEEDS_RESET

    def _array_layout(self) -> ArrayLayout:
        """The buffers, the actions and each worker's progress (the env it runs) in one block of bytes."""
        return ArrayLayout({
            **dict(zip(Buffers._fields, Buffers.specs(self.binding, self.num_envs))),
            "actions": ((self.num_agents, self._atn_size), self.single_action_space.dtype),
            "progress": ((self.num_workers,), np.int64),
        })

    def _envs_of(self, worker: int) -> range:
        return range(worker * self.envs_per_worker, (worker + 1) * self.envs_per_worker)

    def _worker_rows(self, worker: int) -> slice:
        rows = self.envs_per_worker * self.max_agents
        return slice(worker * rows, (worker + 1) * rows)

    def _describe(self, worker: int) -> str:
        envs = self._envs_of(worker)
        return f"worker {worker} (envs {envs.start}-{envs.stop - 1} of {self.binding.env_name})"

    def _failure_error(self, worker: int, failure: Failure) -> WorkerError:
        where = f"env {failure.env_id}" if failure.env_id is not None else "no env"
        return WorkerError(
            f"{self._describe(worker)} failed in {failure.command} at its step {failure.step}, in {where}: "
            f"{failure.error}", failure.traceback, failure.env_id)

    def _usage_error(self, worker: int, message: str) -> APIUsageError:
        """For a call/get_attr/set_attr that went wrong on ``worker`` but left it working (Status.USAGE_ERROR)."""
        return APIUsageError(message)

    def _unreadable_error(self, worker: int, error: BaseException, trace: str) -> WorkerError:
        """For an answer that came from ``worker`` but does not unpickle in this process."""
        command = self._sent[worker][1].value if worker in self._sent else "start"
        envs = self._envs_of(worker)
        env = envs.start if len(envs) == 1 else None  # else which of its envs is unknown: the answer is one message
        return WorkerError(
            f"{self._describe(worker)}: its answer to {command} at its step {self._steps[worker]} could not be "
            f"unpickled in the parent: {type(error).__name__}: {error}. Infos and call() results must unpickle in "
            f"this process too (a class it cannot import, or an exception whose __init__ does not take its args, "
            f"do not)", trace, env)

    def _receive(self, conns: dict, ready: list) -> list[tuple[int, Status, Any]]:
        """The answers waiting on the ``ready`` ones of ``conns`` (connection -> worker), for backends whose
        workers answer on connections (they define ``_death_error(worker)``): a closed one is a death."""
        answers = []
        for item in ready:
            worker = conns.get(item)
            if worker is not None:
                try:
                    answers.append((worker, *read_answer(item, self.envs_per_worker)))
                except (EOFError, OSError):
                    raise self._death_error(worker) from None
                except (Exception, SystemExit) as error:  # it answered, but the answer does not unpickle here (a
                    # SystemExit from code that unpickling imports or runs is no exit of ours)
                    raise self._unreadable_error(worker, error, traceback.format_exc()) from None
        return answers

    def _timeout_error(self, workers: set[int], what: str, timeout: float) -> WorkerError:
        running = {worker: self._running_env(worker) for worker in sorted(workers)}
        names = [self._describe(w) + ("" if env is None else f", running env {env}") for w, env in running.items()]
        first, env = next(iter(running.items()))
        return WorkerError(f"{'; '.join(names)}: did not answer {what} within {timeout} s: {self._why_late(workers)}",
                           env_id=self._envs_of(first).start if env is None else env)

    def _why_late(self, workers: set[int]) -> str:
        """What may keep ``workers`` from answering, for the timeout error (a backend may know more)."""
        if self._state is AsyncState.CLOSED:  # still starting: the workers build their envs
            return ("an env's constructor hangs or is too slow (raise startup_timeout if it is only slow; in "
                    "training, env_timeout)")
        return "an env hangs or is too slow (raise the timeout if it is only slow)"

    def _crashed_env(self, worker: int) -> int:
        """The env a dead worker was running when it died, where the backend can tell; else its first."""
        env = self._running_env(worker)
        return env if env in self._envs_of(worker) else self._envs_of(worker).start

    def _check_sendable(self, value: Any) -> None:
        """Raise if ``value`` cannot travel to the workers (backends that pickle check it here)."""

    def _running_env(self, worker: int) -> int | None:
        """The env a worker is running now, where its backend shares ``_progress`` with it (-1 until it starts
        building its envs, and for workers that cannot write there); else None."""
        if self._progress is None:
            return None
        env = int(self._progress[worker])
        return env if env >= 0 else None

    def _collect(self, workers: set[int], what: str | None, need: int | None = None,
                 timeout: float | None = None) -> list[tuple[int, Status, Any]]:
        """Answers from ``workers``: all of them, or as soon as ``need`` came. Closes on failure.

        The timeout counts from when each worker was sent its command: a worker that hangs while the
        others keep filling batches is caught too. ``what`` names the wait (None: the workers' reset/step).
        """
        need = len(workers) if need is None else need
        timeout = self.timeout if timeout is None else timeout
        now = time.monotonic()
        sent = {worker: self._sent.get(worker, (now, None))[0] for worker in workers}
        pending, answers = set(workers), []
        try:
            while True:
                now = time.monotonic()
                overdue = set() if timeout is None else {w for w in pending if now - sent[w] >= timeout}
                if len(answers) >= need and not overdue:
                    return answers
                left = None if timeout is None else max(0.0, min(sent[w] for w in pending) + timeout - now)
                got = self._wait(pending, left, max(1, need - len(answers)))
                if not got:
                    now = time.monotonic()
                    late = {w for w in pending if now - sent[w] >= timeout * 0.999} or pending
                    raise self._timeout_error(late, what or self._last_command(late), timeout)
                for worker, status, payload in got:
                    if status is Status.FAILED:
                        raise self._failure_error(worker, payload)
                    pending.discard(worker)
                    answers.append((worker, status, payload))
        except BaseException as error:  # WorkerError, KeyboardInterrupt: the workers are in an unknown state
            closed_under_us = self._closed
            self.close()
            if closed_under_us and isinstance(error, Exception):
                raise self._closed_under_us(f"waiting for {what or 'its workers'}") from None
            raise

    def _closed_under_us(self, doing: str) -> APIUsageError:
        """The error for a call whose vec env another thread or a signal handler closed while it was ``doing``
        something: what then fails (a pipe, a list of workers) is a consequence, not the cause."""
        return APIUsageError(f"{type(self).__name__} was closed while {doing} (close() from a signal handler or "
                             f"another thread)")

    def _last_command(self, workers: set[int]) -> str:
        commands = {self._sent[worker][1] for worker in workers if worker in self._sent}
        return "reset" if commands == {Command.RESET} else f"step {self._steps[min(workers)]}"

    def _settle(self, workers) -> None:
        """Bring in the reset/step answers still out for ``workers``; they wait in ``_ready`` for recv()."""
        out = self._in_flight & set(workers)
        if out:
            for worker, _, infos in self._collect(out, None):
                self._ready.append((worker, infos))
            self._in_flight -= out

    def _check_state(self, expected: AsyncState, call: str) -> None:
        if self._state is not expected or self._closed:
            if self._state is AsyncState.CLOSED or self._closed:
                raise APIUsageError(f"{call} on a closed {type(self).__name__}: make a new vec env")
            raise APIUsageError(f"{call} called out of order: expected a call to {self._state.value} first")

    def _check_open(self, call: str) -> None:
        if self._state is AsyncState.CLOSED or self._closed:
            raise APIUsageError(f"{call} on a closed {type(self).__name__}: make a new vec env")

    def _check_sync(self, call: str) -> None:
        self._check_open(call)
        if self.batch_size != self.num_envs:
            raise APIUsageError(
                f"{call} needs batch_size == num_envs ({self.num_envs}), got batch_size={self.batch_size}: "
                f"use async_reset()/send()/recv(), whose batches say which envs they hold (env_ids)")

    def _seeds(self, seed) -> list:
        if seed is None:
            return [None] * self.num_envs
        if is_int(seed) and seed >= 0:
            return [int(seed) + i for i in range(self.num_envs)]
        seeds = list(seed) if isinstance(seed, np.ndarray) and seed.ndim == 1 else seed
        if isinstance(seeds, Sequence) and len(seeds) == self.num_envs and all(
                s is None or is_int(s) and s >= 0 for s in seeds):
            return [None if s is None else int(s) for s in seeds]
        raise APIUsageError(f"seed must be None, an int >= 0 (env i gets seed + i) or a list or 1-D integer array of "
                            f"{self.num_envs} such seeds, got {seed!r}")

    # -------------------------------------------------------------- async API

    @_one_caller
    def async_reset(self, seed: int | Sequence[int | None] | np.ndarray | None = None) -> None:
        """Start resetting every env; env ``i`` gets ``seed + i``, or ``seed[i]`` for a list or 1-D integer array.
        Collect the result with :meth:`recv`.

        Steps still in flight are finished and their results dropped.
        """
        self._async_reset(seed)

    def _async_reset(self, seed) -> None:
        self._check_open("async_reset()")
        seeds = self._seeds(seed)
        self._settle(range(self.num_workers))
        self._ready.clear()
        for worker in range(self.num_workers):
            envs = self._envs_of(worker)
            self._send_or_close(worker, Command.RESET, seeds[envs.start:envs.stop])
        self._in_flight = set(range(self.num_workers))
        self._advance(AsyncState.WAITING, "sending reset to its workers")

    @_one_caller
    def recv(self) -> Batch:
        """The next ``batch_size`` envs to finish their reset or step (see :class:`Batch`)."""
        return self._recv()

    def _recv(self) -> Batch:
        self._check_state(AsyncState.WAITING, "recv()")
        need = self._workers_per_batch - len(self._ready)
        if need > 0:
            for worker, _, infos in self._collect(self._in_flight, None, need):
                self._in_flight.discard(worker)
                self._ready.append((worker, infos))
        taken = sorted(self._ready.popleft() for _ in range(self._workers_per_batch))
        workers = [worker for worker, _ in taken]
        self._batch_workers = workers
        self._advance(AsyncState.HOLDING, "waiting for its workers")
        rows_per_worker = self.envs_per_worker * self.max_agents
        if workers[-1] - workers[0] == len(workers) - 1:  # contiguous: views, no copy
            rows = slice(workers[0] * rows_per_worker, (workers[-1] + 1) * rows_per_worker)
            env_ids = np.arange(workers[0] * self.envs_per_worker, (workers[-1] + 1) * self.envs_per_worker)
        else:
            rows = np.concatenate([np.arange(w * rows_per_worker, (w + 1) * rows_per_worker) for w in workers])
            env_ids = np.concatenate([np.arange(self._envs_of(w).start, self._envs_of(w).stop) for w in workers])
        self._batch_rows = rows
        infos = [info for _, group in taken for info in group]
        b = self._buffers
        return Batch(b.obs[rows], b.rewards[rows], b.terminals[rows], b.truncations[rows], b.masks[rows],
                     infos, env_ids)

    @_one_caller
    def send(self, actions) -> None:
        """Step the envs of the last batch from :meth:`recv` with ``actions`` ``(batch agents, atn_size)``.

        For ``atn_size == 1`` a flat ``(batch agents,)`` array is accepted too.
        """
        self._send(actions)

    def _send(self, actions) -> None:
        self._check_state(AsyncState.HOLDING, "send(actions)")
        self._actions[self._batch_rows] = self._checked_actions(actions)
        for worker in self._batch_workers:
            self._steps[worker] += 1
            self._send_or_close(worker, Command.STEP, None)
        self._in_flight.update(self._batch_workers)
        self._advance(AsyncState.WAITING, "sending step to its workers")

    def _advance(self, state: AsyncState, doing: str) -> None:
        """Move to ``state`` once a call's work is done, unless close() came meanwhile (from another thread or
        a signal handler, while the last answers still came in): then the call fails as if it had come first."""
        if self._closed:
            raise self._closed_under_us(doing)
        self._state = state

    def _send_or_close(self, worker: int, command: Command, payload: Any) -> None:
        self._sent[worker] = time.monotonic(), command
        try:
            self._dispatch(worker, command, payload)
        except BaseException as error:
            closed_under_us = self._closed
            self.close()
            if closed_under_us and isinstance(error, Exception):
                raise self._closed_under_us(f"sending {command.value} to {self._describe(worker)}") from None
            raise

    def _checked_actions(self, actions) -> np.ndarray:
        layout = self.binding.atn_layout
        rows = self.batch_size * self.max_agents
        expected = (rows, self._atn_size)
        try:
            array = as_array(actions, "actions")
        except SpaceError as error:
            raise APIUsageError(f"send(actions): {error}") from None
        if array.shape != expected:
            if array.size == rows * self._atn_size and array.shape in (
                    (rows,), (self.batch_size, self.max_agents, self._atn_size)):
                array = array.reshape(expected)
            else:
                raise self._dict_actions_error(actions, array) or APIUsageError(
                    f"send(actions): expected {self._actions_shape()}, got {shape_of(actions, array)}")
        try:
            bad = layout.invalid_rows(array)
        except SpaceError as error:
            raise self._dict_actions_error(actions, array) or APIUsageError(f"send(actions): {error}") from None
        if bad is None:
            return layout.held(array)
        bad &= self._buffers.masks[self._batch_rows]  # dead slots' actions are ignored
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            env = int(self._batch_env_ids()[row // self.max_agents])
            allowed = layout.allowed()
            raise APIUsageError(f"send(actions): row {row} (env {env}, slot {row % self.max_agents}) holds "
                                f"{array[row]}: expected {allowed}")
        return layout.held(array)

    def _actions_shape(self) -> str:
        return (f"shape {(self.batch_size * self.max_agents, self._atn_size)} (batch_size {self.batch_size} envs x "
                f"max_agents {self.max_agents} slots, atn_size {self._atn_size}) for {self.single_action_space}")

    def _dict_actions_error(self, actions, array: np.ndarray) -> APIUsageError | None:
        """For actions that hold a dict (PettingZoo's ``{agent: action}``), which are refused anyway: say so."""
        if not holds_dict(actions, array):
            return None
        agents = self.binding.possible_agents
        if not self.binding.is_multiagent:
            return APIUsageError(f"send(actions): got a dict of actions, but a vec env takes one array of "
                                 f"{self._actions_shape()}")
        order = (f", env-major: row e * {self.max_agents} + k holds the action of agent k of env e, agents in sorted "
                 f"order {_short(list(agents))}")
        return APIUsageError(f"send(actions): got a dict of actions (PettingZoo's {{agent: action}}), but a vec env "
                             f"takes one array of {self._actions_shape()}{order}")

    def _batch_env_ids(self) -> np.ndarray:
        return np.concatenate([np.arange(self._envs_of(w).start, self._envs_of(w).stop) for w in self._batch_workers])

    # -------------------------------------------------------------- sync API

    @_one_caller
    def reset(self, seed: int | Sequence[int | None] | np.ndarray | None = None) -> tuple[np.ndarray, list]:
        """Reset every env (env ``i`` gets ``seed + i``, or ``seed[i]`` for a list or 1-D integer array).
        Returns ``(obs (num_agents, obs_size), infos)``."""
        self._check_sync("reset()")
        self._async_reset(seed)
        batch = self._recv()
        return batch.obs, batch.infos

    @_one_caller
    def step(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
        """``send(actions)`` then ``recv()``: ``(obs, rewards, terminals, truncations, infos)`` over all slots."""
        self._check_sync("step()")
        self._send(actions)
        batch = self._recv()
        return batch.obs, batch.rewards, batch.terminals, batch.truncations, batch.infos

    @property
    def masks(self) -> np.ndarray:
        """``bool (num_agents,)``: which slots of every env hold a live agent's data after the last reset/step.
        With ``batch_size < num_envs`` the rows of envs outside the last batch may be mid-step: read
        ``batch.masks``."""
        return self._buffers.masks

    # -------------------------------------------------------------- any env, local or remote

    @_one_caller
    def call(self, method: str, /, *args, env_ids: Sequence[int] | None = None, **kwargs) -> list:
        """``env.method(*args, **kwargs)`` on each env of ``env_ids`` (default all); one result per env.

        ``method`` is looked up on the emulated env first, then on the env it wraps (``.env``), then on
        that env's innermost env (``.env.unwrapped``, under wrappers such as gymnasium.make's), so both
        ``call("render")`` and an env's own methods work. Arguments and results must pickle; each env
        gets its own copy of the arguments, and the results are copies.
        """
        return self._access(Command.CALL, env_ids, method, args, kwargs)

    @_one_caller
    def get_attr(self, name: str, env_ids: Sequence[int] | None = None) -> list:
        """The attribute ``name`` of each env of ``env_ids`` (emulated env, ``.env``, ``.env.unwrapped``)."""
        return self._access(Command.GET_ATTR, env_ids, name)

    @_one_caller
    def set_attr(self, name: str, value: Any, env_ids: Sequence[int] | None = None) -> None:
        """Set ``name`` on each env of ``env_ids``: where :meth:`get_attr` finds it, else on the innermost env."""
        self._access(Command.SET_ATTR, env_ids, name, value)

    def _access(self, command: Command, env_ids, name: str, *rest) -> list:
        self._check_open(f"{command.value}()")
        if not isinstance(name, str):
            raise APIUsageError(f"{command.value}(): the name must be a str, got {type(name).__name__}")
        if env_ids is not None and (not isinstance(env_ids, (Sequence, np.ndarray, range))
                                    or getattr(env_ids, "ndim", 1) == 0):  # a 0-d array: one index, no list
            one = env_ids.item() if isinstance(env_ids, np.ndarray) and env_ids.size == 1 else env_ids
            raise APIUsageError(f"{command.value}(): env_ids must be a list of env indices or None, got "
                                f"{type(env_ids).__name__} {env_ids!r}" + (f": pass [{one}]" if is_int(one) else ""))
        ids = list(range(self.num_envs)) if env_ids is None else list(env_ids)
        bad = [i for i in ids if not is_int(i) or not 0 <= i < self.num_envs]
        if bad:
            raise APIUsageError(f"{command.value}(): env_ids must be ints in [0, {self.num_envs}), got {bad[0]!r}")
        by_worker: dict[int, list[int]] = {}
        for env_id in ids:
            by_worker.setdefault(int(env_id) // self.envs_per_worker, []).append(int(env_id) % self.envs_per_worker)
        try:
            self._check_sendable(rest)
        except Exception as error:
            raise APIUsageError(f"{command.value}(): the arguments cannot be sent to the workers: "
                                f"{type(error).__name__}: {error}") from error
        self._settle(by_worker)  # a worker answers in order: its step comes first
        for worker, indices in by_worker.items():
            self._send_or_close(worker, command, (indices, name, *rest))
        results, mistakes = {}, {}  # worker -> its results, in the order of its env_ids (repeats included)
        for worker, status, payload in self._collect(set(by_worker), f"{command.value}({name!r})"):
            if status is Status.USAGE_ERROR:
                mistakes[worker] = payload
                continue
            results[worker] = iter(payload)
        if mistakes:
            raise self._usage_error(min(mistakes), f"{command.value}(): {mistakes[min(mistakes)]}")
        return [next(results[int(env_id) // self.envs_per_worker]) for env_id in ids]

    # -------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Stop every worker and free every buffer. Safe to call twice: once done, later calls do nothing; a
        close that an interrupt (Ctrl-C) cut short is finished by the next (or by garbage collection)."""
        if getattr(self, "_shut_down", True):  # done, or its __init__ failed before owning anything
            return
        self._closed = True
        self._state = AsyncState.CLOSED
        if not self._closing.acquire(blocking=False):  # another thread's close runs, or the one a handler interrupted
            return
        try:
            if os.getpid() == self._owner_pid:  # not a copy inherited by a forked child: the workers are ours
                self._shutdown()
            self._shut_down = True
        finally:
            self._closing.release()

    def __reduce_ex__(self, protocol: Any) -> Any:
        # copy.copy, copy.deepcopy and pickle all come here: two owners of one set of workers would close them
        # under each other (and a Serial copy would step envs whose results the original never sees).
        raise APIUsageError(f"{type(self).__name__}: a vec env owns processes and envs and cannot be copied or "
                            f"pickled: make another with shoal.vector.make")

    def __enter__(self) -> "VecEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit modules may be gone; nothing useful to report
            pass

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.binding.env_name!r}, num_workers={self.num_workers}, "
                f"envs_per_worker={self.envs_per_worker}, batch_size={self.batch_size}, state={self._state.name})")
