"""Ray backend: one actor per worker, each holding ``envs_per_worker`` envs, on this machine or a cluster.

Each reset/step is one remote call per worker (never per env). The actor steps its envs into its own
buffers and returns them; the parent copies them into its buffers when :meth:`recv` collects them.
``ray`` is imported only when a :class:`Ray` vec env is built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shoal.emulation import Binding, Buffers
from shoal.errors import APIUsageError, WorkerError
from shoal.vector.base import Command, EnvGroup, Status, VecEnv, default_num_workers


def import_ray():
    """The ``ray`` module, or an error that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise APIUsageError(
            f"the Ray backend needs ray, which is not installed ({error}): pip install 'shoal[ray]'") from error
    return ray


class RayWorker:
    """The body of one Ray actor (wrapped with ``ray.remote`` when a vec env is built)."""

    def __init__(self, binding: Binding, env_ids: range):
        self.buffers = Buffers.allocate(binding, len(env_ids))
        self.actions = np.zeros((len(self.buffers.masks), binding.atn_layout.size), binding.atn_layout.dtype)
        self.group = EnvGroup(binding, env_ids, self.buffers, self.actions)
        self.started = self.group.start()

    def ready(self) -> tuple[Status, Any]:
        return self.started

    def run(self, command: Command, payload: Any) -> tuple[Status, Any]:
        """Answer one command; reset/step answers carry the buffers: ``(Buffers, infos)``."""
        if command is Command.STEP:
            self.actions[:] = payload
        status, answer = self.group.handle(command, payload)
        if status is Status.OK and command in (Command.RESET, Command.STEP):
            return status, (self.buffers, answer)  # serialized right here, so reusing the buffers is safe
        if status is Status.OK and command in (Command.CALL, Command.GET_ATTR):
            from ray import cloudpickle

            try:  # an unpicklable result is the caller's mistake: say so, and keep the actor
                cloudpickle.dumps(answer)
            except Exception as error:
                return Status.USAGE_ERROR, (f"the result of {command.value} cannot be sent to the parent: "
                                            f"{type(error).__name__}: {error} (results must pickle)")
        return status, answer

    def close(self) -> None:
        self.group.close()


class Ray(VecEnv):
    """Envs in ``num_workers`` Ray actors with ``envs_per_worker`` envs each.

    Args:
        num_workers: actors to start; default one per core of this machine.
        envs_per_worker: envs each actor steps per remote call.
        batch_size: envs per :meth:`recv` batch (a multiple of ``envs_per_worker``); default all.
        timeout: seconds a reset/step/call may take before its actors count as hung (WorkerError).
        startup_timeout: seconds the actors may take to be scheduled and build their envs.
        address: the Ray cluster to join when Ray is not initialized yet (None starts a local one).
            shoal leaves a Ray it started running; call ``ray.shutdown()`` when done with it.
        actor_options: passed to ``ray.remote`` for each actor, e.g. ``{"num_cpus": 1}``.
    """

    backend = "ray"

    def __init__(self, binding: Binding, num_workers: int | None = None, envs_per_worker: int = 1,
                 batch_size: int | None = None, *, timeout: float | None = None, startup_timeout: float = 120.0,
                 address: str | None = None, actor_options: dict | None = None):
        ray = import_ray()
        super().__init__(binding, default_num_workers() if num_workers is None else num_workers,
                         envs_per_worker, batch_size, timeout)
        self._ray = ray
        self._actors: list = []
        self._refs: dict = {}  # ObjectRef -> (worker, command) of every call still out
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        actor_class = ray.remote(**(actor_options or {}))(RayWorker) if actor_options else ray.remote(RayWorker)
        try:
            for worker in range(self.num_workers):
                self._actors.append(actor_class.remote(binding, self._envs_of(worker)))
        except BaseException:
            self.close()
            raise
        self._buffers = Buffers.allocate(binding, self.num_envs)
        actions = np.zeros((self.num_agents, self._atn_size), self.single_action_space.dtype)
        for worker, actor in enumerate(self._actors):
            self._refs[actor.ready.remote()] = (worker, None)
        self._collect(set(range(self.num_workers)), "startup (building its envs)", timeout=startup_timeout)
        self._start(self._buffers, actions)

    def _dispatch(self, worker: int, command: Command, payload: Any) -> None:
        if command is Command.STEP:
            payload = self._actions[self._worker_rows(worker)]
        self._refs[self._actors[worker].run.remote(command, payload)] = (worker, command)

    def _wait(self, workers: set[int], timeout: float | None) -> list[tuple[int, Status, Any]]:
        ray = self._ray
        refs = [ref for ref, (worker, _) in self._refs.items() if worker in workers]
        done, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if done and rest:  # take whatever else is finished too
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            done += more
        try:
            results = ray.get(done)  # one round trip for all of them
        except ray.exceptions.RayError:
            results = [None] * len(done)  # find out which one failed, below
        answers = []
        for ref, result in zip(done, results):
            worker, command = self._refs.pop(ref)
            try:
                status, payload = ray.get(ref) if result is None else result
            except ray.exceptions.RayActorError as error:
                raise WorkerError(f"{self._describe(worker)}: its Ray actor died at step {self._steps}: "
                                  f"{type(error).__name__}", str(error), self._envs_of(worker).start) from None
            except ray.exceptions.RayError as error:
                raise WorkerError(f"{self._describe(worker)}: its Ray call failed at step {self._steps}: "
                                  f"{type(error).__name__}", str(error), self._envs_of(worker).start) from None
            if status is Status.OK and command in (Command.RESET, Command.STEP):
                buffers, payload = payload
                rows = self._worker_rows(worker)
                for mine, theirs in zip(self._buffers, buffers):
                    mine[rows] = theirs
            answers.append((worker, status, payload))
        return answers

    def _check_sendable(self, value: Any) -> None:
        from ray import cloudpickle

        cloudpickle.dumps(value)

    def _shutdown(self) -> None:
        ray, actors = getattr(self, "_ray", None), getattr(self, "_actors", [])
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
