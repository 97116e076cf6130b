"""Tests of shoal.spaces: exact flatten/unflatten round trips of nested spaces, and its errors.

The property tests generate random nested spaces (Dict/Tuple at least three levels deep, every leaf
type, every Box dtype, scalar and multi-dim shapes, finite and infinite bounds) and values drawn from
them with a bias towards extremes (int64 min/max, uint64 max, float tiny/huge/-0.0/inf), and check
that every leaf comes back bit for bit, with its dtype, from numpy (single and batched) and torch.
"""

from __future__ import annotations

import functools
import math
import pickle
from collections import OrderedDict
from typing import Any

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal import Binding
from shoal.errors import SpaceError
from shoal.spaces import ActionLayout, ObservationLayout, children, index_leaves, leaves
from envs import NestedSingleAgentEnv

FLOAT_DTYPES = [np.float16, np.float32, np.float64]
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
BOX_DTYPES = FLOAT_DTYPES + INT_DTYPES + [np.bool_]

# A float64 Box action is the flat action of every Box leaf, so integer Box action leaves are exact
# only within float64's integer range: the action strategies keep their bounds inside it.
FLOAT64_EXACT_INT = 2**53

PROPERTY = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------- strategies: spaces

# Scalars, vectors and up to 3-d leaves; zero-size leaves too, now and then.
leaf_shapes = st.one_of(
    st.just(()),
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3),
    st.sampled_from([(0,), (2, 0)]),
)


def _extremes(dtype: np.dtype) -> list:
    """The values of ``dtype`` where round trips usually break."""
    if dtype.kind == "f":
        info = np.finfo(dtype)
        tiny_subnormal = np.nextafter(dtype.type(0), dtype.type(1))
        return [dtype.type(value) for value in
                (-0.0, 0.0, info.tiny, -info.tiny, tiny_subnormal, -tiny_subnormal, info.max, info.min,
                 info.eps, np.inf, -np.inf)]
    info = np.iinfo(dtype)
    return [dtype.type(value) for value in (info.min, info.max, 0, 1, info.min + 1, info.max - 1)
            if info.min <= value <= info.max]


def _finite(dtype: np.dtype) -> st.SearchStrategy:
    return hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@st.composite
