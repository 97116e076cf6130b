"""shoal.vector: the same answers on every backend, clear errors, faults that never hang, nothing left behind."""

from __future__ import annotations

import collections
import contextlib
import copy
import gc
import importlib.util
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gymnasium
import numpy as np
import psutil
import pytest
import torch

import shoal
import shoal.vector
from envs import NestedMultiAgentEnv, ProbeEnv, ReseedingNestedMultiAgentEnv, SecondResetFails, Unpicklable
from shoal.errors import APIUsageError, WorkerError
from shoal.vector import Batch, Multiprocessing, Ray, Serial

BACKENDS = ["serial", "multiprocessing", "ray"]
PARALLEL = ["multiprocessing", "ray"]
TRACEBACK = "Traceback \\(most recent call last\\)"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def warm_forkserver():
    """The forkserver (and its resource tracker) start with the first vec env and then stay: start them now."""
    Multiprocessing(shoal.Binding(env_cls=ProbeEnv), num_workers=1).close()


@pytest.fixture
def make(request, warm_forkserver):
    """``make(binding, backend, **kwargs)``: a vec env that is closed after the test."""
    made = []

    def build(binding, backend, **kwargs):
        if backend == "ray":
            request.getfixturevalue("ray_cluster")
        vecenv = shoal.vector.make(binding, backend, **kwargs)
        made.append(vecenv)
        return vecenv

    yield build
    for vecenv in made:
        vecenv.close()


def _children() -> dict[int, str]:
    """This process's descendants (pid: command line), without Ray's processes and theirs, which come and go."""
    found = {}
    for child in psutil.Process().children():
        try:
            if "ray" in " ".join(child.cmdline()):
                continue
            for process in [child, *child.children(recursive=True)]:
                if process.status() != psutil.STATUS_ZOMBIE:
                    found[process.pid] = " ".join(process.cmdline())
        except psutil.Error:
            pass
    return found


def _ray_actors() -> int:
    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        return 0
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # this session's Ray, even if others run beside it
    return len(list_actors(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False))


def _resources() -> dict:
    return {"child processes": _children(), "/dev/shm": set(os.listdir("/dev/shm")), "ray actors": _ray_actors()}


@pytest.fixture
def no_leaks(request, warm_forkserver):
    """Fails the test if a process, a /dev/shm entry or a Ray actor it made outlives it."""
    if "ray" in request.node.name:
        request.getfixturevalue("ray_cluster")
    before = _resources()
    yield before
    deadline = time.monotonic() + 15  # dead actors take a moment to be reported
    while (after := _resources()) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after == before


def cartpole() -> shoal.Binding:
    return shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",))


def nested_multiagent() -> shoal.Binding:
    return shoal.Binding(env_cls=ReseedingNestedMultiAgentEnv, env_kwargs={"max_steps": 12})


# ---------------------------------------------------------------- same answers everywhere


def _actions(binding: shoal.Binding, env_ids: np.ndarray, turns: dict[int, int]) -> np.ndarray:
    """Actions that depend only on (env id, how many times that env acted): the same on every backend."""
    nvec = binding.single_action_space.nvec
    rows = []
    for env_id in env_ids:
        rng = np.random.default_rng([int(env_id), turns[int(env_id)]])
        rows.append(rng.integers(0, nvec, size=(binding.max_agents, len(nvec))))
        turns[int(env_id)] += 1
    return np.concatenate(rows)


def _trajectories(vecenv, recvs: int, seed: int = 7) -> dict[int, list]:
    """Per env, everything it returned, in order, driven with the actions above."""
    binding, per_env = vecenv.binding, {i: [] for i in range(vecenv.num_envs)}
    turns = dict.fromkeys(range(vecenv.num_envs), 0)
    vecenv.async_reset(seed)
    for _ in range(recvs):
        batch = vecenv.recv()
        assert isinstance(batch, Batch) and len(batch.infos) == len(batch.env_ids) == vecenv.batch_size
        assert batch.obs.shape == (vecenv.batch_size * binding.max_agents, binding.single_observation_space.shape[0])
        for k, env_id in enumerate(batch.env_ids):
            rows = slice(k * binding.max_agents, (k + 1) * binding.max_agents)
            final = {agent: info["final_observation"].tolist() for agent, info in batch.infos[k].items()
                     if "final_observation" in info}
            per_env[int(env_id)].append((batch.obs[rows].tolist(), batch.rewards[rows].tolist(),
                                         batch.terminals[rows].tolist(), batch.truncations[rows].tolist(),
                                         batch.masks[rows].tolist(), final))
        vecenv.send(_actions(binding, batch.env_ids, turns))
    return per_env


@pytest.mark.parametrize("binding_fn", [cartpole, nested_multiagent], ids=["cartpole", "nested-multiagent"])
@pytest.mark.parametrize("batch_size", [None, 2], ids=["full-batch", "half-batch"])
@pytest.mark.parametrize("backend", PARALLEL)
def test_backends_agree_with_serial(make, backend, binding_fn, batch_size):
    binding = binding_fn()
    kwargs = dict(num_workers=2, envs_per_worker=2, batch_size=batch_size)
    recvs = 60 if batch_size is None else 120  # long enough for episode ends and autoresets
    expected = _trajectories(make(binding, "serial", **kwargs), recvs)
    got = _trajectories(make(binding, backend, **kwargs), recvs)
    for env_id in expected:  # a partial batch may interleave envs differently; each env's history is the same
        n = min(len(expected[env_id]), len(got[env_id]))
        assert n >= 10 if batch_size else n == recvs  # who finishes first is up to the OS
        assert got[env_id][:n] == expected[env_id][:n], f"env {env_id} differs"
    assert any(step[5] for history in expected.values() for step in history), "no episode ended: test too short"


def test_ray_without_shared_memory_agrees_with_serial(make):
    """Actors on other nodes send their results through Ray's object store: the same answers."""
    binding = nested_multiagent()
    kwargs = dict(num_workers=2, envs_per_worker=2, batch_size=2)
    vecenv = make(binding, "ray", shared_memory=False, **kwargs)
    assert vecenv._shared == [False, False]
    got, expected = _trajectories(vecenv, 40), _trajectories(make(binding, "serial", **kwargs), 40)
    for env_id in expected:
        n = min(len(expected[env_id]), len(got[env_id]))
        assert n >= 5 and got[env_id][:n] == expected[env_id][:n], f"env {env_id} differs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_api_matches_the_data_contract(make, backend):
    binding = nested_multiagent()
    vecenv = make(binding, backend, num_workers=2, envs_per_worker=2)
    assert (vecenv.num_envs, vecenv.num_agents) == (4, 4 * binding.max_agents)
    assert vecenv.single_observation_space == binding.single_observation_space
    assert vecenv.single_action_space == binding.single_action_space
    obs, infos = vecenv.reset(seed=3)
    assert obs.shape == (vecenv.num_agents, binding.single_observation_space.shape[0]) and len(infos) == 4
    single = binding.make_env()
    for env_id in range(4):  # env i gets seed + i, slots are env-major
        expected, _ = single.reset(seed=3 + env_id)
        np.testing.assert_array_equal(obs[env_id * binding.max_agents:(env_id + 1) * binding.max_agents], expected)
    actions = np.zeros((vecenv.num_agents, len(binding.single_action_space.nvec)), np.int64)
    obs, rewards, terminals, truncations, infos = vecenv.step(actions)
    assert rewards.dtype == np.float32 and terminals.dtype == truncations.dtype == vecenv.masks.dtype == bool
    assert vecenv.masks.shape == (vecenv.num_agents,) and vecenv.masks.any() and not vecenv.masks.all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_batches_cover_every_env(make, backend):
    vecenv = make(cartpole(), backend, num_workers=4, envs_per_worker=2, batch_size=4)
    vecenv.async_reset(0)
    seen = set()
    for _ in range(500):  # the first 4 envs to finish each time; every env gets its turns
        # (a worker the OS leaves unscheduled for a while on a busy machine may miss a few batches)
        if seen == set(range(8)):
            break
        batch = vecenv.recv()
        assert len(set(batch.env_ids)) == 4 and list(batch.env_ids) == sorted(batch.env_ids)
        assert batch.env_ids.tolist() in ([0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 6, 7], [2, 3, 4, 5], [2, 3, 6, 7],
                                          [4, 5, 6, 7])  # whole workers
        seen |= set(batch.env_ids.tolist())
        vecenv.send(np.ones(4, np.int64))  # (batch agents,) is accepted for a one-dimensional action
    assert seen == set(range(8))


def test_multiprocessing_start_methods_agree(make):
    binding = cartpole()
    expected = _trajectories(make(binding, "serial", num_workers=2), 10)
    for context in ("fork", "spawn"):
        assert _trajectories(make(binding, "multiprocessing", num_workers=2, context=context), 10) == expected


