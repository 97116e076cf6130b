"""Serial backend: every env runs in the caller's process, one after the other.

The reference for the other backends (same answers, same errors) and the fastest choice for one core
or very cheap envs. Work happens in ``send``; ``recv`` only hands back what is done.
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Any

import numpy as np

from shoal.emulation import Binding, Buffers
from shoal.errors import APIUsageError, WorkerError
from shoal.vector.base import Command, EnvGroup, Failure, Status, VecEnv


class Serial(VecEnv):
    """``num_workers * envs_per_worker`` envs stepped in this process.

    ``num_workers`` only groups envs into batch units, as in the parallel backends, so the same
    arguments give the same batches everywhere. An env that raises becomes a :class:`WorkerError`
    (chained to the original exception). An env in this process cannot be interrupted, so ``timeout=`` is
    refused: use Multiprocessing or Ray for that.

    >>> import gymnasium, shoal
    >>> vecenv = Serial(shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",)), envs_per_worker=4)
    >>> obs, infos = vecenv.reset(seed=0)
    >>> obs.shape
    (4, 4)
    """

    backend = "serial"

    def __init__(self, binding: Binding, num_workers: int = 1, envs_per_worker: int = 1,
                 batch_size: int | None = None, *, timeout: None = None):
        if timeout is not None:
            raise APIUsageError(f"Serial: timeout={timeout!r}: an env that runs in this process cannot be "
                                f"interrupted; Multiprocessing and Ray take timeout=")
        super().__init__(binding, num_workers, envs_per_worker, batch_size)
        buffers = Buffers.allocate(binding, self.num_envs)
        actions = np.zeros((self.num_agents, self._atn_size), self.single_action_space.dtype)
        self._answers: deque = deque()  # (worker, status, payload) done in send, handed out by recv
        self._groups: list[EnvGroup] = []
        for worker in range(self.num_workers):
            rows = self._worker_rows(worker)
            group = EnvGroup(binding, self._envs_of(worker), Buffers(*(a[rows] for a in buffers)), actions[rows])
            self._groups.append(group)
            status, failure = group.start()
            if status is not Status.OK:
                error = self._failure_error(worker, failure)
                self.close()
                raise error from group.exception
        self._start(buffers, actions)

    def _dispatch(self, worker: int, command: Command, payload: Any) -> None:
        status, answer = self._groups[worker].handle(command, payload)
        if status is Status.OK and command in (Command.CALL, Command.GET_ATTR):
            try:  # a copy, as the other backends' results are: not a live view into an env or our buffers
                answer = copy.deepcopy(answer)
            except Exception as error:
                self._groups[worker].exception = error
                status, answer = Status.USAGE_ERROR, (f"the result of {command.value} cannot be copied: "
                                                      f"{type(error).__name__}: {error} (results are copies on every "
                                                      f"backend)")
        self._answers.append((worker, status, answer))

    def _wait(self, workers: set[int], timeout: float | None, need: int = 1) -> list[tuple[int, Status, Any]]:
        answers = [answer for answer in self._answers if answer[0] in workers]
        self._answers = deque(answer for answer in self._answers if answer[0] not in workers)
        return answers

    def _failure_error(self, worker: int, failure: Failure) -> WorkerError:
        error = super()._failure_error(worker, failure)
        error.__cause__ = self._groups[worker].exception  # the real exception, for debuggers
        return error

    def _usage_error(self, worker: int, message: str) -> APIUsageError:
        error = super()._usage_error(worker, message)
        error.__cause__ = self._groups[worker].exception  # the env's own exception, if one was raised
        return error

    def _shutdown(self) -> None:
        for group in getattr(self, "_groups", []):
            group.close()
        self._groups = []
        self._answers = deque()