def boxes(draw, dtypes=BOX_DTYPES, int_limit: int | None = None) -> spaces.Box:
    """A Box of any dtype with per-element bounds, each finite or (floats) infinite."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    shape = draw(leaf_shapes)
    if dtype.kind == "b":
        return spaces.Box(0, 1, shape, np.bool_)
    if dtype.kind == "f":
        low = draw(hnp.arrays(dtype, shape, elements=st.one_of(_finite(dtype), st.just(-np.inf))))
        high = draw(hnp.arrays(dtype, shape, elements=st.one_of(_finite(dtype), st.just(np.inf))))
    else:
        info = np.iinfo(dtype)
        lo, hi = info.min, info.max
        if int_limit is not None:
            lo, hi = max(lo, -int_limit), min(hi, int_limit)
        bound = st.one_of(st.sampled_from([lo, hi]), st.integers(lo, hi))
        low = draw(hnp.arrays(dtype, shape, elements=bound))
        high = draw(hnp.arrays(dtype, shape, elements=bound))
    low, high = np.minimum(low, high), np.maximum(low, high)
    return spaces.Box(low, high, shape, dtype)


@st.composite
def discretes(draw) -> spaces.Discrete:
    n = draw(st.integers(1, 10))
    int64 = np.iinfo(np.int64)
    # start + n must fit int64: gymnasium's own Discrete.contains computes it (the largest value,
    # start + n - 1 = int64 max, is checked in test_discrete_at_int64_max instead).
    start = draw(st.one_of(st.sampled_from([0, -1, -7, 3, int64.min, int64.max - n]),
                           st.integers(int64.min, int64.max - n)))
    return spaces.Discrete(n, start=start)


@st.composite
def multi_discretes(draw) -> spaces.MultiDiscrete:
    dtype = draw(st.sampled_from([np.int64, np.int32, np.int8]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=3))
    nvec = draw(hnp.arrays(np.int64, shape, elements=st.integers(1, 6)))
    start = draw(st.one_of(st.none(), hnp.arrays(np.int64, shape, elements=st.integers(-60, 60))))
    return spaces.MultiDiscrete(nvec, dtype=dtype, start=start)


@st.composite
def multi_binaries(draw) -> spaces.MultiBinary:
    return spaces.MultiBinary(draw(st.one_of(st.integers(1, 5), st.sampled_from([(2, 3), (1, 2, 2)]))))


observation_leaves = st.one_of(boxes(), discretes(), multi_discretes(), multi_binaries())
discrete_action_leaves = st.one_of(discretes(), multi_discretes(), multi_binaries())
box_action_leaves = boxes(int_limit=FLOAT64_EXACT_INT)

dict_keys = st.text(alphabet="abcdefxyz_", min_size=1, max_size=3)


@st.composite
def nested(draw, leaf: st.SearchStrategy, min_depth: int = 3, max_depth: int = 4) -> spaces.Space:
    """A Dict/Tuple tree of ``leaf`` spaces with at least one branch ``min_depth`` composites deep.

    Dicts are built half the time from an OrderedDict in unsorted key order, which gymnasium keeps.
    """
    if min_depth <= 0 and (max_depth <= 0 or draw(st.booleans())):
        return draw(leaf)
    num_children = draw(st.integers(1, 3))
    deep = draw(st.integers(0, num_children - 1))
    kids = [draw(nested(leaf, min_depth - 1 if i == deep else 0, max_depth - 1)) for i in range(num_children)]
    if draw(st.booleans()):
        return spaces.Tuple(kids)
    keys = draw(st.lists(dict_keys, min_size=num_children, max_size=num_children, unique=True))
    if draw(st.booleans()):
        return spaces.Dict(OrderedDict(sorted(zip(keys, kids), reverse=True)))
    return spaces.Dict(dict(zip(keys, kids)))


# ---------------------------------------------------------------- strategies: values


@functools.singledispatch
def values(space: spaces.Space) -> st.SearchStrategy:
    """Values that lie in ``space``, biased towards the extremes of each leaf dtype."""
    raise NotImplementedError(space)


@values.register(spaces.Box)
def _(space: spaces.Box):
    dtype = space.dtype
    if dtype.kind == "b":
        return hnp.arrays(dtype, space.shape, elements=st.booleans())
    lo, hi = (space.low.min(), space.high.max()) if space.low.size else (0, 0)
    in_range = [value for value in _extremes(dtype) if lo <= value <= hi]
    if dtype.kind == "f":
        within = hnp.from_dtype(dtype, min_value=None if np.isinf(lo) else lo, max_value=None if np.isinf(hi) else hi,
                                allow_nan=False, allow_infinity=bool(np.isinf(lo) or np.isinf(hi)))
    else:
        within = st.integers(int(lo), int(hi))
    element = st.one_of(st.sampled_from(in_range), within) if in_range else within
    # Drawn between the widest bounds, then clipped into each element's own (exact: same dtype).
    return hnp.arrays(dtype, space.shape, elements=element).map(
        lambda array: np.asarray(np.clip(array, space.low, space.high), dtype))


@values.register(spaces.Discrete)
def _(space: spaces.Discrete):
    value = st.integers(int(space.start), int(space.start) + int(space.n) - 1)
    return st.one_of(value, value.map(np.int64))  # envs return both Python and numpy ints


@values.register(spaces.MultiDiscrete)
def _(space: spaces.MultiDiscrete):
    return hnp.arrays(np.int64, space.shape, elements=st.integers(0, 5)).map(
        lambda offset: (space.start + offset % space.nvec).astype(space.dtype))


@values.register(spaces.MultiBinary)
def _(space: spaces.MultiBinary):
    return hnp.arrays(np.int8, space.shape, elements=st.integers(0, 1))


@values.register(spaces.Dict)
def _(space: spaces.Dict):
    return st.fixed_dictionaries({key: values(sub) for key, sub in space.spaces.items()})


@values.register(spaces.Tuple)
def _(space: spaces.Tuple):
    return st.tuples(*[values(sub) for sub in space.spaces])


batch_shapes = st.sampled_from([(1,), (3,), (2, 3)])


@st.composite
def batches(draw, space: spaces.Space, batch: tuple) -> Any:
    """A batch of values of ``space``: every leaf stacked along leading dims ``batch``."""
    samples = [draw(values(space)) for _ in range(math.prod(batch))]
    return _stack(space, samples, batch)


def _stack(space: spaces.Space, samples: list, batch: tuple) -> Any:
    if isinstance(space, spaces.Dict):
        return {key: _stack(sub, [s[key] for s in samples], batch) for key, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(_stack(sub, [s[i] for s in samples], batch) for i, sub in enumerate(space.spaces))
    dtype = _leaf_dtype(space)
    return np.stack([np.asarray(s, dtype) for s in samples]).reshape(batch + tuple(space.shape))


# ---------------------------------------------------------------- helpers


def _leaf_dtype(space: spaces.Space) -> np.dtype:
    return np.dtype(space.dtype)


def _get(nested_value: Any, path: tuple) -> Any:
    for key in path:
        nested_value = nested_value[key]
    return nested_value


def assert_exact(got: Any, want: Any, dtype: np.dtype, where: tuple) -> None:
    """``got`` equals ``want`` bit for bit, with dtype ``dtype`` (torch tensors compared via numpy)."""
    if isinstance(got, torch.Tensor):
        got = got.numpy()
    got, want = np.asarray(got), np.asarray(want, dtype)
    assert got.dtype == dtype, f"{where}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == want.shape, f"{where}: shape {got.shape}, expected {want.shape}"
    assert got.tobytes() == want.tobytes(), f"{where}: {got!r} != {want!r}"


def assert_round_trip(space: spaces.Space, value: Any, result: Any) -> None:
    for leaf in leaves(space):
        assert_exact(_get(result, leaf.path), _get(value, leaf.path), _leaf_dtype(leaf.space), leaf.path)


def expected_obs_dtype(space: spaces.Space) -> np.dtype:
    dtypes = {_leaf_dtype(leaf.space) for leaf in leaves(space)}
    return dtypes.pop() if len(dtypes) == 1 else np.dtype(np.uint8)


def assert_same_structure(space: spaces.Space, result: Any) -> None:
    """Dicts come back with sorted keys, Tuples as tuples of the same length."""
    kids = children(space)
    if kids is None:
        return
    if isinstance(space, spaces.Dict):
        assert isinstance(result, dict) and list(result) == [key for key, _ in kids]
    else:
        assert isinstance(result, tuple) and len(result) == len(kids)
    for key, sub in kids:
        assert_same_structure(sub, result[key])


# ---------------------------------------------------------------- observations: properties


@PROPERTY
@given(st.data(), nested(observation_leaves))
def test_observation_round_trip_single(data, space):
    value = data.draw(values(space))
    assert space.contains(value), "the value strategy must stay inside its space"
    layout = ObservationLayout(space)
    flat = layout.flatten(value)

    assert flat.shape == (layout.size,)
    assert flat.dtype == expected_obs_dtype(space) == layout.dtype
    assert layout.flat_space.contains(flat)
    assert layout.out_of_bounds(flat) is None

    result = layout.unflatten(flat)
    assert_same_structure(space, result)
    assert_round_trip(space, value, result)
    for leaf in leaves(space):
        if math.prod(leaf.space.shape):
            assert np.shares_memory(_get(result, leaf.path), flat), f"{leaf.path} is a copy, not a view"

    assert_round_trip(space, value, layout.unflatten(torch.from_numpy(flat)))


@PROPERTY
@given(st.data(), nested(observation_leaves), batch_shapes)
def test_observation_round_trip_batched(data, space, batch):
    value = data.draw(batches(space, batch))
    layout = ObservationLayout(space)
    flat = layout.flatten(value)

    assert flat.shape == batch + (layout.size,)
    assert flat.dtype == expected_obs_dtype(space)
    assert layout.out_of_bounds(flat) is None

    result = layout.unflatten(flat)
    assert_round_trip(space, value, result)
    for leaf in leaves(space):
        if math.prod(leaf.space.shape):
            assert np.shares_memory(_get(result, leaf.path), flat), f"{leaf.path} is a copy, not a view"
    assert_round_trip(space, value, layout.unflatten(torch.from_numpy(flat)))

    # Rows of a batch are independent observations: each row unflattens to its own values.
    row = (0,) * (len(batch) - 1) + (batch[-1] - 1,)
    assert_round_trip(space, index_leaves(value, row), layout.unflatten(flat[row]))


@PROPERTY
@given(st.data(), st.one_of(nested(observation_leaves, min_depth=0, max_depth=2), observation_leaves))
def test_observation_writer_matches_flatten(data, space):
    """The per-row writer the emulated env uses lays values out exactly like flatten."""
    rows = [data.draw(values(space)) for _ in range(3)]
    layout = ObservationLayout(space)
    flat = np.zeros((3, layout.size), layout.dtype)
    write = layout.writer(flat)
    for index, row in enumerate(rows):
        write(index, row)
    for index, row in enumerate(rows):
        assert flat[index].tobytes() == layout.flatten(row).tobytes()
        assert_round_trip(space, row, layout.unflatten(flat[index]))


@PROPERTY
@given(st.data(), st.one_of(nested(observation_leaves, min_depth=0, max_depth=2), observation_leaves))
def test_observation_rows_writer_matches_flatten(data, space):
    """The many-rows writer (one conversion per leaf for all agents) lays values out exactly like flatten."""
    rows = [data.draw(values(space)) for _ in range(3)]
    layout = ObservationLayout(space)
    flat = np.zeros((4, layout.size), layout.dtype)
    layout.rows_writer(flat)(np.array([3, 0, 1]), rows)
    for index, row in zip([3, 0, 1], rows):
        assert flat[index].tobytes() == layout.flatten(row).tobytes()
    assert not flat[2].any()


def test_writers_check_the_declared_range():
    layout = ObservationLayout(NESTED)
    flat = np.zeros((3, layout.size), layout.dtype)
    bad = _good_value()
    bad["agent"]["pos"] = np.array([0.5, np.nan], np.float32)
    message = r"\['agent'\]\['pos'\]: \[0.5 nan\] lies outside its range \[-1.0, 1.0\]"
    with pytest.raises(SpaceError, match=message):
        layout.writer(flat)(1, bad)
    with pytest.raises(SpaceError, match=message):
        layout.rows_writer(flat)([0, 2], [_good_value(), bad])


@PROPERTY
@given(st.data(), st.sampled_from([np.float32, np.float64, np.int8, np.int64, np.uint8]), st.integers(1, 6))
def test_small_leaf_range_check_agrees_with_numpy(data, dtype, size):
    """The generated one-row check of a small leaf: finite, infinite and absent bounds; NaN never inside."""
    is_float = np.dtype(dtype).kind == "f"
    info = np.finfo(dtype) if is_float else np.iinfo(dtype)
    edges = [-np.inf, np.inf, -1.0, 0.0, 3.0] if is_float else [info.min, info.max, -1 if info.min else 0, 0, 3]
    low = np.array(data.draw(st.lists(st.sampled_from(edges), min_size=size, max_size=size)), dtype)
    high = np.maximum(low, np.array(data.draw(st.lists(st.sampled_from(edges), min_size=size, max_size=size)), dtype))
    layout = ObservationLayout(spaces.Box(low, high, (size,), dtype))
    value = np.array(data.draw(st.lists(
        st.sampled_from([np.nan, np.inf, -np.inf, -2.0, -1.0, 0.0, 2.5, 3.0]) if is_float
        else st.integers(int(info.min), int(info.max)), min_size=size, max_size=size)), dtype)
    expected = bool(np.all(value >= low) and np.all(value <= high))
    for checked in (layout, pickle.loads(pickle.dumps(layout))):  # generated code, rebuilt after pickling
        flat = np.zeros((1, layout.size), layout.dtype)
        if expected:
            checked.writer(flat)(0, value)
            assert flat[0].tobytes() == value.tobytes()
        else:
            with pytest.raises(SpaceError, match="lies outside its range"):
                checked.writer(flat)(0, value)


def test_a_bool_box_holds_its_declared_bounds():
    """A bool side that rules a value out (low True, high False) is checked, and the flat space keeps it."""
    layout = ObservationLayout(spaces.Box(np.array([False, True]), np.array([True, True]), (2,), bool))
    assert layout.flat_space.low.tolist() == [False, True] and layout.flat_space.high.tolist() == [True, True]
    flat = np.zeros((2, layout.size), layout.dtype)
    layout.writer(flat)(0, np.array([False, True]))
    for write in (layout.flatten, lambda value: layout.writer(flat)(1, value),
                  lambda value: layout.rows_writer(flat)([0, 1], [np.array([True, True]), value])):
        with pytest.raises(SpaceError, match=r"\[False False\] lies outside its range \[\[False, True\], \[True, True\]\]"):
            write(np.array([False, False]))
    always = ObservationLayout(spaces.Box(1, 1, (3,), bool))
    with pytest.raises(SpaceError, match=r"lies outside its range \[True, True\]"):
        always.flatten(np.array([True, False, True]))


@PROPERTY
@given(st.data(), st.sampled_from([np.int8, np.int16, np.int64, np.uint8, np.uint64, bool, ">i8", ">u4"]),
       st.sampled_from([[4], [3, 5, 2], [7, 7], [300]]))
def test_invalid_rows_agrees_with_numpy(data, dtype, nvec):
    """The one-pass range check of flat discrete actions (unsigned view) against a plain comparison."""
    layout = ActionLayout(spaces.MultiDiscrete(nvec))
    dtype = np.dtype(dtype)
    low, high = (0, 1) if dtype.kind == "b" else (max(int(np.iinfo(dtype).min), -400), min(int(np.iinfo(dtype).max), 400))
    rows = data.draw(st.lists(st.lists(st.integers(low, high), min_size=len(nvec), max_size=len(nvec)), min_size=1,
                              max_size=4))
    flat = np.array(rows).astype(dtype)
    wide = flat.astype(np.int64)
    expected = ((wide < 0) | (wide >= np.array(nvec))).any(axis=-1)
    bad = layout.invalid_rows(flat)
    assert (bad is None and not expected.any()) or (bad is not None and bad.tolist() == expected.tolist())


# ---------------------------------------------------------------- actions: properties


@PROPERTY
@given(st.data(), nested(discrete_action_leaves), st.one_of(st.just(()), batch_shapes))
def test_discrete_action_round_trip(data, space, batch):
    value = data.draw(batches(space, batch) if batch else values(space))
    layout = ActionLayout(space)
    assert isinstance(layout.flat_space, spaces.MultiDiscrete)
    assert layout.flat_space.shape == (layout.size,)

    flat = layout.flatten(value)
    assert flat.shape == batch + (layout.size,) and flat.dtype == np.int64
    assert np.all((flat >= 0) & (flat < layout.flat_space.nvec)), "flat discrete actions count from 0"
    if not batch:
        assert layout.flat_space.contains(flat)

    assert_round_trip(space, value, layout.unflatten(flat))
    assert_round_trip(space, value, layout.unflatten(torch.from_numpy(flat)))
    assert_rows_match(layout, flat, value, batch)


def assert_rows_match(layout: ActionLayout, flat: np.ndarray, value: Any, batch: tuple) -> None:
    """unflatten_rows (what the emulated env uses, one action per agent) agrees with unflatten of each row."""
    if len(batch) != 1:
        return
    rows = list(reversed(range(batch[0])))
    for row, result in zip(rows, layout.unflatten_rows(flat, rows)):
        assert_round_trip(layout.space, index_leaves(value, (row,)), result)


@PROPERTY
@given(st.data(), nested(box_action_leaves), st.one_of(st.just(()), batch_shapes))
def test_box_action_round_trip(data, space, batch):
    value = data.draw(batches(space, batch) if batch else values(space))
    layout = ActionLayout(space)
    assert isinstance(layout.flat_space, spaces.Box) and layout.flat_space.dtype.kind == "f"
    assert layout.flat_space.shape == (layout.size,)

    flat = layout.flatten(value)
    assert flat.shape == batch + (layout.size,) and flat.dtype == layout.flat_space.dtype
    if not batch:
        assert layout.flat_space.contains(flat)

    assert_round_trip(space, value, layout.unflatten(flat))
    assert_round_trip(space, value, layout.unflatten(torch.from_numpy(flat)))
    assert_rows_match(layout, flat, value, batch)


def test_float_actions_for_an_integer_box_go_to_the_nearest_integer():
    layout = ActionLayout(spaces.Dict({"n": spaces.Box(0, 10, (3,), np.int16), "x": spaces.Box(-1, 1, (1,), np.float32)}))
    flat = np.array([[9.6, 0.4, 4.5, 0.25]])  # a Gaussian policy's (clipped) sample; x comes last (sorted keys)
    assert layout.unflatten(flat)["n"].tolist() == [[10, 0, 4]]  # rint: half to even, as numpy and torch do
    assert layout.unflatten(torch.from_numpy(flat))["n"].tolist() == [[10, 0, 4]]
    assert layout.unflatten_rows(flat, [0])[0]["n"].tolist() == [10, 0, 4]


def test_one_action_comes_back_in_the_form_its_space_samples():
    # a Box leaf of shape () is a 0-d array (gymnasium's contains warns on a scalar), a Discrete leaf a numpy scalar
    box = ActionLayout(spaces.Dict({"x": spaces.Box(-1, 1, (), np.float32), "y": spaces.Box(-1, 1, (2,), np.float32)}))
    flat = np.array([[0.5, 0.1, 0.2], [0.25, 0.3, 0.4]], np.float32)
    for one in (box.unflatten(flat[0]), *box.unflatten_rows(flat, [0, 1])):
        assert type(one["x"]) is np.ndarray and one["x"].shape == () and box.space.contains(one)
    assert box.unflatten_rows(flat, [0, 1])[1]["x"] == 0.25
    discrete = ActionLayout(spaces.Dict({"n": spaces.Discrete(3), "m": spaces.MultiDiscrete([2, 2])}))
    for one in (discrete.unflatten(np.array([1, 0, 2])), *discrete.unflatten_rows(np.array([[1, 0, 2]]), [0])):
        assert type(one["n"]) is np.int64 and one["m"].shape == (2,) and discrete.space.contains(one)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int32, np.int8])
def test_integer_box_actions_at_the_ends_of_their_dtype_come_back_exactly(dtype):
    # float64 cannot hold int64's largest value: 2**63 - 1 flattens to 2**63, which a cast would wrap to -2**63.
    info = np.iinfo(dtype)
    layout = ActionLayout(spaces.Box(info.min, info.max, (2,), dtype))
    value = np.array([info.max, info.min], dtype)
    flat = layout.flatten(value)
    assert layout.unflatten(flat).tolist() == value.tolist()
    assert layout.unflatten(torch.from_numpy(flat)).tolist() == value.tolist()
    assert layout.unflatten_rows(flat[None], [0])[0].tolist() == value.tolist()


@pytest.mark.parametrize("low, high, dtype", [(-2**63 + 1, 2**63 - 2, np.int64), (0, 2**64 - 2, np.uint64)])
def test_integer_box_bounds_that_float64_rounds_outward_hold_every_flat_action(low, high, dtype):
    space = spaces.Box(low, high, (2,), dtype)
    layout = ActionLayout(space)
    for flat in (layout.flat_space.low, layout.flat_space.high):  # 2**63 - 2 rounds up to 2**63 as a float
        assert space.contains(layout.unflatten(flat)) and space.contains(layout.unflatten_rows(flat[None], [0])[0])
    bounds = np.array([low, high], dtype)
    assert layout.unflatten(layout.flatten(bounds)).tolist() == bounds.tolist()


def test_entries_beyond_the_space_are_refused():
    layout = ObservationLayout(spaces.Dict({"a": spaces.Tuple((spaces.Discrete(3), spaces.Discrete(3))),
                                            "b": spaces.Box(0, 1, (2,), np.float32)}))
    flat = np.zeros((2, layout.size), layout.dtype)
    good = {"a": (1, 2), "b": np.zeros(2, np.float32)}
    for bad, message in [({**good, "a": (1, 2, 99)}, r"observation \['a'\]: expected 2 entries, got 3 \(tuple"),
                         ({**good, "c": 1}, r"observation \(the whole space\): expected 2 entries, got 3 \(dict")]:
        for write in (layout.flatten, lambda value: layout.writer(flat)(0, value),
                      lambda value: layout.rows_writer(flat)([0, 1], [good, value])):
            with pytest.raises(SpaceError, match=message):
                write(bad)


def test_flatten_and_unflatten_check_what_users_pass():
    observations = ObservationLayout(spaces.Dict({"pos": spaces.Box(-1, 1, (2,), np.float32), "hp": spaces.Discrete(5)}))
    good = {"pos": np.zeros(2, np.float32), "hp": 1}
    with pytest.raises(SpaceError, match=r"observation leaf \['hp'\]: 9 lies outside its range"):
        observations.flatten({**good, "hp": 9})
    with pytest.raises(SpaceError, match=r"out must be a writable, C-contiguous numpy array of shape \(16,\) and dtype uint8, "
                                         r"got ndarray of shape \(16,\) and dtype float64"):
        observations.flatten(good, out=np.zeros(16))
    with pytest.raises(SpaceError, match="flat observation must be a numpy array or a torch tensor, got list"):
        observations.unflatten([0] * 16)
    actions = ActionLayout(spaces.Dict({"move": spaces.Discrete(4, start=-1), "item": spaces.MultiBinary(2)}))
    with pytest.raises(SpaceError, match=r"flat action \[9 9 9\] is out of range: expected 0 <= a < \[2 2 4\]"):
        actions.unflatten(np.array([9, 9, 9]))
    with pytest.raises(SpaceError, match="flat action must be a numpy array or a torch tensor, got list"):
        actions.unflatten([0, 0, 0])
    with pytest.raises(SpaceError, match="expected 2 entries, got 3"):
        actions.flatten({"move": 0, "item": np.zeros(2, np.int8), "extra": 3})
    box = ActionLayout(spaces.Box(-1, 1, (2,), np.float32))
    with pytest.raises(SpaceError, match=r"action \[nan  0.\] lies outside the action space"):
        box.flatten(np.array([np.nan, 0], np.float32))


def test_a_value_outside_a_large_leaf_is_shown_with_its_index():
    layout = ObservationLayout(spaces.Box(-1, 1, (4, 10), np.float32))
    value = np.zeros((4, 10), np.float32)
    value[2, 7] = np.nan
    with pytest.raises(SpaceError, match=r"element \[2, 7\] is nan, outside its range \[-1.0, 1.0\]"):
        layout.writer(np.zeros((1, layout.size), np.float32))(0, value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nested(discrete_action_leaves, max_depth=3), box_action_leaves, st.randoms())
def test_mixed_action_space_raises(space, box, random):
    # Hang the Box somewhere inside the discrete tree.
    parent = space
    while True:
        kids = children(parent)
        key, sub = random.choice(kids)
        if children(sub) is None or random.random() < 0.3:
            break
        parent = sub
    if isinstance(parent, spaces.Dict):
        parent.spaces["box_leaf"] = box
    else:
        parent.spaces = parent.spaces + (box,)
    with pytest.raises(SpaceError, match=r"mixes discrete and continuous leaves.*emulate_flat_atn=False"):
        ActionLayout(space)


def test_layouts_survive_pickling():
    """Bindings (and their layouts) travel to vectorization workers by pickle."""
    obs_layout = pickle.loads(pickle.dumps(ObservationLayout(NESTED)))
    assert_round_trip(NESTED, _good_value(), obs_layout.unflatten(obs_layout.flatten(_good_value())))
    space = _reversed_action_space()
    action = {"z_move": 6, "attack": {"y_target": -1, "b_style": np.array([2, 0])}}
    atn_layout = pickle.loads(pickle.dumps(ActionLayout(space)))
    assert_round_trip(space, action, atn_layout.unflatten(atn_layout.flatten(action)))
    rows = atn_layout.unflatten_rows(atn_layout.flatten(action)[None], [0])  # generated code, rebuilt
    assert_round_trip(space, action, rows[0])


# ---------------------------------------------------------------- sorted Dict keys


def test_dict_keys_visited_in_sorted_order_whatever_the_insertion_order():
    leaf = {"b": spaces.Discrete(3), "a": spaces.Box(0, 1, (2,), np.float32), "c": spaces.MultiBinary(2)}
    orders = [["b", "a", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    layouts = [ObservationLayout(spaces.Dict(OrderedDict((key, leaf[key]) for key in order))) for order in orders]
    layouts.append(ObservationLayout(spaces.Dict({"c": leaf["c"], "a": leaf["a"], "b": leaf["b"]})))
    value = {"a": np.array([0.25, 0.5], np.float32), "b": 2, "c": np.array([1, 0], np.int8)}

    for layout in layouts:
        assert [path for path, _ in leaves(layout.space)] == [("a",), ("b",), ("c",)]
        assert [key for key, _ in children(layout.space)] == ["a", "b", "c"]
        assert list(layout.unflatten(layout.flatten(value))) == ["a", "b", "c"]
    assert len({layout.flatten(value).tobytes() for layout in layouts}) == 1


def test_non_string_dict_keys_sort_by_value():
    space = spaces.Dict(OrderedDict([(10, spaces.Discrete(3)), (2, spaces.Discrete(5))]))
    assert [path for path, _ in leaves(space)] == [(2,), (10,)]
    layout = ActionLayout(space)
    assert layout.flat_space == spaces.MultiDiscrete([5, 3])
    assert layout.flatten({10: 1, 2: 4}).tolist() == [4, 1]


def _reversed_action_space() -> spaces.Dict:
    """The predecessor's bug: a nested action Dict declared with keys out of sorted order."""
    return spaces.Dict(OrderedDict([
        ("z_move", spaces.Discrete(7)),
        ("attack", spaces.Dict(OrderedDict([
            ("y_target", spaces.Discrete(5, start=-2)),
            ("b_style", spaces.MultiDiscrete([3, 4])),
        ]))),
    ]))