# ---------------------------------------------------------------- any env, local or remote


@pytest.mark.parametrize("backend", BACKENDS)
def test_attributes_under_the_envs_own_wrappers_are_reached(make, backend):
    # gymnasium.make's wrappers and PettingZoo's AEC-to-parallel conversion do not pass names on.
    from pettingzoo.classic import rps_v2

    gym = make(shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",)), backend, num_workers=1)
    gym.reset(seed=0)
    assert gym.get_attr("gravity") == [9.8]
    gym.set_attr("gravity", 1.0)
    assert gym.get_attr("unwrapped")[0].gravity == 1.0  # on the env itself, not on a wrapper
    rps = make(shoal.Binding(env_creator=rps_v2.env, env_kwargs=dict(max_cycles=15)), backend, num_workers=1)
    rps.reset(seed=0)
    rps.set_attr("max_cycles", 2)  # read by the env itself: its episodes end after 2 moves now
    rps.step(np.zeros((2, 1), np.int64))
    assert rps.get_attr("max_cycles") == [2] and rps.step(np.zeros((2, 1), np.int64))[3].all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_call_get_attr_set_attr(make, backend):
    vecenv = make(shoal.Binding(env_cls=ProbeEnv), backend, num_workers=2, envs_per_worker=2)
    vecenv.reset(seed=0)
    vecenv.step(np.zeros((4, 1), np.int64))
    pids = vecenv.call("pid")
    if backend == "serial":
        assert pids == [os.getpid()] * 4
    else:
        assert pids[0] == pids[1] != pids[2] == pids[3] and os.getpid() not in pids
    assert vecenv.call("scaled", 3, factor=2, env_ids=[3, 0]) == [6, 6]
    assert vecenv.call("count", env_ids=[1, 1, 0, 1]) == [1, 2, 1, 3]  # a repeated env runs again, in order
    assert vecenv.get_attr("tick") == [1, 1, 1, 1]  # on the emulated env
    vecenv.set_attr("crash_step", 99, env_ids=[1])  # not on the emulated env: passes through to the raw env
    assert vecenv.get_attr("crash_step") == [10**9, 99, 10**9, 10**9]
    vecenv.set_attr("note", "hello", env_ids=[2])
    assert vecenv.get_attr("note", env_ids=[2]) == ["hello"]
    # The emulated env's own names are not for replacing: its buffers are the vec env's (PettingZoo's AEC envs
    # have a rewards dict of their own: setting it must not swap the emulated env's reward buffer out)
    with pytest.raises(APIUsageError, match=r"^set_attr\(\): env 0 \(ProbeEnv\): set_attr\('rewards'\) would "
                                            r"replace the emulated env's own 'rewards' \(shoal.EmulatedEnv's\), which "
                                            r"the vec env relies on: refused$"):
        vecenv.set_attr("rewards", np.zeros(1, np.float32))
    with pytest.raises(APIUsageError, match=r"set_attr\('render'\) would replace .*: refused; the env it wraps has a "
                                            r"'render' too, which set_attr cannot reach under that name: set it from a "
                                            r"method of your env, with call\(\)$"):
        vecenv.set_attr("render", None, env_ids=[3])
    assert vecenv.step(np.ones((4, 1), np.int64))[1].tolist() == [1.0] * 4
    with pytest.raises(APIUsageError, match="env 0 \\(ProbeEnv\\) has no attribute 'nope': looked up on the "
                                            "emulated env, the env it wraps"):
        vecenv.call("nope")
    with pytest.raises(APIUsageError, match="call\\(\\): env 0 \\(ProbeEnv\\): 'crash_step' is a int, not a method: use "
                                            "get_attr"):
        vecenv.call("crash_step")
    with pytest.raises(APIUsageError, match=r"env_ids must be ints in \[0, 4\), got 4"):
        vecenv.get_attr("tick", env_ids=[4])
    for one in (1, np.int64(1), np.array(1)):
        with pytest.raises(APIUsageError, match=r"env_ids must be a list of env indices or None, got .*: pass \[1\]"):
            vecenv.get_attr("tick", env_ids=one)
    # Each env gets its own copy of the arguments and results are copies, on every backend (Serial copies them):
    # an env that changes its argument in place changes no other env's, nor the caller's.
    counter = []
    assert vecenv.call("bump", counter) == [[1]] * 4 and counter == []
    vecenv.set_attr("note", [])
    assert vecenv.call("bump") == [[1]] * 4
    vecenv.get_attr("masks")[0][:] = False
    assert vecenv.masks.all()
    assert vecenv.call("echo", 1, method=2, env_ids=[0]) == [((1,), {"method": 2})]  # call()'s own name too
    unsent, unsendable = ("copied", "copied for each env") if backend == "serial" else (
        "sent to the parent", "sent to the workers")
    with pytest.raises(APIUsageError, match=f"call\\(\\): the result of call cannot be {unsent}: .*lock"):
        vecenv.call("lock", env_ids=[1])
    with pytest.raises(APIUsageError, match=f"call\\(\\): the arguments cannot be {unsendable}: .*lock"):
        vecenv.call("scaled", threading.Lock())
    vecenv.step(np.zeros((4, 1), np.int64))  # still usable after a usage error


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_env_exception_in_call_or_set_attr_is_reported_and_the_vec_env_stays_open(make, backend):
    vecenv = make(probe(), backend, num_workers=2, envs_per_worker=2)
    vecenv.reset(seed=0)
    with pytest.raises(APIUsageError, match=f"(?s)^call\\(\\): env 3 \\(ProbeEnv\\): scaled\\(\\) raised TypeError: "
                                            f"can't multiply sequence by non-int of type 'float' \\(the vec env stays "
                                            f"open\\)\n\nWorker traceback:\n{TRACEBACK}.*in scaled\n") as caught:
        vecenv.call("scaled", [1], factor=1.5, env_ids=[3])
    if backend == "serial":  # chained to the env's own exception, as a WorkerError is
        assert isinstance(caught.value.__cause__, TypeError)
    with pytest.raises(APIUsageError, match="^set_attr\\(\\): env 0 \\(ProbeEnv\\): setting 'unwrapped' raised "
                                            "AttributeError: property 'unwrapped' of 'ProbeEnv' object has no setter"):
        vecenv.set_attr("unwrapped", 1)
    with pytest.raises(APIUsageError, match=r"env 1 \(ProbeEnv\): unprintable\(\) raised Unprintable: <exception "
                                            r"str\(\) failed> \(the vec env stays open\)"):
        vecenv.call("unprintable", env_ids=[1])
    assert "CLOSED" not in repr(vecenv) and vecenv.call("scaled", 2) == [2, 2, 2, 2]
    assert vecenv.step(np.zeros((4, 1), np.int64))[1].tolist() == [1.0] * 4  # its workers are all still there


@pytest.mark.parametrize("backend", PARALLEL)
def test_call_waits_for_steps_in_flight(make, backend):
    vecenv = make(shoal.Binding(env_cls=ProbeEnv), backend, num_workers=2, envs_per_worker=1, batch_size=1)
    vecenv.async_reset(0)
    batch = vecenv.recv()
    vecenv.send(np.zeros((1, 1), np.int64))
    assert vecenv.get_attr("tick") == [1, 0] if batch.env_ids[0] == 0 else [0, 1]
    for _ in range(3):  # the answers collected by get_attr still come out of recv
        batch = vecenv.recv()
        vecenv.send(np.zeros((1, 1), np.int64))
    assert sum(vecenv.get_attr("tick")) == 4


# ---------------------------------------------------------------- usage errors


def test_bad_construction_arguments():
    binding = cartpole()
    with pytest.raises(APIUsageError, match="num_workers must be a positive int, got 0"):
        Serial(binding, num_workers=0)
    with pytest.raises(APIUsageError, match="envs_per_worker must be a positive int, got 1.5"):
        Multiprocessing(binding, envs_per_worker=1.5)
    with pytest.raises(APIUsageError, match="batch_size must be a multiple of envs_per_worker=2 .* got 3"):
        Serial(binding, num_workers=2, envs_per_worker=2, batch_size=3)
    with pytest.raises(APIUsageError, match="at most num_envs=4, got 6"):
        Serial(binding, num_workers=2, envs_per_worker=2, batch_size=6)
    with pytest.raises(APIUsageError, match="timeout must be a positive number of seconds or None, got -1"):
        Multiprocessing(binding, timeout=-1)
    with pytest.raises(APIUsageError, match="Serial: timeout=1: an env that runs in this process cannot be "
                                            "interrupted; Multiprocessing and Ray take timeout="):
        Serial(binding, timeout=1)
    with pytest.raises(APIUsageError, match="Serial: unknown keyword argument 'context': it takes binding, "
                                            "num_workers, envs_per_worker, batch_size, timeout \\(None only\\)$"):
        Serial(binding, context="fork")
    with pytest.raises(APIUsageError, match="Multiprocessing: unknown keyword argument 'timeuot': it takes binding, "
                                            "num_workers, envs_per_worker, batch_size, timeout, startup_timeout, "
                                            "context$"):
        shoal.vector.make(binding, "multiprocessing", timeuot=1)
    with pytest.raises(APIUsageError, match="Ray: unknown keyword argument 'shared_mem': it takes .*, shared_memory$"):
        Ray(binding, shared_mem=False)  # refused before Ray starts
    with pytest.raises(APIUsageError, match="context must be one of .* got 'threads'"):
        Multiprocessing(binding, context="threads")
    with pytest.raises(APIUsageError, match="expected a shoal.Binding as first argument, got TimeLimit: pass how to build"):
        Serial(gymnasium.make("CartPole-v1"))
    with pytest.raises(APIUsageError, match="backend must be one of \\['multiprocessing', 'ray', 'serial'\\]"):
        shoal.vector.make(binding, "threads")
    with pytest.raises(APIUsageError, match="startup_timeout must be a positive number of seconds or None, got 0"):
        Multiprocessing(binding, startup_timeout=0)
    with Multiprocessing(binding, num_workers=1, timeout=math.inf, startup_timeout=1e9) as vecenv:  # no limit
        assert vecenv.timeout is None and vecenv.reset(seed=0)[0].shape == (1, 4)
    with Serial(binding, num_workers=2) as vecenv:
        with pytest.raises(APIUsageError, match="seed must be None, an int .* got \\[1.5, 2\\]"):
            vecenv.reset([1.5, 2])
        with pytest.raises(APIUsageError, match="seed must be None, an int >= 0 .* got -5"):
            vecenv.reset(-5)
        with pytest.raises(APIUsageError, match="env_ids must be a list of env indices or None, got int 1: pass \\[1\\]"):
            vecenv.get_attr("t", env_ids=1)


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_a_vec_env_cannot_be_copied_or_pickled(make, backend):
    vecenv = make(cartpole(), backend, num_workers=2)
    first = vecenv.reset(seed=0)[0].copy()
    for duplicate in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(APIUsageError, match=f"{type(vecenv).__name__}: a vec env owns processes and envs and "
                                                f"cannot be copied or pickled: make another with shoal.vector.make"):
            duplicate(vecenv)
    gc.collect()
    obs, rewards, *_ = vecenv.step(np.zeros(2, np.int64))  # the original is whole
    assert rewards.tolist() == [1.0, 1.0] and not np.array_equal(obs, first)


def test_bad_ray_arguments(ray_cluster):
    binding = cartpole()
    with pytest.raises(APIUsageError, match="shared_memory must be True or False, got 'yes'"):
        Ray(binding, shared_memory="yes")
    with pytest.raises(APIUsageError, match="actor_options must be a dict of ray.remote options .* got 3"):
        Ray(binding, actor_options=3)
    with pytest.raises(APIUsageError, match="actor_options must be a dict .* got \\{'num_cpu': 1\\}"):
        Ray(binding, actor_options={"num_cpu": 1})
    with pytest.raises(APIUsageError, match="address must be a str .* got 5"):
        Ray(binding, address=5)
    with pytest.raises(APIUsageError, match="address='10.0.0.1:6379', but this process is already connected"):
        Ray(binding, address="10.0.0.1:6379")


def test_ray_actor_options_the_cluster_cannot_provide(no_leaks):
    ray = sys.modules["ray"]
    with pytest.raises(APIUsageError, match="Ray: actor_options ask for num_gpus=1 per actor, 1 GPU for 1 actor, but the "
                                            "Ray cluster has GPU 0 in all \\(it has CPU 2, memory .*\\), so Ray could "
                                            "never schedule them"):
        Ray(cartpole(), num_workers=1, actor_options={"num_gpus": 1})
    with pytest.raises(APIUsageError, match="ask for num_cpus=1 per actor, 3 CPU for 3 actors, but the Ray cluster has "
                                            "CPU 2 in all"):
        Ray(cartpole(), num_workers=3, actor_options={"num_cpus": 1})
    with pytest.raises(APIUsageError, match="ask for resources=\\{'shoal_test': 1\\} per actor, 1 shoal_test for 1 actor, "
                                            "but the Ray cluster has shoal_test 0 in all"):
        Ray(cartpole(), num_workers=1, actor_options={"resources": {"shoal_test": 1}})
    group = ray.util.placement_group([{"CPU": 2}])  # holds every CPU: an actor that needs one waits for it
    ray.get(group.ready(), timeout=60)
    try:
        with pytest.raises(WorkerError, match="worker 0 \\(envs 0-0 of CartPole-v1\\): did not answer startup "
                                              "\\(building its envs\\) within 2 s: Ray never finished creating the "
                                              "actor of worker 0: it waits for resources no node has free \\(each "
                                              "actor asks for num_cpus=1; the cluster has CPU 0 free now\\)"):
            Ray(cartpole(), num_workers=1, actor_options={"num_cpus": 1}, startup_timeout=2)
    finally:
        ray.util.remove_placement_group(group)


def test_local_creators_work_and_unpicklable_bindings_are_a_clear_error(no_leaks, make):
    vecenv = make(shoal.Binding(env_creator=lambda: gymnasium.make("CartPole-v1")), "multiprocessing",
                  num_workers=1, context="spawn")  # the binding travels with cloudpickle
    assert vecenv.reset(seed=0)[0].shape == (1, 4)
    with open(__file__) as log:  # cloudpickle would send a copy of the text: the env's writes would be lost
        binding = shoal.Binding(env_creator=lambda: (log, gymnasium.make("CartPole-v1"))[1])
        with pytest.raises(APIUsageError, match="cannot be sent to a 'forkserver' worker: PicklingError: open file "
                                                "'.*test_vector.py' cannot be sent to another process"):
            Multiprocessing(binding, num_workers=1)
        with pytest.raises(APIUsageError, match="Ray: the binding of CartPole-v1 cannot be sent to the actors: "
                                                "PicklingError: open file"):
            make(binding, "ray", num_workers=1)
    lock = threading.Lock()
    binding = shoal.Binding(env_creator=lambda: (lock, gymnasium.make("CartPole-v1"))[1])
    with pytest.raises(APIUsageError, match="the binding of CartPole-v1 cannot be sent to a 'spawn' worker: TypeError: "
                                            "cannot pickle '_thread.lock' object. Everything it holds .* must pickle"):
        Multiprocessing(binding, num_workers=1, context="spawn")
    with pytest.raises(APIUsageError, match="Ray: the binding of CartPole-v1 cannot be sent to the actors: TypeError: "
                                            ".*lock.* Everything it holds .* must pickle"):
        make(binding, "ray", num_workers=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_out_of_order(make, backend):
    vecenv = make(cartpole(), backend, num_workers=2, envs_per_worker=1)
    actions = np.zeros((2, 1), np.int64)
    with pytest.raises(APIUsageError, match="recv\\(\\) called out of order: expected a call to reset\\(\\) or "
                                            "async_reset\\(\\) first"):
        vecenv.recv()
    with pytest.raises(APIUsageError, match="send\\(actions\\) called out of order: expected a call to reset"):
        vecenv.step(actions)
    vecenv.async_reset()
    with pytest.raises(APIUsageError, match="send\\(actions\\) called out of order: expected a call to recv\\(\\)"):
        vecenv.send(actions)
    vecenv.recv()
    with pytest.raises(APIUsageError, match="recv\\(\\) called out of order: expected a call to send\\(actions\\)"):
        vecenv.recv()
    vecenv.send(actions)
    vecenv.reset()  # a reset is always allowed: steps in flight are finished and dropped
    vecenv.close()
    vecenv.close()  # idempotent
    with pytest.raises(APIUsageError, match="reset\\(\\) on a closed .*: make a new vec env"):
        vecenv.reset()
    with pytest.raises(APIUsageError, match="step\\(\\) on a closed .*: make a new vec env"):
        vecenv.step(actions)
    halves = make(cartpole(), backend, num_workers=2, batch_size=1)
    halves.close()
    with pytest.raises(APIUsageError, match="reset\\(\\) on a closed .*: make a new vec env"):  # not: use async
        halves.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_actions(make, backend):
    vecenv = make(nested_multiagent(), backend, num_workers=2, envs_per_worker=1)
    vecenv.reset(seed=0)
    rows, size = vecenv.num_agents, len(vecenv.single_action_space.nvec)
    with pytest.raises(APIUsageError, match=f"expected shape \\({rows}, {size}\\) \\(batch_size 2 envs x max_agents "
                                            f"5 slots, atn_size {size}\\) for MultiDiscrete.* got \\(3, {size}\\)"):
        vecenv.send(np.zeros((3, size), np.int64))
    with pytest.raises(APIUsageError, match="takes integer actions, got dtype float32"):
        vecenv.send(np.zeros((rows, size), np.float32))
    with pytest.raises(APIUsageError, match="send\\(actions\\): actions must be one array .* got Tensor: can't convert "
                                            "meta device"):
        vecenv.send(torch.zeros((rows, size), dtype=torch.int64, device="meta"))  # as a GPU tensor would
    with pytest.raises(APIUsageError, match="actions must be one array .* got list: setting an array element"):
        vecenv.send([[0] * size] * (rows - 1) + [[0] * (size + 1)])
    agents = vecenv.binding.possible_agents
    for pettingzoo_style in ({agent: 0 for agent in agents}, [{agent: 0 for agent in agents}] * 2):
        with pytest.raises(APIUsageError, match=f"send\\(actions\\): got a dict of actions \\(PettingZoo's \\{{agent: "
                                                f"action\\}}\\), but a vec env takes one array of shape \\({rows}, {size}\\) "
                                                f".* env-major: row e \\* 5 \\+ k holds the action of agent k of env e, "
                                                f"agents in sorted order \\['agent_0', .*'late'\\]$"):
            vecenv.send(pettingzoo_style)
    actions = np.zeros((rows, size), np.int64)
    actions[1, 0] = 7
    with pytest.raises(APIUsageError, match="row 1 \\(env 0, slot 1\\) holds \\[7 0 0 0\\]: expected 0 <= a < \\[2 3 4 5\\]"):
        vecenv.send(actions)
    vecenv.send(np.zeros((2, 5, size), np.int32))  # (batch_size, max_agents, atn_size) and int32 are fine
    vecenv.recv()


def test_dict_actions_to_a_single_agent_vec_env_are_named_without_pettingzoo(make):
    vecenv = make(shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",)), "serial", num_workers=1,
                  envs_per_worker=2)
    vecenv.reset(seed=0)
    with pytest.raises(APIUsageError, match=r"^send\(actions\): got a dict of actions, but a vec env takes one "
                                            r"array of shape \(2, 1\)"):
        vecenv.send([{0: 1}, {0: 0}])


class HalfPrecisionActions(gymnasium.Env):
    """An unbounded float16 action, which a trainer sends as float32; the env records what it got."""

    observation_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)
    action_space = gymnasium.spaces.Box(-np.inf, np.inf, (1,), np.float16)

    def reset(self, seed=None, options=None):
        self.got = None
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.got = action.tolist()
        return np.zeros(1, np.float32), 0.0, False, False, {}


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's "overflow encountered in cast"
def test_a_finite_action_past_a_narrower_flat_dtype_arrives_finite(make):
    vecenv = make(shoal.Binding(env_cls=HalfPrecisionActions), "serial", num_workers=1, envs_per_worker=2)
    vecenv.reset(seed=0)
    vecenv.step(np.array([[7e4], [-np.inf]], np.float32))
    assert vecenv.get_attr("got") == [[65504.0], [-np.inf]]


def test_sync_api_needs_a_full_batch(make):
    vecenv = make(cartpole(), "serial", num_workers=2, batch_size=1)
    with pytest.raises(APIUsageError, match="reset\\(\\) needs batch_size == num_envs \\(2\\), got batch_size=1: "
                                            "use async_reset\\(\\)/send\\(\\)/recv\\(\\)"):
        vecenv.reset()


@pytest.mark.parametrize("seed", ["7", [1, 2, 3], np.array([1.0, 2.0]), np.array([[1], [2]]), np.array([3, -1])])
def test_bad_seed(make, seed):
    vecenv = make(cartpole(), "serial", num_workers=2)
    with pytest.raises(APIUsageError, match="seed must be None, an int >= 0 \\(env i gets seed \\+ i\\) or a list or 1-D "
                                            "integer array of 2 such seeds, got"):
        vecenv.reset(seed=seed)


def test_seeds_as_an_integer_array(make):
    vecenv = make(cartpole(), "serial", num_workers=3)
    listed = vecenv.reset(seed=[4, 9, 2])[0].copy()
    assert np.array_equal(vecenv.reset(seed=np.array([4, 9, 2], np.int32))[0], listed)
    assert np.array_equal(vecenv.reset(seed=np.arange(3))[0], vecenv.reset(seed=0)[0].copy())


def test_ray_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(APIUsageError, match=r"the Ray backend needs ray, which is not installed .*: pip install "
                                            r"'ray\[default\]>=2.9' 'pyarrow<26' \(in a checkout of shoal: "
                                            r"./install.sh ray\)"):
        Ray(cartpole())


def test_importing_shoal_vector_does_not_import_ray():
    code = "import sys, shoal.vector; assert 'ray' not in sys.modules, 'ray was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- faults


def probe() -> shoal.Binding:
    return shoal.Binding(env_cls=ProbeEnv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_env_exception_becomes_worker_error(no_leaks, backend):
    vecenv = shoal.vector.make(probe(), backend, num_workers=2, envs_per_worker=2)
    vecenv.reset(seed=0)
    vecenv.set_attr("crash_step", 2, env_ids=[3])
    vecenv.step(np.zeros((4, 1), np.int64))
    with pytest.raises(WorkerError, match=f"(?s)worker 1 \\(envs 2-3 of ProbeEnv\\) failed in step at its step 2, "
                                          f"in env 3: ValueError: CrashingEnv crashed at step 2.*{TRACEBACK}.*"
                                          f"in step\n.*raise ValueError") as caught:
        vecenv.step(np.zeros((4, 1), np.int64))
    assert caught.value.env_id == 3 and "CrashingEnv crashed" in caught.value.worker_traceback
    with pytest.raises(APIUsageError, match="on a closed"):  # an error closes the vec env
        vecenv.step(np.zeros((4, 1), np.int64))


@pytest.mark.parametrize("backend", PARALLEL)
def test_sys_exit_in_an_env_becomes_worker_error(no_leaks, backend):
    vecenv = shoal.vector.make(probe(), backend, num_workers=2, envs_per_worker=2)
    vecenv.reset(seed=0)
    vecenv.set_attr("exit_step", 1, env_ids=[2])
    with pytest.raises(WorkerError, match=f"(?s)worker 1 \\(envs 2-3 of ProbeEnv\\) failed in step at its step 1, "
                                          f"in env 2: SystemExit: 3.*{TRACEBACK}.*sys.exit"):
        vecenv.step(np.zeros((4, 1), np.int64))


@pytest.mark.parametrize("backend", PARALLEL)
def test_a_binding_that_does_not_unpickle_in_the_worker_is_named(no_leaks, make, backend, tmp_path, monkeypatch):
    (tmp_path / "file_env.py").write_text("import gymnasium\nclass FileEnv(gymnasium.Env):\n"
                                          "    observation_space = action_space = gymnasium.spaces.Discrete(2)\n")
    spec = importlib.util.spec_from_file_location("file_env", tmp_path / "file_env.py")  # not importable by name
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "file_env", module)
    spec.loader.exec_module(module)
    binding = shoal.Binding(env_cls=module.FileEnv)
    named = ("failed in start at its step 0, in no env: the binding does not unpickle in the worker process: "
             if backend == "multiprocessing" else "its Ray actor could not be created: ")
    with pytest.raises(WorkerError, match=re.escape(named + "ModuleNotFoundError: No module named 'file_env'")):
        make(binding, backend, num_workers=1)


def test_workers_run_the_parents_shoal_where_a_script_puts_its_own_first(tmp_path):
    """The forkserver does not take the script's sys.path: preloading shoal there would give the workers the
    shoal a fresh interpreter finds (this checkout's), not the copy the script imports."""
    project = tmp_path / "project"
    shutil.copytree(Path(shoal.__file__).parent, project / "shoal")  # vendored: the script's folder comes first
    (project / "where.py").write_text(textwrap.dedent("""
        import sys
        import gymnasium, shoal, shoal.vector

        class Where(gymnasium.Wrapper):
            def where(self):
                return sys.modules["shoal"].__file__

        if __name__ == "__main__":
            binding = shoal.Binding(env_creator=lambda: Where(gymnasium.make("CartPole-v1")))
            with shoal.vector.make(binding, "multiprocessing", num_workers=1) as vecenv:
                print(shoal.__file__ == vecenv.call("where")[0], shoal.__file__.startswith(sys.path[0]))
        """))
    done = subprocess.run([sys.executable, str(project / "where.py")], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.stdout.split() == ["True", "True"], done.stderr


def test_a_script_without_a_main_guard_gets_a_clear_error(tmp_path):
    script = tmp_path / "unguarded.py"  # forkserver workers import the main script: this one starts workers again
    script.write_text("import gymnasium, shoal\nfrom shoal.vector import Multiprocessing\n"
                      "binding = shoal.Binding(env_creator=gymnasium.make, env_args=('CartPole-v1',))\n"
                      "Multiprocessing(binding, num_workers=1).close()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "WorkerError" in done.stderr and 'must sit under `if __name__ == "__main__":`' in done.stderr
    guarded = ("import gymnasium, shoal\nfrom shoal.vector import Multiprocessing\nif __name__ == '__main__':\n"
               "    binding = shoal.Binding(env_creator=gymnasium.make, env_args=('CartPole-v1',))\n"
               "    Multiprocessing(binding, num_workers=1).close()\n")
    done = subprocess.run([sys.executable, "-"], input=guarded, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)  # `python - < script.py`: a script read from stdin cannot be imported again
    assert "a script read from stdin cannot be imported again: save it to a file" in done.stderr


@pytest.mark.parametrize("backend", PARALLEL)
def test_env_exception_while_building(no_leaks, backend):
    binding = shoal.Binding(env_cls=ProbeEnv, env_kwargs={"fail_outside_pid": os.getpid()})
    with pytest.raises(WorkerError, match=f"(?s)failed in start at its step 0, in env [02]: RuntimeError: ProbeEnv "
                                          f"refuses to start in process.*{TRACEBACK}"):
        shoal.vector.make(binding, backend, num_workers=2, envs_per_worker=2)


@pytest.mark.parametrize("backend", PARALLEL)
def test_sys_exit_while_building_becomes_worker_error(no_leaks, backend):
    home = os.getpid()

    def needs_a_license():  # builds here (the Binding probes it), exits in a worker
        if os.getpid() != home:
            sys.exit("license server not reachable")
        return ProbeEnv()

    with pytest.raises(WorkerError, match=f"(?s)failed in start at its step 0, in env [02]: SystemExit: license "
                                          f"server not reachable.*{TRACEBACK}.*in needs_a_license") as caught:
        shoal.vector.make(shoal.Binding(env_creator=needs_a_license), backend, num_workers=2, envs_per_worker=2)
    assert caught.value.env_id in (0, 2)


@pytest.mark.parametrize("backend", PARALLEL)
def test_an_env_constructor_that_hangs_or_ends_the_process_is_named(no_leaks, backend):
    home = os.getpid()

    def slow_to_build():  # builds here (the Binding probes it), hangs in a worker
        if os.getpid() != home:
            time.sleep(3600)
        return ProbeEnv()

    with pytest.raises(WorkerError, match=r"worker 0 \(envs 0-1 of slow_to_build\), running env 0; worker 1 \(envs "
                                          r"2-3 of slow_to_build\), running env 2: did not answer startup \(building "
                                          r"its envs\) within \d+ s: an env's constructor hangs or is too slow \(raise "
                                          r"startup_timeout"):
        shoal.vector.make(shoal.Binding(env_creator=slow_to_build), backend, num_workers=2, envs_per_worker=2,
                          startup_timeout=3 if backend == "multiprocessing" else 20)  # Ray's actors start slowly
    if backend == "ray":  # without shared memory the parent cannot see an actor build: Ray counts it pending
        with pytest.raises(WorkerError, match=r"worker 0 \(envs 0-1 of slow_to_build\); worker 1 \(envs 2-3 of "
                                              r"slow_to_build\): did not answer startup \(building its envs\) within "
                                              r"\d+ s: an env's constructor hangs or is too slow \(raise startup_timeout"
                                              r".*\) \(Ray counts the actors of workers \[0, 1\] pending creation"):
            shoal.vector.make(shoal.Binding(env_creator=slow_to_build), backend, num_workers=2, envs_per_worker=2,
                              startup_timeout=20, shared_memory=False)
    if backend == "multiprocessing":  # not blamed on a missing __main__ guard: shoal's code ran in the worker

        def exits_while_building():
            if os.getpid() != home:
                os._exit(0)
            return ProbeEnv()

        with pytest.raises(WorkerError, match=r"exited with code 0 at its step 0, running env [02]: the process died "
                                              r"without a Python error"):
            shoal.vector.make(shoal.Binding(env_creator=exits_while_building), backend, num_workers=2,
                              envs_per_worker=2)


def test_joining_a_ray_cluster_where_none_answers_is_a_clear_error():
    from shoal.vector.ray import _join

    ray = pytest.importorskip("ray")
    with pytest.raises(APIUsageError, match=r"Ray: nothing answers at address='127.0.0.1:1' \(.*refused\): start a "
                                            r"Ray cluster there"):
        _join(ray, "127.0.0.1:1", 5.0)  # Ray itself would retry for minutes
    with pytest.raises(APIUsageError, match=r"nothing answers at address='127.0.0.1:1'"):
        _join(ray, "127.0.0.1:1", None)  # startup_timeout=None: no limit for the actors, 10 s for this
    with pytest.raises(APIUsageError, match=r"Ray: cannot join a Ray cluster at address='nonsense': Invalid address"):
        _join(ray, "nonsense", 5.0)  # Ray's own ValueError, before


def test_a_ray_started_by_a_thread_that_ends_outlives_it():
    # Ray's node processes die with the thread that started them: shoal starts Ray from one of its own that
    # lives as long as the process (the node died with the caller's thread, and Ray ended the process later).
    script = textwrap.dedent("""
        import threading, gymnasium, numpy as np, shoal, shoal.vector
        binding = shoal.Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",))
        made = []
        builder = threading.Thread(target=lambda: made.append(shoal.vector.make(binding, "ray", num_workers=1)))
        builder.start()
        builder.join()
        with made[0] as vecenv:
            vecenv.reset(seed=0)
        with shoal.vector.make(binding, "ray", num_workers=1, startup_timeout=30) as vecenv:
            vecenv.reset(seed=0)
            vecenv.step(np.zeros((1, 1), np.int64))
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_an_info_that_does_not_pickle_names_its_env_and_agent(no_leaks):
    class Exiting:
        def __reduce__(self):  # env code that ends the process while its info is pickled
            raise SystemExit(7)

    class LockInInfoEnv(NestedMultiAgentEnv):  # local: cloudpickle sends it by value
        lock_agent = None
        exit_agent = None

        def step(self, actions):
            *results, infos = super().step(actions)
            if self.lock_agent in infos:
                infos[self.lock_agent]["lock"] = threading.Lock()
            if self.exit_agent in infos:
                infos[self.exit_agent]["exit"] = Exiting()
            return (*results, infos)

    vecenv = shoal.vector.make(shoal.Binding(env_cls=LockInInfoEnv), "multiprocessing", num_workers=1,
                               envs_per_worker=2)
    vecenv.reset(seed=0)
    vecenv.set_attr("lock_agent", "agent_2", env_ids=[1])
    with pytest.raises(WorkerError, match="worker 0 \\(envs 0-1 of .*\\) failed in step at its step 1, in env 1: the "
                                          "info of agent 'agent_2' cannot be sent to the parent: TypeError: cannot "
                                          "pickle '_thread.lock' object \\(infos must pickle\\)") as caught:
        vecenv.step(np.zeros((vecenv.num_agents, len(vecenv.single_action_space.nvec)), np.int64))
    assert caught.value.env_id == 1
    vecenv = shoal.vector.make(shoal.Binding(env_cls=LockInInfoEnv), "multiprocessing", num_workers=1)
    vecenv.reset(seed=0)
    vecenv.set_attr("exit_agent", "agent_1")
    with pytest.raises(WorkerError, match="failed in step at its step 1, in env 0: the info of agent 'agent_1' cannot "
                                          "be sent to the parent: SystemExit: 7 \\(infos must pickle\\)") as caught:
        vecenv.step(np.zeros((vecenv.num_agents, len(vecenv.single_action_space.nvec)), np.int64))
    assert "SystemExit: 7" in caught.value.worker_traceback


def unreadable_answers() -> shoal.Binding:
    """A ProbeEnv whose ``call("unreadable")``, and whose infos after ``set_attr("unreadable_info", True)``,
    pickle in the worker but do not unpickle in the parent. Local classes: cloudpickle sends them by value."""

    class Unreadable:
        def __reduce__(self):  # unpickling fails, as for an exception whose __init__ does not take its args
            return int, ("unreadable",)

    class Exiting:
        def __reduce__(self):  # unpickling ends the process, as importing a module that runs argparse can
            return sys.exit, (5,)

    class UnreadableAnswersEnv(ProbeEnv):
        unreadable_info = False

        def exiting(self):
            return Exiting()

        def step(self, action):
            obs, reward, terminated, truncated, info = super().step(action)
            return obs, reward, terminated, truncated, {"odd": Unreadable()} if self.unreadable_info else info

        def unreadable(self):
            return Unreadable()

    return shoal.Binding(env_cls=UnreadableAnswersEnv)


@pytest.mark.parametrize("backend, options", [("multiprocessing", {}), ("ray", {"shared_memory": False})],
                         ids=["multiprocessing", "ray-calls"])  # local Ray actors answer as multiprocessing's do
def test_an_answer_that_does_not_unpickle_in_the_parent_is_a_worker_error(no_leaks, backend, options):
    unpickling = "could not be unpickled in the parent: ValueError: invalid literal for int\\(\\) .*'unreadable'"
    vecenv = shoal.vector.make(unreadable_answers(), backend, num_workers=2, **options)
    vecenv.reset(seed=0)
    with pytest.raises(WorkerError, match=f"worker 1 \\(envs 1-1 of UnreadableAnswersEnv\\): its answer to call at "
                                          f"its step 0 {unpickling}") as caught:
        vecenv.call("unreadable", env_ids=[1])
    assert caught.value.env_id == 1 and "ValueError" in caught.value.worker_traceback
    vecenv = shoal.vector.make(unreadable_answers(), backend, num_workers=2, **options)
    with pytest.raises(WorkerError, match="worker 0 .*: its answer to call at its step 0 could not be unpickled in "
                                          "the parent: SystemExit: 5"):  # no exit of the caller's
        vecenv.call("exiting", env_ids=[0])
    vecenv = shoal.vector.make(unreadable_answers(), backend, num_workers=2, **options)
    vecenv.reset(seed=0)
    vecenv.set_attr("unreadable_info", True, env_ids=[0])
    with pytest.raises(WorkerError, match=f"worker 0 .*: its answer to step at its step 1 {unpickling}"):
        vecenv.step(np.zeros((2, 1), np.int64))


# Local Ray actors take commands on a socket; with shared_memory=False (as on another node) by Ray calls.
WORKER_PATHS = [("multiprocessing", {}), ("ray", {}), ("ray", {"shared_memory": False})]
WORKER_PATH_IDS = ["multiprocessing", "ray", "ray-calls"]


@pytest.mark.parametrize("backend, options", WORKER_PATHS, ids=WORKER_PATH_IDS)
def test_arguments_that_do_not_unpickle_in_the_worker_or_do_not_pickle_are_refused(no_leaks, backend, options,
                                                                                   tmp_path):
    vecenv = shoal.vector.make(probe(), backend, num_workers=2, **options)
    vecenv.reset(seed=0)
    with pytest.raises(APIUsageError, match="the command's arguments do not unpickle in the worker: .*TypeError"):
        vecenv.call("pid", Unpicklable(code=3))
    with pytest.raises(APIUsageError, match="the command's arguments do not unpickle in the worker: .*TypeError"):
        vecenv.set_attr("note", Unpicklable(code=3), env_ids=[1])
    with pytest.raises(APIUsageError, match="call\\(\\): the arguments cannot be sent to the workers: TypeError: "
                                            ".*lock"):
        vecenv.call("scaled", threading.Lock())
    assert [fns[0]() for fns in vecenv.call("scaled", [lambda: 1])] == [1, 1]  # a lambda travels (cloudpickle)
    with open(tmp_path / "log.txt", "a+") as log:  # cloudpickle would send a copy of its text: the writes lost
        with pytest.raises(APIUsageError, match="set_attr\\(\\): the arguments cannot be sent to the workers: "
                                                "PicklingError: open file '.*log.txt' cannot be sent to another "
                                                "process"):
            vecenv.set_attr("log", log)
    assert len(vecenv.call("pid")) == 2  # still usable
    vecenv.close()


@pytest.mark.parametrize("mid_step", [False, True], ids=["idle", "mid-step"])
@pytest.mark.parametrize("backend, options", WORKER_PATHS, ids=WORKER_PATH_IDS)
def test_killed_worker_becomes_worker_error(no_leaks, backend, options, mid_step):
    vecenv = shoal.vector.make(probe(), backend, num_workers=2, envs_per_worker=2, **options)
    vecenv.reset(seed=0)
    pid = vecenv.call("pid", env_ids=[2])[0]
    if mid_step:
        vecenv.set_attr("hang", True, env_ids=[2])
        vecenv.set_attr("crash_step", 1, env_ids=[2])
        vecenv.send(np.zeros((4, 1), np.int64))
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    expected = "killed by SIGKILL" if backend == "multiprocessing" else "its Ray actor died"
    start = time.monotonic()
    with pytest.raises(WorkerError, match=f"worker 1 \\(envs 2-3 of ProbeEnv\\).*{expected}") as caught:
        vecenv.recv() if mid_step else vecenv.step(np.zeros((4, 1), np.int64))
    assert time.monotonic() - start < 10 and caught.value.env_id == 2


@pytest.mark.parametrize("backend, options", WORKER_PATHS, ids=WORKER_PATH_IDS)
def test_a_killed_worker_is_reported_while_another_hangs(no_leaks, backend, options):
    vecenv = shoal.vector.make(probe(), backend, num_workers=2, timeout=60, **options)
    vecenv.reset(seed=0)
    pid = vecenv.call("pid", env_ids=[1])[0]
    vecenv.set_attr("hang", True)  # both, so that worker 1 dies in the middle of its step
    vecenv.set_attr("crash_step", 1)
    vecenv.send(np.zeros((2, 1), np.int64))
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerError, match="worker 1 \\(envs 1-1 of ProbeEnv\\).*(killed by SIGKILL|its Ray actor died)"):
        vecenv.recv()
    assert time.monotonic() - start < 10  # not after the hung worker's timeout


def test_processes_an_env_started_end_with_its_worker_even_when_its_close_never_runs(no_leaks):
    home = os.getpid()

    class ServerEnv(ProbeEnv):  # local: cloudpickle sends it by value
        def __init__(self):
            super().__init__()
            self.server = subprocess.Popen(["sleep", "300"]) if os.getpid() != home else None
            self.server_pid = self.server and self.server.pid

        def close(self):
            if self.server is not None:
                self.server.kill()
                self.server.wait()

    vecenv = shoal.vector.make(shoal.Binding(env_cls=ServerEnv), "multiprocessing", num_workers=2, timeout=1.0)
    vecenv.reset(seed=0)
    servers = vecenv.get_attr("server_pid")
    vecenv.set_attr("hang", True, env_ids=[1])
    vecenv.set_attr("crash_step", 1, env_ids=[1])
    with pytest.raises(WorkerError, match="did not answer step 1 within 1.0 s"):
        vecenv.step(np.zeros((2, 1), np.int64))  # worker 1 is killed: its env's close() never runs

    def running() -> list[int]:
        alive = []
        for pid in servers:
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    deadline = time.monotonic() + 5  # SIGKILL is sent at once; a loaded machine may take a moment to end them
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running()


@pytest.mark.parametrize("backend, options", WORKER_PATHS, ids=WORKER_PATH_IDS)
def test_hung_env_times_out(no_leaks, backend, options):
    vecenv = shoal.vector.make(probe(), backend, num_workers=2, envs_per_worker=2, timeout=1.0, **options)
    vecenv.reset(seed=0)
    vecenv.set_attr("hang", True, env_ids=[1])
    vecenv.set_attr("crash_step", 1, env_ids=[1])
    start = time.monotonic()
    running = "" if options else ", running env 1"  # without shared memory the driver cannot see inside
    with pytest.raises(WorkerError, match=f"worker 0 \\(envs 0-1 of ProbeEnv\\){running}: did not answer step 1 "
                                          f"within 1.0 s: an env hangs or is too slow") as caught:
        vecenv.step(np.zeros((4, 1), np.int64))
    assert time.monotonic() - start < 5
    assert caught.value.env_id == (0 if options else 1)  # else the worker's first env


@pytest.mark.parametrize("backend, options", WORKER_PATHS, ids=WORKER_PATH_IDS)
def test_a_hung_env_times_out_while_other_workers_keep_filling_batches(no_leaks, backend, options):
    # The timeout counts from when the worker was sent its step, not from each recv().
    vecenv = shoal.vector.make(probe(), backend, num_workers=2, envs_per_worker=1, batch_size=1, timeout=1.0,
                               **options)
    vecenv.async_reset(seed=0)
    batch = vecenv.recv()
    vecenv.set_attr("hang", True, env_ids=[1])
    vecenv.set_attr("crash_step", 1, env_ids=[1])
    start = time.monotonic()
    with pytest.raises(WorkerError, match="worker 1 \\(envs 1-1 of ProbeEnv\\).*did not answer (step|reset)"):
        while time.monotonic() - start < 10:
            vecenv.send(np.zeros((1, 1), np.int64))
            batch = vecenv.recv()
    assert time.monotonic() - start < 5 and batch.env_ids.tolist() == [0]


@pytest.mark.parametrize("backend", PARALLEL)
def test_close_from_another_thread_during_recv_is_named(no_leaks, backend):
    vecenv = shoal.vector.make(probe(), backend, num_workers=2, envs_per_worker=1)
    vecenv.reset(seed=0)
    vecenv.set_attr("hang", True, env_ids=[0])
    vecenv.set_attr("crash_step", 1, env_ids=[0])
    threading.Timer(0.5, vecenv.close).start()
    with pytest.raises(APIUsageError, match="was closed while waiting for .* \\(close\\(\\) from a signal "
                                            "handler or another thread\\)"):
        vecenv.step(np.zeros((2, 1), np.int64))


def test_close_from_inside_a_serial_step_is_named(no_leaks):
    # A signal handler runs in the caller's thread, between any two bytecodes: here, inside worker 0's step, so
    # worker 1's step is sent to a vec env that has no workers left (an IndexError before).
    holder = {}

    class ClosesTheVecEnv(gymnasium.Env):
        observation_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)
        action_space = gymnasium.spaces.Discrete(2)

        def reset(self, seed=None, options=None):
            return np.zeros(1, np.float32), {}

        def step(self, action):
            holder["vecenv"].close()
            return np.zeros(1, np.float32), 0.0, False, False, {}

    vecenv = holder["vecenv"] = shoal.vector.make(shoal.Binding(env_cls=ClosesTheVecEnv), "serial", num_workers=2)
    vecenv.reset(seed=0)
    with pytest.raises(APIUsageError, match=r"Serial was closed while sending step to worker 1 .*\(close\(\) from "
                                            r"a signal handler or another thread\)"):
        vecenv.step(np.zeros((2, 1), np.int64))


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_close_from_another_thread_at_any_point_of_stepping_is_named(no_leaks, backend):
    for delay in (0.01, 0.03, 0.07):  # lands in send, in recv or between calls: always the same kind of error
        vecenv = shoal.vector.make(cartpole(), backend, num_workers=2)
        vecenv.reset(seed=0)
        threading.Timer(delay, vecenv.close).start()
        with pytest.raises(APIUsageError, match="closed"):
            for _ in range(100_000):
                vecenv.step(np.zeros((2, 1), np.int64))


@pytest.mark.parametrize("backend", PARALLEL)
def test_a_close_that_ctrl_c_cut_short_is_finished_by_the_next(no_leaks, backend):
    class SlowToClose(gymnasium.Env):  # in the workers only: the binding's probe env closes at once
        observation_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)
        action_space = gymnasium.spaces.Discrete(2)

        def __init__(self, parent: int):
            self.parent = parent

        def reset(self, seed=None, options=None):
            return np.zeros(1, np.float32), {}

        def step(self, action):
            return np.zeros(1, np.float32), 0.0, False, False, {}

        def close(self):
            if os.getpid() != self.parent:
                time.sleep(30)

    vecenv = shoal.vector.make(shoal.Binding(env_cls=SlowToClose, env_args=(os.getpid(),)), backend, num_workers=2)
    vecenv.reset(seed=0)

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)  # while close() gives the workers 1 s to close their envs
        with pytest.raises(KeyboardInterrupt):
            vecenv.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    vecenv.close()  # stops the workers the first one left: no_leaks checks


def test_a_ctrl_c_while_a_worker_starts_leaves_no_process_behind(no_leaks, monkeypatch, ctrl_c_raises):
    from multiprocessing import forkserver

    connect = forkserver.connect_to_new_process

    def interrupted(fds):  # the forkserver made the process; Ctrl-C before start() has its pipes
        answer = connect(fds)
        monkeypatch.setattr(forkserver, "connect_to_new_process", connect)
        os.kill(os.getpid(), signal.SIGINT)
        return answer

    monkeypatch.setattr(forkserver, "connect_to_new_process", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Multiprocessing(cartpole(), num_workers=2, context="forkserver")


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_and_garbage_collection_leave_nothing(no_leaks, backend):
    with shoal.vector.make(cartpole(), backend, num_workers=2, envs_per_worker=2) as vecenv:
        vecenv.reset(seed=0)
        vecenv.send(np.zeros((4, 1), np.int64))  # close with steps in flight
    vecenv = shoal.vector.make(cartpole(), backend, num_workers=2, envs_per_worker=2)
    vecenv.reset(seed=0)
    del vecenv
    gc.collect()


def test_ray_shared_memory_has_no_file_to_leak_while_actors_start(no_leaks):
    home = os.getpid()

    def slow_cartpole():  # a big map to load, in the actor
        if os.getpid() != home:
            time.sleep(2)
        return gymnasium.make("CartPole-v1")

    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(shoal.vector.make, shoal.Binding(env_creator=slow_cartpole), "ray", num_workers=1)
        names = set()
        while not starting.done():  # a driver killed now must leave nothing behind
            names.update(name for name in os.listdir("/dev/shm") if "shoal" in name)
            time.sleep(0.05)
    with starting.result() as vecenv:
        assert vecenv._shared == [True] and not names


def test_ray_actor_that_cannot_open_the_drivers_memory_says_so(ray_cluster, tmp_path):
    from shoal.vector.base import Status
    from shoal.vector.ray import RayWorker

    node = ray_cluster.get_runtime_context().get_node_id()
    other = tmp_path / "other"
    other.write_bytes(b"0" * 64)
    for path, why in [("/proc/self/fd/1000000", "FileNotFoundError"), (str(other), "OSError: .* is not the driver's "
                                                                                    "buffer file")]:
        actor = RayWorker(cartpole(), range(1), (node, path, (0, 0), None, 0, b"key"))  # its body, run here
        status, failure = actor.ready()
        assert status is Status.FAILED and failure.command == "start"
        assert re.search(f"this actor runs on the driver's node but cannot open the driver's shared memory through "
                         f"{path}: {why}.*; pass shared_memory=False", failure.error), failure.error
        actor.close()


@pytest.mark.parametrize("stuck", [False, True], ids=["idle", "stuck_in_c_holding_the_gil"])
def test_workers_exit_when_the_parent_dies(tmp_path, stuck):
    code = (
        "import ctypes, gymnasium, numpy as np, os, shoal, shoal.vector, subprocess, time, sys\n"
        "HOME = os.getpid()\n"
        "class WithServer(gymnasium.Wrapper):  # and a process of its own, as a game server\n"
        "    def __init__(self, env, stuck):\n"
        "        super().__init__(env)\n"
        "        self.stuck, self.server = stuck, subprocess.Popen(['sleep', '60']) if os.getpid() != HOME else None\n"
        "        self.server_pid = self.server and self.server.pid\n"
        "    def step(self, action):\n"
        "        if self.stuck:\n"
        "            ctypes.PyDLL(None).sleep(60)  # an emulator stuck in C code that keeps the GIL\n"
        "        return self.env.step(action)\n"
        "def make(stuck):\n"
        "    return WithServer(gymnasium.make('CartPole-v1'), stuck)\n"
        "if __name__ == '__main__':\n"
        "    binding = shoal.Binding(env_creator=make, env_args=(sys.argv[1] == 'True',))\n"
        "    vecenv = shoal.vector.make(binding, 'multiprocessing', num_workers=2)\n"
        "    vecenv.reset()\n"
        "    servers = vecenv.get_attr('server_pid')\n"
        "    vecenv.send(np.zeros((2, 1), np.int64))\n"
        "    print(' '.join(str(p) for p in [*(p.pid for p in vecenv._processes), *servers]), flush=True)\n"
        "    time.sleep(60)\n"
    )
    script = tmp_path / "parent.py"
    script.write_text(code)
    parent = subprocess.Popen([sys.executable, str(script), str(stuck)], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    parent.kill()
    parent.wait()

    def running(pid: int) -> bool:
        try:  # a worker may exit between any two of these calls
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while any(running(pid) for pid in workers):  # and the processes their envs started
        assert time.monotonic() < deadline, "workers outlived their killed parent"
        time.sleep(0.1)


def test_poller_answers_like_connection_wait():
    """The parent's wait: ready pipes, a timeout with nothing ready, a peer that closed its end."""
    import multiprocessing

    from shoal.vector.base import Poller

    poller = Poller()
    (a, a_peer), (b, b_peer) = multiprocessing.Pipe(), multiprocessing.Pipe()
    assert poller.wait((a, b), 0.01) == []
    b_peer.send("done")
    assert poller.wait((a, b), None) == [b]
    assert poller.wait((a,), 0) == []  # another set of waitables: b is unregistered, its answer waits
    a_peer.close()
    assert set(poller.wait((a, b), 0)) == {a, b}
    with pytest.raises(EOFError):
        a.recv()
    poller.clear()
    for end in (a, b, b_peer):
        end.close()


@pytest.mark.parametrize("backend", PARALLEL)  # Serial steps in the caller's thread: a hang there stops it
def test_a_second_thread_inside_a_vec_env_is_refused(make, backend):
    vecenv = make(shoal.Binding(env_cls=ProbeEnv), backend, num_workers=2)
    vecenv.reset(seed=0)
    vecenv.set_attr("hang", True, env_ids=[0])
    vecenv.set_attr("crash_step", 1, env_ids=[0])  # env 0 sleeps in its next step: the first thread waits there
    waiting = threading.Thread(target=lambda: pytest.raises(APIUsageError, vecenv.step, np.zeros((2, 1), np.int64)))
    waiting.start()
    deadline = time.monotonic() + 30
    while vecenv._caller.acquire(blocking=False):  # until the other thread is inside step()
        vecenv._caller.release()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(APIUsageError, match=r"\.step\(\): another call is inside this vec env \(from another "
                                            r"thread, or the one a signal handler interrupted\): it serves one call"):
        vecenv.step(np.zeros((2, 1), np.int64))
    vecenv.close()  # from this thread, while the other waits: allowed, and its step() says it was closed
    waiting.join(30)
    assert not waiting.is_alive()


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_a_call_from_a_signal_handler_is_refused_and_the_interrupted_call_goes_on(make, backend):
    """The handler runs in the thread that is inside step(): a lock that let it in would hand it step's answers."""
    vecenv = make(shoal.Binding(env_cls=ProbeEnv), backend, num_workers=2)
    vecenv.reset(seed=0)
    vecenv.set_attr("sleep", 0.3)
    refused = []

    def handler(*_):
        with pytest.raises(APIUsageError, match=r"get_attr\(\): another call is inside this vec env") as caught:
            vecenv.get_attr("tick")
        refused.append(caught.value)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        rewards = vecenv.step(np.zeros((2, 1), np.int64))[1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(refused) == 1 and rewards.tolist() == [1.0, 1.0]
    vecenv.step(np.zeros((2, 1), np.int64))  # still open


class ServerEnv(gymnasium.Env):
    """Starts a process of its own (a game server) and stops it in close() with terminate()."""

    observation_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)
    action_space = gymnasium.spaces.Discrete(2)

    def __init__(self):
        self.server = subprocess.Popen(["sleep", "60"])

    def ignored_signals(self) -> int:
        status = Path(f"/proc/{self.server.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)

    def reset(self, seed=None, options=None):
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 0.0, False, False, {}

    def close(self):
        self.server.terminate()
        self.server.wait(5)


def test_the_processes_an_env_starts_in_a_worker_take_sigterm_and_sigint_as_usual(make):
    """Workers leave SIGTERM and SIGINT to the parent, with a handler: SIG_IGN would stay with the processes their
    envs start, whose terminate() would then do nothing."""
    vecenv = make(shoal.Binding(env_cls=ServerEnv), "multiprocessing", num_workers=1)
    vecenv.reset(seed=0)
    [ignored] = vecenv.call("ignored_signals")
    assert not ignored & (1 << (signal.SIGTERM - 1) | 1 << (signal.SIGINT - 1))
    started = time.monotonic()
    vecenv.close()
    assert time.monotonic() - started < 1.0  # the env's close() stopped its server, no kill needed


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_an_interrupt_between_two_workers_commands_or_after_an_answer_closes_the_vec_env(make, backend):
    """Ctrl-C after worker 0 was sent its step but before worker 1 was, or after an answer came in but before it
    was filed: going on would take one step's answers for the next one's (or wait for an answer already taken)."""
    for where in ("send", "answer"):
        vecenv = make(shoal.Binding(env_cls=ProbeEnv), backend, num_workers=2)
        vecenv.reset(seed=0)
        if where == "send":
            dispatch = vecenv._dispatch

            def interrupted_dispatch(worker, command, payload):
                if worker == 1:
                    raise KeyboardInterrupt
                dispatch(worker, command, payload)
            vecenv._dispatch = interrupted_dispatch
        else:
            class InterruptedQueue(collections.deque):
                def append(self, item):
                    raise KeyboardInterrupt
            vecenv._ready = InterruptedQueue()
        with pytest.raises(KeyboardInterrupt):
            vecenv.step(np.zeros((2, 1), np.int64))
        with pytest.raises(APIUsageError, match=f"reset\\(\\) on a closed {type(vecenv).__name__}: make a new"):
            vecenv.reset(seed=0)
        assert vecenv._caller.acquire(blocking=False)  # and the call's lock is free


def test_classes_of_the_main_script_come_back_as_the_callers_own_and_a_ray_shutdown_is_named(tmp_path):
    """The envs use copies of the main script's classes, sent with the binding by cloudpickle (Ray's own copy
    for Ray): their instances in infos and call() results must come back as the script's classes, and those
    in call()/set_attr() arguments must reach the envs as the envs' own classes (not the ones of a worker
    that imported the script again); local functions travel both ways."""
    script = tmp_path / "notes.py"
    script.write_text(textwrap.dedent("""
        import enum
        import numpy as np, gymnasium, ray, shoal, shoal.vector
        from shoal.errors import WorkerError

        class Note:
            def __init__(self, value):
                self.value = value

        class Mode(enum.Enum):
            EASY = 1
            HARD = 2

        class NoteEnv(gymnasium.Env):
            observation_space = gymnasium.spaces.Box(0, 1, (2,), np.float32)
            action_space = gymnasium.spaces.Discrete(2)
            def reset(self, seed=None, options=None):
                return np.zeros(2, np.float32), {}
            def step(self, action):
                return np.zeros(2, np.float32), 0.0, False, False, {"note": Note(1)}
            def note(self):
                return Note(2)

            def is_hard(self, mode=None):
                return (self.mode if mode is None else mode) is Mode.HARD and isinstance(self.note_given, Note)

            def scaler(self):
                return lambda x: 2 * x

        if __name__ == "__main__":
            binding = shoal.Binding(env_cls=NoteEnv)
            for backend, options in (("multiprocessing", {}), ("multiprocessing", {"context": "spawn"}),
                                     ("multiprocessing", {"context": "fork"}), ("ray", {}),
                                     ("ray", {"shared_memory": False})):
                with shoal.vector.make(binding, backend, num_workers=1, **options) as vecenv:
                    vecenv.reset(seed=0)
                    info = vecenv.step(np.zeros((1, 1), np.int64))[4][0][0]["note"]
                    vecenv.set_attr("mode", Mode.HARD)
                    vecenv.set_attr("note_given", Note(3))
                    print(type(info) is Note, type(vecenv.call("note")[0]) is Note, vecenv.call("is_hard"),
                          vecenv.call("is_hard", Mode.HARD), vecenv.call("scaler")[0](2))
            vecenv = shoal.vector.make(binding, "ray", num_workers=1, shared_memory=False)
            vecenv.reset(seed=0)
            ray.shutdown()
            try:
                vecenv.step(np.zeros((1, 1), np.int64))
            except WorkerError as error:
                print(str(error).split(": ")[1], ray.is_initialized())
        """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.stdout.splitlines() == ["True True [True] [True] 4"] * 5 + [
        "Ray was shut down (ray.shutdown()) while this vec env was open, at its step 1 False"], done.stderr


@pytest.mark.parametrize("backend", PARALLEL)
def test_a_close_from_another_thread_while_answers_come_in_fails_the_call(make, backend):
    vecenv = make(shoal.Binding(env_cls=ProbeEnv), backend, num_workers=2)
    vecenv.reset(seed=0)
    vecenv.set_attr("sleep", 0.5)
    closer = threading.Timer(0.1, vecenv.close)
    closer.start()
    with pytest.raises(APIUsageError, match="was closed while waiting for its workers"):
        vecenv.step(np.zeros((2, 1), np.int64))
    closer.join()
    with pytest.raises(APIUsageError, match=r"step\(\) on a closed \w+: make a new vec env"):
        vecenv.step(np.zeros((2, 1), np.int64))


@pytest.mark.parametrize("backend", ["serial", "multiprocessing"])
def test_a_failed_automatic_reset_is_named_in_the_worker_error(no_leaks, backend):
    with pytest.raises(WorkerError, match=r"failed in step at its step 2, in env 0: RuntimeError: the emulator lost "
                                          r"its ROM \(raised in the automatic reset that starts the next episode, at "
                                          r"step 2\)"):
        with shoal.vector.make(shoal.Binding(env_cls=SecondResetFails), backend, num_workers=1) as vecenv:
            vecenv.reset(seed=0)
            for _ in range(2):
                vecenv.step(np.zeros((1, 1), np.int64))
