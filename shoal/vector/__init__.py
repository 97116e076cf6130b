"""Run many emulated envs at once: in this process, in worker processes, or in Ray actors.

Every backend has the same constructor ``(binding, num_workers, envs_per_worker, batch_size, **options)``
and the same API (:class:`~shoal.vector.base.VecEnv`); see ``docs/vector.md``.

>>> import gymnasium, shoal, shoal.vector
>>> binding = shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",))
>>> with shoal.vector.make(binding, "serial", num_workers=2, envs_per_worker=2) as vecenv:
...     obs, infos = vecenv.reset(seed=0)
>>> obs.shape   # (num_envs * max_agents, obs_size)
(4, 4)
"""

from __future__ import annotations

from typing import Any

from shoal.emulation import Binding
from shoal.errors import APIUsageError
from shoal.vector.base import AsyncState, Batch, VecEnv, default_num_workers
from shoal.vector.multiprocessing import Multiprocessing
from shoal.vector.ray import Ray
from shoal.vector.serial import Serial

BACKENDS: dict[str, type[VecEnv]] = {"serial": Serial, "multiprocessing": Multiprocessing, "ray": Ray}


def make(binding: Binding, backend: str | type[VecEnv] = "serial", num_workers: int | None = None,
         envs_per_worker: int = 1, batch_size: int | None = None, **options: Any) -> VecEnv:
    """A vec env of ``num_workers * envs_per_worker`` copies of ``binding``'s env.

    Args:
        backend: "serial", "multiprocessing", "ray", or a VecEnv class.
        num_workers: default 1 for "serial", one per core for the others.
        options: backend options, e.g. ``timeout=`` (multiprocessing, ray), ``context=`` (multiprocessing),
            ``address=`` (ray).
    """
    if isinstance(backend, str):
        cls = BACKENDS.get(backend)
        if cls is None:
            raise APIUsageError(f"make(): backend must be one of {sorted(BACKENDS)} or a VecEnv class, got {backend!r}")
    elif isinstance(backend, type) and issubclass(backend, VecEnv):
        cls = backend
    else:
        raise APIUsageError(f"make(): backend must be one of {sorted(BACKENDS)} or a VecEnv class, got {backend!r}")
    if num_workers is not None:
        options["num_workers"] = num_workers
    return cls(binding, envs_per_worker=envs_per_worker, batch_size=batch_size, **options)


__all__ = ["make", "BACKENDS", "default_num_workers", "VecEnv", "Batch", "AsyncState", "Serial", "Multiprocessing", "Ray"]