def test_flatten_and_unflatten_agree_on_nested_action_dicts():
    layout = ActionLayout(_reversed_action_space())
    # Sorted order: attack.b_style (2), attack.y_target (1), z_move (1).
    assert layout.flat_space == spaces.MultiDiscrete([3, 4, 5, 7])
    action = {"z_move": 6, "attack": {"y_target": -1, "b_style": np.array([2, 0])}}
    flat = layout.flatten(action)
    assert flat.tolist() == [2, 0, 1, 6]

    back = layout.unflatten(np.array([1, 3, 4, 0]))
    assert int(back["z_move"]) == 0 and int(back["attack"]["y_target"]) == 2
    assert back["attack"]["b_style"].tolist() == [1, 3]
    assert_round_trip(layout.space, action, layout.unflatten(flat))

    batch = layout.unflatten(torch.tensor([[2, 0, 1, 6], [1, 3, 4, 0]]))
    assert batch["z_move"].tolist() == [6, 0] and batch["attack"]["y_target"].tolist() == [-1, 2]


def test_binding_flat_actions_reach_the_env_in_sorted_order():
    """Through the whole emulated env: reward = move + style[1] of the action the env received."""
    binding = Binding(env_cls=NestedSingleAgentEnv)
    # ACTION_SPACE sorted: attack.style (2), attack.target (1), move (1).
    assert binding.single_action_space == spaces.MultiDiscrete([2, 3, 4, 5])
    raw = {"move": 3, "attack": {"target": 2, "style": np.array([1, 2])}}
    flat = binding.flatten_action(raw)
    assert flat.tolist() == [1, 2, 3, 3]
    assert_round_trip(binding.raw_single_action_space, raw, binding.unflatten_action(flat))

    env = binding.make_env()
    env.reset(seed=0)
    _, rewards, *_ = env.step(flat[None])
    assert rewards.tolist() == [3.0 + 2.0]


# ---------------------------------------------------------------- unsupported spaces


@pytest.mark.parametrize("space, name", [
    (spaces.Text(8), r"Text\("),
    (spaces.Graph(spaces.Box(0, 1, (2,)), spaces.Discrete(3)), r"Graph\("),
    (spaces.Sequence(spaces.Discrete(4)), r"Sequence\("),
    (spaces.Dict({"ok": spaces.Discrete(2), "inner": spaces.Tuple([spaces.Text(4)])}), r"Text\("),
])
@pytest.mark.parametrize("layout_cls", [ObservationLayout, ActionLayout])
def test_unsupported_space_raises_naming_it(layout_cls, space, name):
    with pytest.raises(SpaceError, match=rf"unsupported space {name}.*expected Box, Discrete, MultiDiscrete"):
        layout_cls(space)


def test_binding_names_the_env_the_space_and_the_path_of_an_unsupported_space():
    class TextEnv(gymnasium.Env):
        observation_space = spaces.Dict({"name": spaces.Text(5)})
        action_space = spaces.Discrete(2)

    with pytest.raises(SpaceError, match=r"TextEnv: observation space: \['name'\]: unsupported space Text\("):
        Binding(env_cls=TextEnv)

    class SequenceActionEnv(TextEnv):
        observation_space = spaces.Box(0, 1, (2,))
        action_space = spaces.Tuple([spaces.Discrete(2), spaces.Sequence(spaces.Discrete(3))])

    with pytest.raises(SpaceError, match=r"SequenceActionEnv: action space: \[1\]: unsupported space Sequence\("):
        Binding(env_cls=SequenceActionEnv)


def test_leaf_signatures_name_each_leaf_and_digest_many_values():
    from shoal.spaces import leaf_difference, leaf_signature

    grid = spaces.Dict({"map": spaces.MultiDiscrete(np.full((64, 64), 5)), "hp": spaces.Discrete(3, start=1)})
    signature = leaf_signature(grid)
    assert signature[0] == "['hp'] Discrete() int64 n=3 start=1"
    assert signature[1].startswith("['map'] MultiDiscrete(64, 64) int64 nvec=(64, 64) crc32 ") and len(signature[1]) < 120
    assert leaf_signature(spaces.MultiDiscrete([2, 3], dtype=">i4")) == [
        "(the whole space) MultiDiscrete(2,) >i4 nvec=[2, 3] start=[0, 0]"]
    other = leaf_signature(spaces.Dict({"map": spaces.MultiDiscrete(np.full((64, 64), 6)),
                                        "hp": spaces.Discrete(3, start=1)}))
    assert leaf_difference(signature, other).startswith("leaf 1: ['map'] MultiDiscrete(64, 64) int64 nvec=(64, 64)")
    assert leaf_difference(signature, signature[:1]) == "2 leaves, not 1"


def test_a_multidiscrete_leaf_with_no_values_keeps_its_shape():
    layout = ObservationLayout(spaces.Dict({"none": spaces.MultiDiscrete(np.ones((0, 3), np.int64)),
                                            "x": spaces.Discrete(3)}))
    value = {"none": np.zeros((0, 3), np.int64), "x": 2}
    assert layout.unflatten(layout.flatten(value))["none"].shape == (0, 3)


def test_a_float64_action_at_a_float32_bound_is_inside():
    """np.clip(a, -0.7, 0.7) in float64 gives 0.7, a little above float32's 0.7: it arrives as that bound."""
    layout = ActionLayout(spaces.Box(-0.7, 0.7, (2,), np.float32))
    assert layout.invalid_rows(np.array([[0.7, -0.7]])) is None
    assert layout.invalid_rows(np.array([[0.7, 0.7001], [0.1, 0.2]])).tolist() == [True, False]
    assert layout.unflatten(np.array([0.7, -0.7])).tolist() == [np.float32(0.7), np.float32(-0.7)]
    mixed = ActionLayout(spaces.Dict({"a": spaces.Box(-0.7, 0.7, (1,), np.float32),
                                      "b": spaces.Box(-1, 1, (1,), np.float64)}))  # a float64 flat action
    assert mixed.invalid_rows(np.array([[0.7, 1.0], [-0.7, -1.0]])) is None  # 'a' holds float32's 0.7
    assert mixed.invalid_rows(np.array([[0.7001, 0.0], [0.0, 1.0001]])).tolist() == [True, True]
    half = ActionLayout(spaces.Dict({"a": spaces.Box(-1, 1, (1,), np.float16),
                                     "b": spaces.Box(-1, 1, (1,), np.float32)}))
    past = 1 + 2**-11 + 2**-40  # float16 rounds it up past 1; through float32 first it would round to 1
    assert half.invalid_rows(np.array([[past, 0.0]])).tolist() == [True]


def test_empty_space_raises():
    for layout_cls in (ObservationLayout, ActionLayout):
        with pytest.raises(SpaceError, match="no leaves"):
            layout_cls(spaces.Dict({"a": spaces.Tuple([])}))


# ---------------------------------------------------------------- bad values

NESTED = spaces.Dict({
    "agent": spaces.Dict({"pos": spaces.Box(-1, 1, (2,), np.float32), "level": spaces.Box(0, 9, (), np.int8)}),
    "items": spaces.Tuple([spaces.Discrete(4), spaces.MultiDiscrete([3, 3])]),
    "seen": spaces.Box(0, 255, (2, 2), np.uint8),
})


def _good_value() -> dict:
    return {
        "agent": {"pos": np.array([0.5, -0.5], np.float32), "level": np.int8(3)},
        "items": (2, np.array([0, 2])),
        "seen": np.array([[0, 255], [7, 9]], np.uint8),
    }


def _with(path: tuple, leaf_value: Any) -> dict:
    value = _good_value()
    parent = _get(value, path[:-1])
    if isinstance(parent, tuple):
        parent = list(parent)
        parent[path[-1]] = leaf_value
        _get(value, path[:-2])[path[-2]] = tuple(parent)
    else:
        parent[path[-1]] = leaf_value
    return value


def test_good_value_round_trips():
    layout = ObservationLayout(NESTED)
    assert_round_trip(NESTED, _good_value(), layout.unflatten(layout.flatten(_good_value())))


@pytest.mark.parametrize("path, bad, message", [
    (("agent", "pos"), np.zeros(3, np.float32), r"\['agent'\]\['pos'\]: expected shape \(2,\), got \(3,\)"),
    (("seen",), np.zeros((2,), np.uint8), r"\['seen'\]: expected shape \(2, 2\), got \(2,\)"),
    (("items", 1), np.array([0, 1, 2]), r"\['items'\]\[1\]: expected shape \(2,\), got \(3,\)"),
    (("agent", "level"), np.float32(3.0), r"\['agent'\]\['level'\]: expected dtype int8, got float32"),
    (("items", 0), 2.5, r"\['items'\]\[0\]: expected dtype int64, got float64"),
    (("seen",), np.full((2, 2), 1.0), r"\['seen'\]: expected dtype uint8, got float64"),
    (("agent", "pos"), np.array(["a", "b"]), r"\['agent'\]\['pos'\]: expected dtype float32, got <U1"),
    (("agent", "level"), np.int64(300), r"\['agent'\]\['level'\]: expected dtype int8, got int64 "
                                        r"with values outside its range"),
    (("agent", "level"), np.int64(-129), r"expected dtype int8, got int64 with values outside its range"),
    (("seen",), np.full((2, 2), -1), r"\['seen'\]: expected dtype uint8, got int64 with values outside"),
    (("seen",), np.full((2, 2), 256, np.uint16), r"\['seen'\]: expected dtype uint8, got uint16 with values"),
])
def test_bad_leaf_value_raises_with_its_path(path, bad, message):
    layout = ObservationLayout(NESTED)
    with pytest.raises(SpaceError, match=message):
        layout.flatten(_with(path, bad))
    flat = np.zeros((2, layout.size), layout.dtype)
    with pytest.raises(SpaceError, match=message):
        layout.writer(flat)(1, _with(path, bad))


@pytest.mark.parametrize("wider", [np.int64(9), np.uint64(9), np.int16(9), 9])
def test_wider_int_that_fits_is_stored_exactly(wider):
    layout = ObservationLayout(NESTED)
    assert int(layout.unflatten(layout.flatten(_with(("agent", "level"), wider)))["agent"]["level"]) == 9


@pytest.mark.parametrize("dtype, value", [
    (np.int8, np.iinfo(np.int64).max), (np.int64, np.uint64(2**63)), (np.uint64, np.int64(-1)),
    (np.int32, np.int64(2**31)), (np.uint8, np.int64(-1)), (np.int16, np.uint64(2**64 - 1)),
])
def test_integer_that_does_not_fit_never_wraps(dtype, value):
    info = np.iinfo(dtype)
    layout = ObservationLayout(spaces.Box(info.min, info.max, (1,), dtype))
    with pytest.raises(SpaceError, match=rf"expected dtype {np.dtype(dtype)}, got .* with values outside its range"):
        layout.flatten(np.array([value]))


def test_uint64_and_int64_extremes_survive_a_mixed_layout():
    space = spaces.Tuple([spaces.Box(0, 2**64 - 1, (2,), np.uint64),
                          spaces.Box(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (2,), np.int64),
                          spaces.Box(-np.inf, np.inf, (3,), np.float64), spaces.Box(0, 1, (), np.bool_)])
    value = (np.array([2**64 - 1, 2**63 + 1], np.uint64), np.array([-2**63, 2**63 - 1], np.int64),
             np.array([-0.0, 5e-324, np.inf]), np.bool_(True))
    layout = ObservationLayout(space)
    flat = layout.flatten(value)
    assert flat.dtype == np.uint8
    assert_round_trip(space, value, layout.unflatten(flat))
    assert_round_trip(space, value, layout.unflatten(torch.from_numpy(flat)))


def test_discrete_at_int64_max():
    int64 = np.iinfo(np.int64)
    space = spaces.Dict({"low": spaces.Discrete(2, start=int64.min), "high": spaces.Discrete(3, start=int64.max - 2)})
    value = {"low": int64.min, "high": int64.max}
    observations = ObservationLayout(space)
    flat = observations.flatten(value)
    assert observations.out_of_bounds(flat) is None
    assert_round_trip(space, value, observations.unflatten(flat))
    actions = ActionLayout(space)
    flat = actions.flatten(value)
    assert flat.tolist() == [2, 0]
    assert_round_trip(space, value, actions.unflatten(flat))
    assert_round_trip(space, value, actions.unflatten(torch.from_numpy(flat)))


def test_missing_dict_entry_raises_naming_the_key():
    value = _good_value()
    del value["agent"]["pos"]
    with pytest.raises(SpaceError, match=r"no entry 'pos' at \['agent'\]"):
        ObservationLayout(NESTED).flatten(value)


def test_unflatten_rejects_wrong_flat_arrays():
    layout = ObservationLayout(NESTED)
    with pytest.raises(SpaceError, match=rf"expected last dimension {layout.size}, got shape \(4, {layout.size + 1}\)"):
        layout.unflatten(np.zeros((4, layout.size + 1), layout.dtype))
    with pytest.raises(SpaceError, match=r"expected dtype uint8, got float32"):
        layout.unflatten(np.zeros(layout.size, np.float32))
    with pytest.raises(SpaceError, match=r"expected dtype uint8, got torch.float32"):
        layout.unflatten(torch.zeros(layout.size))
    actions = ActionLayout(_reversed_action_space())
    with pytest.raises(SpaceError, match=r"flat action: expected last dimension 4, got shape \(2, 3\)"):
        actions.unflatten(np.zeros((2, 3), np.int64))


def test_action_flatten_rejects_bad_leaves():
    layout = ActionLayout(_reversed_action_space())
    action = {"z_move": 6, "attack": {"y_target": -1, "b_style": np.array([2, 0, 1])}}
    with pytest.raises(SpaceError, match=r"action leaf \['attack'\]\['b_style'\]: expected shape \(2,\), got \(3,\)"):
        layout.flatten(action)
    action = {"z_move": 2.7, "attack": {"y_target": -1, "b_style": np.array([2, 0])}}
    with pytest.raises(SpaceError, match=r"action leaf \['z_move'\]: expected integers \(its dtype is int64\), got float64"):
        layout.flatten(action)
    action = {"z_move": 7, "attack": {"y_target": -1, "b_style": np.array([2, 0])}}
    with pytest.raises(SpaceError, match=r"action leaf \['z_move'\]: expected values from \[0\] to \[6\], got 7"):
        layout.flatten(action)
    action = {"z_move": 1, "attack": {"y_target": -3, "b_style": np.array([2, 0])}}
    with pytest.raises(SpaceError, match=r"\['attack'\]\['y_target'\]: expected values from \[-2\] to \[2\]"):
        layout.flatten(action)
    boxes = ActionLayout(spaces.Dict({"steer": spaces.Box(-1, 1, (2,), np.float32)}))
    with pytest.raises(SpaceError, match=r"action leaf \['steer'\]: expected numbers \(its dtype is float32\), got <U3"):
        boxes.flatten({"steer": np.array(["0.5", "1.0"])})


# ---------------------------------------------------------------- out_of_bounds


def test_out_of_bounds_finds_the_bad_leaf_and_row():
    layout = ObservationLayout(NESTED)
    rows = [_good_value() for _ in range(4)]
    flat = np.stack([layout.flatten(row) for row in rows])
    assert layout.out_of_bounds(flat) is None

    nested_view = layout.unflatten(flat)
    nested_view["agent"]["pos"][2, 1] = 1.5  # views: writes land in flat
    assert layout.out_of_bounds(flat) == (("agent", "pos"), (2,))
    nested_view["agent"]["pos"][2, 1] = np.nan
    assert layout.out_of_bounds(flat) == (("agent", "pos"), (2,))
    nested_view["agent"]["pos"][2, 1] = 0.0
    nested_view["items"][0][3] = 4  # Discrete(4) holds 0..3
    assert layout.out_of_bounds(flat) == (("items", 0), (3,))
    nested_view["items"][0][3] = 3
    nested_view["agent"]["level"][0] = -1
    assert layout.out_of_bounds(flat) == (("agent", "level"), (0,))


def test_out_of_bounds_respects_discrete_start():
    layout = ObservationLayout(spaces.Dict({"a": spaces.Discrete(3, start=-2), "b": spaces.MultiDiscrete([2, 2], start=[5, -5])}))
    flat = layout.flatten({"a": -2, "b": np.array([6, -5])})
    assert layout.out_of_bounds(flat) is None
    assert layout.flat_space.contains(flat)
    layout.unflatten(flat)["a"][()] = 1
    assert layout.out_of_bounds(flat) == (("a",), ())


def test_a_ragged_or_unconvertible_leaf_value_is_named():
    observations = ObservationLayout(spaces.Dict({"pos": spaces.Box(-1, 1, (2, 2)), "hp": spaces.Discrete(3)}))
    flat = np.zeros((2, observations.size), observations.dtype)
    ragged = {"pos": [[0, 0], [0]], "hp": 1}
    message = r"observation leaf \['pos'\] must be one array .* got list: setting an array element"
    for write in (observations.flatten, lambda value: observations.writer(flat)(0, value),
                  lambda value: observations.rows_writer(flat)([0, 1], [value, value])):
        with pytest.raises(SpaceError, match=message):
            write(ragged)
    with pytest.raises(SpaceError, match=r"observation leaf \(the whole space\) must be one array .* got Tensor: "
                                         r"Can't call numpy\(\) on Tensor that requires grad"):
        ObservationLayout(spaces.Box(-1, 1, (3,))).flatten(torch.zeros(3, requires_grad=True))
    actions = ActionLayout(spaces.Dict({"move": spaces.MultiDiscrete([[2, 2], [2, 2]])}))
    with pytest.raises(SpaceError, match=r"action leaf \['move'\] must be one array .* got list: setting an array"):
        actions.flatten({"move": [[0, 1], [1]]})
    with pytest.raises(SpaceError, match=r"action leaf \(the whole space\) must be one array .* got Tensor"):
        ActionLayout(spaces.Box(-1, 1, (1,))).flatten(torch.zeros(1, requires_grad=True))


def test_a_value_that_is_no_container_where_the_space_has_an_empty_dict_or_tuple_is_named():
    layout = ObservationLayout(spaces.Dict({"a": spaces.Discrete(2), "e": spaces.Tuple(()), "d": spaces.Dict({})}))
    flat = np.zeros((2, layout.size), layout.dtype)
    for bad, message in [({"a": 1, "e": None, "d": {}}, r"observation \['e'\]: expected a Tuple of 0 entries, got "
                                                        r"NoneType None"),
                         ({"a": 1, "e": (), "d": 5}, r"observation \['d'\]: expected a Dict of 0 entries, got int 5")]:
        for write in (layout.flatten, lambda value: layout.writer(flat)(0, value),
                      lambda value: layout.rows_writer(flat)([0, 1], [value, value])):
            with pytest.raises(SpaceError, match=message):
                write(bad)


@pytest.mark.parametrize("dtype, value, shown", [(np.float32, np.array([1e300, 0.5]), r"1e\+300"),
                                                 (np.float32, np.array([0.5, -1e39]), r"-1e\+39"),
                                                 (np.float16, np.array([70000, 1]), "70000")])
def test_a_finite_value_that_would_become_infinite_in_a_narrower_float_leaf_is_refused(dtype, value, shown):
    layout = ObservationLayout(spaces.Dict({"x": spaces.Box(-np.inf, np.inf, (2,), dtype)}))
    flat = np.zeros((2, layout.size), layout.dtype)
    message = rf"observation leaf \['x'\]: {shown} does not fit {np.dtype(dtype)} \(it would become -?inf\)"
    for write in (layout.flatten, lambda value: layout.writer(flat)(0, value),
                  lambda value: layout.rows_writer(flat)([0, 1], [value, value])):
        with pytest.raises(SpaceError, match=message):
            write({"x": value})
    infinite = {"x": np.array([np.inf, -1.0])}  # already infinite in float64: it stays so, inside the bounds
    assert layout.flatten(infinite).view(dtype).tolist() == [np.inf, -1.0]


def test_an_extra_entry_in_an_action_is_called_an_action():
    space = spaces.Dict({"move": spaces.Discrete(4), "attack": spaces.Dict({"target": spaces.Discrete(2)})})
    actions = ActionLayout(space)
    with pytest.raises(SpaceError, match=r"^action \(the whole space\): expected 2 entries, got 3"):
        actions.flatten({"move": 0, "attack": {"target": 1}, "typo": 1})
    with pytest.raises(SpaceError, match=r"^action \['attack'\]: expected 1 entries, got 2"):
        actions.flatten({"move": 0, "attack": {"target": 1, "typo": 1}})
    observations = ObservationLayout(spaces.Dict({"x": spaces.Discrete(2)}))
    with pytest.raises(SpaceError, match=r"^observation \(the whole space\): expected 1 entries, got 2"):
        observations.flatten({"x": 1, "typo": 1})


def test_unflattened_observations_are_views_of_a_strided_flat_array_and_right_for_a_transposed_one():
    layout = ObservationLayout(spaces.Dict({"pos": spaces.Box(-1, 1, (2,)), "hp": spaces.Discrete(5)}))
    flat = np.zeros((6, layout.size), layout.dtype)
    every_other = layout.unflatten(flat[::2])
    every_other["hp"][1] = 3
    every_other["pos"][2] = [0.5, -0.5]
    assert layout.unflatten(flat)["hp"].tolist() == [0, 0, 3, 0, 0, 0]
    assert layout.unflatten(flat)["pos"][4].tolist() == [0.5, -0.5]
    transposed = np.ascontiguousarray(flat.T).T  # the same values, its last axis not contiguous: a copy is viewed
    assert layout.unflatten(transposed)["hp"].tolist() == [0, 0, 3, 0, 0, 0]


def test_flat_actions_in_a_cpu_tensor_are_checked_as_numpy_ones_are():
    box = ActionLayout(spaces.Box(-1, 1, (2,), np.float32))
    for bad, shown in [([np.nan, 0.0], r"\[nan  0.\]"), ([[0.5, 0.0], [3.0, 0.0]], r"\[3. 0.\]")]:
        for flat in (np.array(bad, np.float32), torch.tensor(bad), torch.tensor(bad, requires_grad=True)):
            with pytest.raises(SpaceError, match=rf"flat action {shown} is out of range: expected \[-1. -1.\] <= a "
                                                 rf"<= \[1. 1.\]"):
                box.unflatten(flat)
    assert box.unflatten(torch.tensor([0.5, -1.0], dtype=torch.bfloat16)).tolist() == [0.5, -1.0]
    discrete = ActionLayout(spaces.Discrete(3))
    with pytest.raises(SpaceError, match=r"flat action \[5\] is out of range: expected 0 <= a < \[3\]"):
        discrete.unflatten(torch.tensor([5]))
    with pytest.raises(SpaceError, match=r"MultiDiscrete\(\[3\]\) takes integer actions, got dtype float32"):
        discrete.unflatten(torch.tensor([1.0]))
    assert int(discrete.unflatten(torch.tensor([2]))) == 2


def test_odd_corners_of_spaces_from_fuzzing():
    # Non-native byte order: the flat array is native (torch reads no other), the values exact.
    layout = ObservationLayout(spaces.Box(-1, 1, (3,), np.dtype(">f4")))
    flat = layout.flatten(np.array([0.5, -0.25, 1], ">f4"))
    assert layout.dtype == np.float32 and flat.tolist() == [0.5, -0.25, 1.0]
    assert layout.unflatten(torch.from_numpy(flat[None])).tolist() == [[0.5, -0.25, 1.0]]
    mixed = ObservationLayout(spaces.Dict({"a": spaces.Box(-1, 1, (2,), np.dtype(">i8")), "b": spaces.Discrete(3)}))
    flat = mixed.flatten({"a": np.array([-1, 1], ">i8"), "b": 2})
    assert mixed.unflatten(torch.from_numpy(flat[None]))["a"].tolist() == [[-1, 1]]
    # A start whose last value passes the dtype's end: gymnasium builds it, its values cannot exist.
    for space in (spaces.MultiDiscrete([5], np.int8, start=[125]), spaces.Discrete(5, start=2**63 - 3)):
        for build in (ObservationLayout, ActionLayout):
            with pytest.raises(SpaceError, match=r"start \+ n - 1 = \d+ lies past the end of its dtype"):
                build(space)
    # One integer Box action of shape () is a 0-d array, also at int64's ends; a tensor keeps the leaf's bounds.
    extreme = ActionLayout(spaces.Box(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (), np.int64))
    assert type(extreme.unflatten(extreme.flat_space.high)) is np.ndarray
    for dtype in (np.dtype(np.int64), np.dtype(">i8")):
        bounded = ActionLayout(spaces.Box(-(2**62 - 1), 2**62 - 1, (1,), dtype))
        assert bounded.unflatten(torch.from_numpy(bounded.flat_space.high)).tolist() == [2**62 - 1]
    # A float leaf narrower than the flat dtype: finite actions past its range saturate, infinities stay.
    narrow = ActionLayout(spaces.Tuple((spaces.Box(-np.inf, np.inf, (1,), np.float16), spaces.Box(-1, 1, (1,)))))
    for flat in (np.array([1e5, 0.0]), torch.tensor([1e5, 0.0], dtype=torch.float64)):
        assert narrow.unflatten(flat)[0].tolist() == [65504.0]
    assert narrow.unflatten(np.array([-np.inf, 0.0]))[0].tolist() == [-np.inf]
    # The same where the flat dtype is the leaf's and the actions come wider (float32 from a trainer).
    alone = ActionLayout(spaces.Box(-np.inf, np.inf, (1,), np.float16))
    assert alone.dtype == np.float16
    for flat in (np.array([7e4], np.float32), torch.tensor([-7e4]), np.array([np.inf])):
        assert np.abs(alone.unflatten(flat)).tolist() == [np.inf if np.isinf(flat[0]) else 65504.0]
    assert alone.held(np.array([[1e39]])).tolist() == [[65504.0]]
    # A raw float for an integer or bool Box is refused, as the space's contains does.
    with pytest.raises(SpaceError, match=r"expected integers \(its dtype is int64\), got float64"):
        ActionLayout(spaces.Box(0, 3, (1,), np.int64)).flatten(np.array([1.5]))
    with pytest.raises(SpaceError, match=r"expected bools \(its dtype is bool\), got float64"):
        ActionLayout(spaces.Box(0, 1, (1,), bool)).flatten(np.array([0.5]))


def test_a_leaf_with_no_room_for_batch_dimensions_is_refused():
    """numpy arrays hold at most 32 dimensions, and batches of leaves (time, agents) need 2 of them."""
    ObservationLayout(spaces.Box(-1, 1, (1,) * 30))
    for make in (ObservationLayout, ActionLayout):
        with pytest.raises(SpaceError, match=r"\['deep'\]: Box.* has 31 dimensions: at most 30 fit"):
            make(spaces.Dict({"deep": spaces.Box(-1, 1, (1,) * 31)}))


def test_more_corners_of_spaces_from_probing():
    # A torch flat observation whose storage starts at an odd byte: copied once, not torch's alignment error.
    layout = ObservationLayout(spaces.Dict({"pos": spaces.Box(-1, 1, (2,), np.float32), "hp": spaces.Discrete(5)}))
    flat = layout.flatten({"pos": np.array([0.5, -0.5], np.float32), "hp": 3})
    buffer = torch.zeros(1 + layout.size, dtype=torch.uint8)
    buffer[1:] = torch.from_numpy(flat)
    nested = layout.unflatten(buffer[1:])
    assert nested["pos"].tolist() == [0.5, -0.5] and int(nested["hp"]) == 3
    # A read-only out= is named, not numpy's assignment error.
    out = np.zeros(layout.size, np.uint8)
    out.flags.writeable = False
    with pytest.raises(SpaceError, match=r"out must be a writable.*\(read-only\)"):
        layout.flatten({"pos": np.zeros(2, np.float32), "hp": 0}, out=out)
    # float16 tensors (autocast) where a float leaf is narrower than the flat dtype.
    mixed = ActionLayout(spaces.Dict({"x": spaces.Box(-1, 1, (1,), np.float32), "y": spaces.Box(-1, 1, (1,))}))
    assert mixed.unflatten(torch.tensor([0.5, 0.5], dtype=torch.float16))["x"].tolist() == [0.5]
    assert mixed.unflatten(torch.tensor([1, 0]))["x"].tolist() == [1.0]  # integers: nothing to saturate
    # An unsigned discrete leaf with a start: exact on numpy and torch, also a uint64 start past 2**53.
    for space, flat_values, expected in [(spaces.Discrete(3, start=1, dtype=np.uint32), [1], 2),
                                         (spaces.Discrete(3, start=2**64 - 3, dtype=np.uint64), [2], 2**64 - 1),
                                         (spaces.Discrete(3, start=2**63 - 2, dtype=np.uint64), [2], 2**63)]:
        actions = ActionLayout(space)
        for flat in (np.array(flat_values), np.array(flat_values, np.uint64), torch.tensor(flat_values)):
            assert np.asarray(actions.unflatten(flat)).item() == expected, (space, flat)  # int() fails on torch's
        assert int(actions.unflatten_rows(np.array([flat_values]), [0])[0]) == expected
    assert ActionLayout(spaces.Discrete(200, start=-100, dtype=np.int16)).unflatten(np.array([199], np.uint64)) == 99
    # An integer Box action that the float64 flat action cannot hold exactly is refused, not rounded;
    # the ends of int64 come back exactly (held to the leaf's range).
    big = ActionLayout(spaces.Box(0, 2**62, (), np.int64))
    with pytest.raises(SpaceError, match=r"9007199254740993 has no exact float64 value, it would reach the env as "
                                         r"9007199254740992"):
        big.flatten(np.array(2**53 + 1))
    assert big.unflatten(big.flatten(np.array(2**60))).tolist() == 2**60
    # More choices than the flat MultiDiscrete's int64 counts hold.
    with pytest.raises(SpaceError, match=r"9223372036854775808 choices, more than the flat MultiDiscrete's int64"):
        ActionLayout(spaces.Discrete(2**63, dtype=np.uint64))
