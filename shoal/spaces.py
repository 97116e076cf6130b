"""Flatten nested Gymnasium spaces into one flat array, and get the structure back for free.

Observations: every leaf is laid out in one numpy structured dtype. When all leaves share a dtype the
flat array has that dtype (Atari frames stay uint8); otherwise it is a ``uint8`` byte buffer and each
leaf is a typed view into it, so round trips are exact for every dtype and unflattening copies nothing.

Actions: discrete leaves become one ``MultiDiscrete``, continuous leaves one ``Box``.

Dict keys are visited in sorted order by :func:`children`, the one function that both directions use.
"""

from __future__ import annotations

import functools
import itertools
import operator
import zlib
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
from gymnasium import spaces

from shoal.errors import SpaceError

MAX_LEAF_DIMS = 30  # numpy's 32 dimensions, less 2 for batches of leaves (time, agents)
SMALL_LEAF = 16  # a leaf's values (over all rows written at once) up to this many are range-checked in Python


@functools.singledispatch
def children(space: spaces.Space) -> list[tuple[Any, spaces.Space]] | None:
    """The (key, subspace) pairs of a composite space in canonical order; None for a leaf space."""
    raise SpaceError(
        f"unsupported space {space!r}: expected Box, Discrete, MultiDiscrete, MultiBinary, "
        f"or a Dict/Tuple of these"
    )


@children.register(spaces.Box)
@children.register(spaces.Discrete)
@children.register(spaces.MultiDiscrete)
@children.register(spaces.MultiBinary)
def _leaf_children(space: spaces.Space) -> None:
    return None


@children.register(spaces.Dict)
def _dict_children(space: spaces.Dict) -> list[tuple[Any, spaces.Space]]:
    try:
        keys = sorted(space.spaces)
    except TypeError:  # keys of mixed types: still one fixed order
        keys = sorted(space.spaces, key=repr)
    return [(key, space.spaces[key]) for key in keys]


@children.register(spaces.Tuple)
def _tuple_children(space: spaces.Tuple) -> list[tuple[Any, spaces.Space]]:
    return list(enumerate(space.spaces))


class Leaf(NamedTuple):
    """One leaf space and the path of keys/indices that reaches it."""

    path: tuple
    space: spaces.Space


def leaves(space: spaces.Space, path: tuple = ()) -> list[Leaf]:
    """All leaves of ``space`` in canonical order (sorted Dict keys, Tuple order)."""
    try:
        kids = children(space)
    except SpaceError as error:  # say where an unsupported space sits in a nested one
        raise SpaceError(f"{_path_str(path)}: {error}" if path else str(error)) from None
    if kids is None:
        if len(space.shape) > MAX_LEAF_DIMS:
            raise SpaceError(f"{_path_str(path) + ': ' if path else ''}{space} has {len(space.shape)} dimensions: at most "
                             f"{MAX_LEAF_DIMS} fit (numpy arrays have at most 32, and batches of leaves add up to 2 in "
                             f"front: time, agents); reshape it")
        return [Leaf(path, space)]
    return [leaf for key, sub in kids for leaf in leaves(sub, path + (key,))]


def leaf_signature(space: spaces.Space) -> list[str]:
    """The leaves of ``space`` as a network reads them from a flat array, in canonical order: path, kind, shape
    and dtype, and the values of a discrete leaf (a digest of them past 16). Two spaces whose flat arrays
    match byte for byte may still differ here (an int64 leaf where the other has a float64 one), and then
    no model reads both."""
    def values(array) -> str:
        array = np.asarray(array).astype(np.int64)  # the same text for the same values in any dtype
        return str(array.tolist()) if array.size <= 16 else f"{array.shape} crc32 {zlib.crc32(array.tobytes()):08x}"

    described = []
    for leaf in leaves(space):
        sub = leaf.space
        text = f"{_path_str(leaf.path)} {type(sub).__name__}{tuple(sub.shape)} {sub.dtype}"
        if isinstance(sub, spaces.Discrete):
            text += f" n={int(sub.n)} start={int(sub.start)}"
        elif isinstance(sub, spaces.MultiDiscrete):
            text += f" nvec={values(sub.nvec)} start={values(sub.start)}"
        described.append(text)
    return described


def leaf_difference(theirs: list[str], ours: list[str]) -> str:
    """The first difference of two leaf signatures (:func:`leaf_signature`), for messages."""
    for index, (their, our) in enumerate(zip(theirs, ours)):
        if their != our:
            return f"leaf {index}: {their}, not {our}"
    return f"{len(theirs)} leaves, not {len(ours)}"


def containers(space: spaces.Space, path: tuple = ()) -> list[tuple[tuple, int, str]]:
    """(path, number of entries, "Dict" or "Tuple") of every Dict/Tuple in ``space``, outermost first."""
    kids = children(space)
    if kids is None:
        return []
    return [(path, len(kids), type(space).__name__)] + [
        node for key, sub in kids for node in containers(sub, path + (key,))]


def _entries(value: Any) -> int | None:
    """How many entries a Dict/Tuple value has; None for a value that is no container (None, a number)."""
    try:
        return len(value)
    except TypeError:
        return None


def _miscount(what: str, path: tuple, expected: int, kind: str, value: Any) -> SpaceError:
    """The error for a Dict/Tuple value of ``what`` ("observation" or "action") with more entries than its space
    (gymnasium's ``contains`` refuses it), or that is no container at all."""
    count = _entries(value)
    if count is None:
        return SpaceError(f"{what} {_path_str(path)}: expected a {kind} of {expected} entries, got "
                          f"{type(value).__name__} {_short(value)}")
    return SpaceError(f"{what} {_path_str(path)}: expected {expected} entries, got {count} "
                      f"({type(value).__name__} {_short(value)})")


def _check_entries(what: str, path: tuple, expected: int, kind: str, found: list) -> None:
    """SpaceError unless each of ``found`` (values of the Dict/Tuple at ``path``) has ``expected`` entries."""
    try:
        counts = set(map(len, found))
    except TypeError:  # a value that is no container
        counts = None
    if counts != {expected}:
        raise _miscount(what, path, expected, kind, next(node for node in found if _entries(node) != expected))


def _check_counts(what: str, nodes: list[tuple[tuple, int, str]], values: list) -> None:
    """SpaceError naming ``what`` if a Dict/Tuple (``nodes``: :func:`containers`) of any of ``values`` has other
    entries."""
    for path, expected, kind in nodes:
        _check_entries(what, path, expected, kind, [_get(value, path) for value in values])


def _describe(value: Any) -> str:
    """What a value is, for messages: type, and shape and dtype where it has them."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    return type(value).__name__ + (f" of shape {tuple(shape)}" if shape is not None else "") + (
        f" and dtype {dtype}" if dtype is not None else "")


def shape_of(value: Any, array: np.ndarray) -> str:
    """The shape ``value`` came as (``array`` is it through :func:`as_array`), for messages; for a value that is
    no array, what it is too (``None`` becomes a 0-d array: "got ()" alone would not say so)."""
    if isinstance(value, np.ndarray) or _is_torch(value) or isinstance(value, (list, tuple)) and array.dtype != object:
        return str(array.shape)
    return f"{array.shape} ({type(value).__name__} {_short(value)})"


def _values(space: spaces.Space, value: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    kids = children(space)
    if kids is None:
        yield path, value
        return
    for key, sub in kids:
        try:
            item = value[key]
        except (KeyError, IndexError, TypeError):
            raise SpaceError(
                f"value has no entry {key!r}{' at ' + _path_str(path) if path else ''}: "
                f"expected the structure of {space}, "
                f"got {type(value).__name__} {_short(value)}"
            ) from None
        yield from _values(sub, item, path + (key,))


def _get(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


def nester(space: spaces.Space) -> Callable[[list], Any]:
    """A function ``build(items)`` that nests leaf values, given in :func:`leaves` order, like ``space``.

    Made once per space, so a call does not walk the space again (no dispatch, no sorting).
    """
    return _nester(space, itertools.count())


def _nester(space: spaces.Space, counter: Iterator[int]) -> Callable[[list], Any]:
    kids = children(space)
    if kids is None:
        return operator.itemgetter(next(counter))
    parts = [(key, _nester(sub, counter)) for key, sub in kids]
    return _DictNester(parts) if isinstance(space, spaces.Dict) else _TupleNester(parts)


class _DictNester:  # classes, not closures: layouts travel to worker processes by pickle
    __slots__ = ("parts",)

    def __init__(self, parts: list):
        self.parts = parts

    def __call__(self, items: list) -> dict:
        return {key: part(items) for key, part in self.parts}


class _TupleNester(_DictNester):
    __slots__ = ()

    def __call__(self, items: list) -> tuple:
        return tuple(part(items) for _, part in self.parts)


class RowsNester:
    """``build(columns)``: one nested value per row, from one column (sequence) per leaf in :func:`leaves` order.

    The per-row body is generated once per space as a comprehension of dict and tuple displays,
    several times faster per row than nesting by calls, which matters at hundreds of agents a step.
    Dict keys reach the generated code as names in its namespace, never as source text.
    """

    def __init__(self, space: spaces.Space):
        self.space = space
        keys: dict[str, Any] = {}
        counter = itertools.count()

        def display(sub: spaces.Space) -> str:
            kids = children(sub)
            if kids is None:
                return f"v{next(counter)}"
            parts = [(key, display(child)) for key, child in kids]
            if isinstance(sub, spaces.Dict):
                names = [f"k{len(keys) + index}" for index in range(len(parts))]
                keys.update(zip(names, (key for key, _ in parts)))
                return "{" + ", ".join(f"{name}: {part}" for name, (_, part) in zip(names, parts)) + "}"
            return "(" + "".join(f"{part}, " for _, part in parts) + ")"

        body = display(space)
        targets = "".join(f"v{index}, " for index in range(next(counter)))
        namespace = dict(keys)
        exec(f"def build(columns):\n    return [{body} for {targets}in zip(*columns)]\n", namespace)
        self._build = namespace["build"]

    def __call__(self, columns: list) -> list:
        return self._build(columns)

    def __reduce__(self):  # generated code does not pickle: rebuild it from the space
        return RowsNester, (self.space,)


def index_leaves(nested: Any, index: Any) -> Any:
    """``leaf[index]`` for every leaf of a nested dict/tuple of arrays (e.g. one agent's slot of a batch)."""
    if isinstance(nested, dict):
        return {key: index_leaves(value, index) for key, value in nested.items()}
    if isinstance(nested, tuple):
        return tuple(index_leaves(value, index) for value in nested)
    return nested[index]


def _path_str(path: tuple) -> str:
    return "".join(f"[{key!r}]" for key in path) or "(the whole space)"


def _short(value: Any) -> str:
    """``repr(value)``, shortened for a message: a long list or tuple keeps whole items, its last and its length."""
    text = repr(value)
    if len(text) < 120:
        return text
    if isinstance(value, (list, tuple)) and len(value) > 2:
        head, width = [], 0
        for item in value[:-1]:
            width += len(piece := repr(item)) + 2
            if width > 80:
                break
            head.append(piece)
        last = repr(value[-1])
        if head and len(last) <= 30:
            opening, closing = "[]" if isinstance(value, list) else "()"
            return f"{opening}{', '.join(head)}, ..., {last}{closing} ({len(value)} items)"
    return text[:117] + "..."


def _same_kind(source: np.dtype, dtype: np.dtype) -> bool:
    """Whether ``source`` may be cast to ``dtype`` at all: no float -> int, but any int -> int (range checked)."""
    return np.can_cast(source, dtype, "same_kind") or (source.kind in "iu" and dtype.kind in "iu")


def _cast_problem(array: np.ndarray, dtype: np.dtype) -> str | None:
    """Why ``array`` cannot be cast to ``dtype`` exactly (a float to an integer, an integer past its range or one
    a float rounds), or None when it can."""
    if not _same_kind(array.dtype, dtype):
        return ""
    if not array.size:
        return None
    if dtype.kind in "iu" and not np.can_cast(array.dtype, dtype, "safe"):
        info = np.iinfo(dtype)  # Python ints: numpy would compare uint64 with int64 as float64
        inside = int(array.min()) >= info.min and int(array.max()) <= info.max
        return None if inside else " with values outside its range"
    if dtype.kind == "f" and _rounds_in(array.dtype, dtype):
        held = 2 ** (np.finfo(dtype).nmant + 1)  # every integer up to this one is held exactly
        if int(array.min()) >= -held and int(array.max()) <= held:  # the usual case: two reductions
            return None
        with np.errstate(invalid="ignore", over="ignore"):
            cast = array.astype(dtype)
            exact = (np.isinf(cast) | (cast.astype(array.dtype) == array)).all()  # inf: the narrowing check names it
        return None if exact else " with integers it cannot hold exactly"
    return None


def _narrowed(field: "_Field", array: np.ndarray) -> np.ndarray:
    """``array`` cast to the leaf's narrower float dtype; SpaceError for a finite value that becomes infinite
    there."""
    with np.errstate(over="ignore"):
        cast = array.astype(field.dtype)
    if np.isinf(cast).any():  # rare: only then find whether it was infinite before
        overflow = np.isinf(cast) & ~np.isinf(array)
        if overflow.any():
            raise SpaceError(f"observation leaf {_path_str(field.path)}: {array[overflow][0].item()!r} does not fit "
                             f"{field.dtype} (it would become {cast[overflow][0]})")
    return cast


def _require_leaves(found: list, space: spaces.Space) -> list:
    if not found:
        raise SpaceError(f"space {space} has no leaves: expected at least one Box, Discrete, MultiDiscrete "
                         f"or MultiBinary")
    return found


def as_array(value: Any, what: str, path: tuple | None = None) -> np.ndarray:
    """``np.asarray(value)``, or a SpaceError naming ``what`` (and the leaf at ``path``) and saying what came
    when numpy cannot make one array of it."""
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as error:  # ragged lists, a GPU tensor or one that requires grad
        if _is_torch(value) and not value.requires_grad:  # a dtype numpy lacks (bfloat16), on the CPU
            values = _cpu_values(value)
            if values is not None:
                return values
        where = what if path is None else f"{what} {_path_str(path)}"
        raise SpaceError(f"{where} must be one array (numpy, a CPU tensor or equal-length nested lists), got "
                         f"{type(value).__name__}: {str(error).splitlines()[0]}") from None


def holds_dict(value: Any, array: np.ndarray) -> bool:
    """Whether ``value`` (given as ``array``) is or holds a dict: PettingZoo's ``{agent: action}`` habit."""
    return isinstance(value, dict) or array.dtype == object and any(isinstance(item, dict) for item in array.flat)


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _cpu_values(tensor) -> np.ndarray | None:
    """A CPU tensor's values as a numpy array (a view where numpy has its dtype); None for a tensor elsewhere."""
    if tensor.device.type != "cpu":
        return None
    tensor = tensor.detach()
    try:
        return tensor.numpy()
    except TypeError:  # a dtype numpy lacks (bfloat16): float64 holds its values exactly
        return tensor.double().numpy()


@functools.lru_cache(maxsize=None)
def torch_dtype(dtype: np.dtype):
    """The torch dtype of a numpy one (in native byte order); SpaceError where torch has none."""
    import torch

    try:
        return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype).newbyteorder("="))).dtype  # torch knows no other order
    except TypeError:  # float128, complex256, ...
        raise SpaceError(f"torch has no tensors of dtype {np.dtype(dtype)}: declare the space with a dtype torch has "
                         f"(float64, say), or convert the observation with a feature_parser") from None


# ---------------------------------------------------------------- observations


@functools.singledispatch
def _obs_leaf(space: spaces.Space) -> tuple[np.dtype, tuple, np.ndarray, np.ndarray]:
    """(dtype, shape, low, high) of one observation leaf."""
    raise SpaceError(f"unsupported observation leaf {space!r}")


@_obs_leaf.register(spaces.Box)
def _(space: spaces.Box):
    return space.dtype, space.shape, space.low, space.high


def _last_values(space: spaces.Space, start: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``start + counts - 1`` of a Discrete/MultiDiscrete, in its dtype; SpaceError where that passes the dtype's
    end (gymnasium builds such a space, but its values past the end cannot exist)."""
    python_ints = [np.asarray(values).astype(object) for values in (start, counts)]  # shape kept, (0, 3) too
    last = python_ints[0] + python_ints[1] - 1  # nothing wraps around
    info = np.iinfo(space.dtype)
    beyond = [int(value) for value in np.ravel(last) if not info.min <= value <= info.max]
    if beyond:
        raise SpaceError(f"{space}: start + n - 1 = {beyond[0]} lies past the end of its dtype {space.dtype} "
                         f"({info.min} to {info.max}): use a wider dtype or a smaller start")
    return np.array(last, object).astype(space.dtype)


@_obs_leaf.register(spaces.Discrete)
def _(space: spaces.Discrete):
    start = np.asarray(space.start, space.dtype)
    return space.dtype, (), start, _last_values(space, start, space.n)


@_obs_leaf.register(spaces.MultiDiscrete)
def _(space: spaces.MultiDiscrete):
    start = np.broadcast_to(np.asarray(space.start, space.dtype), space.shape)
    return space.dtype, space.shape, start, _last_values(space, start, space.nvec)


@_obs_leaf.register(spaces.MultiBinary)
def _(space: spaces.MultiBinary):
    return space.dtype, space.shape, np.zeros(space.shape, space.dtype), np.ones(space.shape, space.dtype)


class _Bounds:
    """The declared range of one observation leaf, checked against values with any leading dims.

    A side the dtype already enforces (int8 from -128, a bool from False to True) is not checked, nor is an infinite
    one; a float with no side checked is still tested against itself, so NaN never passes.
    """

    def __init__(self, dtype: np.dtype, shape: tuple, low: np.ndarray, high: np.ndarray):
        self._args = dtype, shape, low, high  # to rebuild after pickling
        self.shape = shape
        low, high = (np.broadcast_to(np.asarray(bound), shape) for bound in (low, high))
        if dtype.kind == "b":  # a side is checked where it rules out a value: a low of True, a high of False
            needed_low, needed_high = bool(np.any(low)), not bool(np.all(high))
        elif dtype.kind == "f":
            needed_low = needed_high = True
        else:
            info = np.iinfo(dtype)
            needed_low, needed_high = bool(np.any(low != info.min)), bool(np.any(high != info.max))
        self.checked = needed_low or needed_high
        self.low = low if needed_low else None  # arrays for the vectorized check
        self.high = high if needed_high else None
        # Python numbers (inf for an unchecked side): exact against any value's .item() or .tolist()
        self.lows = low.ravel().tolist() if needed_low else [-np.inf] * low.size
        self.highs = high.ravel().tolist() if needed_high else [np.inf] * high.size
        uniform = len(set(self.lows)) <= 1 and len(set(self.highs)) <= 1
        self.lo, self.hi = (self.lows[0], self.highs[0]) if uniform and self.lows else (None, None)
        self.inside_row = self._row_checker(dtype.kind == "f", len(shape)) if low.size <= SMALL_LEAF else None

    def _row_checker(self, is_float: bool, ndim: int) -> Callable[[np.ndarray], bool]:
        """``inside_row(array)`` for one value of the leaf's shape: one generated chain of comparisons.

        Plain Python comparisons beat numpy's reductions on a few values by ~10x, and a generated
        expression beats a loop over them by ~4x. Bounds reach the code as names, never as text.
        """
        tests, namespace = [], {}
        for index, (low, high) in enumerate(zip(self.lows, self.highs)):
            value = f"v[{index}]"
            if low != -np.inf:
                namespace[f"l{index}"] = low
                value = f"l{index} <= {value}"
            if high != np.inf:
                namespace[f"h{index}"] = high
                value = f"{value} <= h{index}"
            if value != f"v[{index}]":
                tests.append(value)
            elif is_float:  # no finite bound: only NaN is outside
                tests.append(f"{value} == {value}")
        if not tests:
            return lambda array: True
        values = "array.tolist()" if ndim == 1 else "array.ravel().tolist()"
        exec(f"def inside_row(array):\n    v = {values}\n    return {' and '.join(tests)}\n", namespace)
        return namespace["inside_row"]

    def __reduce__(self):  # generated code does not pickle: rebuild it from the arguments
        return _Bounds, self._args

    def __repr__(self) -> str:
        return self.declared()

    def declared(self, at: int | None = None) -> str:
        """The declared range, with the sides the dtype enforces: of the element at flat index ``at``, or all."""
        _, shape, low, high = self._args
        low, high = (np.broadcast_to(np.asarray(bound), shape).ravel() for bound in (low, high))
        if at is not None:
            return f"[{low[at].item()}, {high[at].item()}]"
        low, high = low.tolist(), high.tolist()
        if len(set(low)) <= 1 and len(set(high)) <= 1 and low:
            return f"[{low[0]}, {high[0]}]"
        return f"[{_short(low)}, {_short(high)}]"

    def inside(self, array: np.ndarray) -> bool:
        """Whether every value of ``array`` (leaf shape, any leading dims) lies in the range."""
        if not self.checked or not array.size:
            return True
        if array.size <= SMALL_LEAF:  # a few values: plain Python beats numpy's reductions (NaN fails <=)
            if array.size == len(self.lows):  # one row
                return self.inside_row(array.reshape(self.shape))
            values = array.ravel().tolist()
            lows, highs = itertools.cycle(self.lows), itertools.cycle(self.highs)
            return all(map(operator.le, lows, values)) and all(map(operator.le, values, highs))
        if self.lo is not None:  # one range for the whole leaf: two reductions
            return self.lo <= array.min().item() and array.max().item() <= self.hi
        return bool((self.low is None or (array >= self.low).all())
                    and (self.high is None or (array <= self.high).all()))

    def outside(self, array: np.ndarray) -> np.ndarray:
        """Elementwise: which values of ``array`` lie outside the range (NaN included)."""
        if self.low is None and self.high is None:
            return np.zeros(array.shape, bool)
        inside = np.ones(array.shape, bool)
        if self.low is not None:
            inside &= array >= self.low
        if self.high is not None:
            inside &= array <= self.high
        return ~inside


class _Field(NamedTuple):
    name: str
    path: tuple
    dtype: np.dtype
    shape: tuple
    byte_offset: int
    bounds: _Bounds


class ObservationLayout:
    """How a (nested) observation space lies in one flat array.

    >>> layout = ObservationLayout(spaces.Dict({"pos": spaces.Box(-1, 1, (2,)), "hp": spaces.Discrete(5)}))
    >>> flat = layout.flatten({"pos": np.array([0.5, -0.5], np.float32), "hp": 3})
    >>> flat.dtype, flat.shape   # mixed dtypes: a byte buffer
    (dtype('uint8'), (16,))
    >>> layout.unflatten(flat)["hp"]
    array(3)
    """

    def __init__(self, space: spaces.Space):
        self.space = space
        # In native byte order: torch reads no other, and values convert exactly ('>f4' leaves flatten to '<f4').
        specs = [(path, np.dtype(dtype).newbyteorder("="), *rest)
                 for path, dtype, *rest in ((leaf.path, *_obs_leaf(leaf.space))
                                            for leaf in _require_leaves(leaves(space), space))]
        dtypes = {np.dtype(spec[1]) for spec in specs}
        if len(dtypes) == 1:
            self.dtype = dtypes.pop()
        else:
            self.dtype = np.dtype(np.uint8)
            # Largest itemsize first keeps every field aligned for typed views (also in torch).
            specs.sort(key=lambda spec: -np.dtype(spec[1]).itemsize)
        fields, offset = [], 0
        for index, (path, dtype, shape, low, high) in enumerate(specs):
            dtype = np.dtype(dtype)
            bounds = _Bounds(dtype, tuple(shape), low, high)
            fields.append(_Field(f"f{index}", path, dtype, tuple(shape), offset, bounds))
            offset += dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        align = max(field.dtype.itemsize for field in fields)
        itemsize = max(-(-offset // align) * align, self.dtype.itemsize)
        self.struct = np.dtype({
            "names": [field.name for field in fields],
            "formats": [(field.dtype, field.shape) for field in fields],
            "offsets": [field.byte_offset for field in fields],
            "itemsize": itemsize,
        })
        self.fields = fields
        self._by_path = {field.path: field for field in fields}
        self._canonical = [self._by_path[leaf.path] for leaf in leaves(space)]  # fields in leaves() order
        self._containers = containers(space)  # the leaves' walk misses extra entries: their counts catch them
        self._build = nester(space)
        self.size = itemsize // self.dtype.itemsize
        self.flat_space = self._make_flat_space({path: (low, high) for path, _, _, low, high in specs})

    def _make_flat_space(self, bounds: dict) -> spaces.Box:
        if self.dtype == np.uint8 and any(field.dtype != np.uint8 for field in self.fields):
            return spaces.Box(0, 255, (self.size,), np.uint8)
        low = np.zeros(self.size, self.dtype)  # zeros in padding (only a zero-size space has any)
        high = np.zeros(self.size, self.dtype)
        for field in self.fields:
            start = field.byte_offset // self.dtype.itemsize
            count = int(np.prod(field.shape, dtype=np.int64))
            leaf_low, leaf_high = bounds[field.path]
            low[start:start + count] = np.broadcast_to(leaf_low, field.shape).ravel()
            high[start:start + count] = np.broadcast_to(leaf_high, field.shape).ravel()
        return spaces.Box(low, high, (self.size,), self.dtype)

    def flatten(self, value: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Flatten one observation (or a batch: every leaf with the same leading dims) into ``out``."""
        pairs = list(_values(self.space, value))
        batch = self._batch_shape(pairs)
        if out is None:
            out = np.zeros(batch + (self.size,), self.dtype)
        elif not (isinstance(out, np.ndarray) and out.shape == batch + (self.size,) and out.dtype == self.dtype
                  and out.flags.c_contiguous and out.flags.writeable):
            read_only = " (read-only)" if isinstance(out, np.ndarray) and not out.flags.writeable else ""
            raise SpaceError(f"out must be a writable, C-contiguous numpy array of shape {batch + (self.size,)} and "
                             f"dtype {self.dtype}, got {_describe(out)}{read_only}")
        records = out.view(self.struct)[..., 0]
        for path, item in pairs:
            field = self._by_path[path]
            array = self._checked(field, item, batch)
            if not field.bounds.inside(array):
                raise self._outside(field, array, batch)
            records[field.name] = array
        _check_counts("observation", self._containers, [value])
        return out

    def writer(self, flat: np.ndarray):
        """A function ``write(row, value)`` that checks one observation and flattens it into ``flat[row]``.

        The typed views of ``flat`` are made once, so each write is one copy per leaf. Raises
        :class:`SpaceError` when a leaf has the wrong shape or dtype or lies outside its space.
        """
        records = flat.view(self.struct)[..., 0]
        targets = [(field, records[field.name]) for field in self._canonical]
        if len(targets) == 1 and not targets[0][0].path:
            (field, view), = targets
            inside = field.bounds.inside_row or field.bounds.inside
            rows = [view[row, ...] for row in range(len(view))]  # views (0-d too): writes skip indexing, 0.1 us

            def write_single(row: int, value: Any) -> None:
                if not (type(value) is np.ndarray and value.dtype == field.dtype and value.shape == field.shape):
                    value = self._checked(field, value, ())
                if not inside(value):
                    raise self._outside(field, value, ())
                rows[row][...] = value
            return write_single

        def write(row: int, value: Any) -> None:
            # Leaf paths are walked directly: the structure is known, only a bad value needs _values.
            try:
                items = [_get(value, field.path) for field, _ in targets]
            except (KeyError, IndexError, TypeError):
                list(_values(self.space, value))  # raises the SpaceError that names the missing entry
                raise
            for item, (field, view) in zip(items, targets):
                array = self._checked(field, item, ())
                if not field.bounds.inside(array):
                    raise self._outside(field, array, ())
                view[row] = array
            _check_counts("observation", self._containers, [value])
        return write

    def rows_writer(self, flat: np.ndarray):
        """A function ``write_rows(rows, values)``: check ``values[i]`` and flatten it into ``flat[rows[i]]``.

        One conversion, one range check and one copy per leaf for all rows, so many agents cost about
        as much as one. Raises :class:`SpaceError` when a value does not fit; write rows one by one to
        find which.
        """
        records = flat.view(self.struct)[..., 0]
        targets = []
        for field in self._canonical:  # each step: (prefix, its parent prefix, key) of the leaf's path
            steps = [(field.path[:depth + 1], field.path[:depth], field.path[depth])
                     for depth in range(len(field.path))]
            targets.append((field, records[field.name], steps))
        containers_ = self._containers

        def write_rows(rows, values: list) -> None:
            columns = {(): values}  # path prefix -> that entry of every value; leaves share their prefixes
            batch = (len(values),)
            for field, view, steps in targets:
                try:
                    for prefix, parent, key in steps:
                        if prefix not in columns:
                            columns[prefix] = list(map(operator.itemgetter(key), columns[parent]))
                except (KeyError, IndexError, TypeError) as error:
                    raise SpaceError(f"observation leaf {_path_str(field.path)}: {error!r}") from None
                array = self._checked(field, columns[field.path], batch)
                if not field.bounds.inside(array):
                    raise self._outside(field, array, batch)
                view[rows] = array
            for path, expected, kind in containers_:
                column = columns.get(path)
                if column is None:  # an empty Dict/Tuple: no leaf's walk passed it
                    try:
                        column = [_get(value, path) for value in values]
                    except (KeyError, IndexError, TypeError) as error:
                        raise SpaceError(f"observation {_path_str(path)}: {error!r}") from None
                _check_entries("observation", path, expected, kind, column)
        return write_rows

    @staticmethod
    def _checked(field: _Field, item: Any, batch: tuple) -> np.ndarray:
        """``item`` as an array of the leaf's dtype; SpaceError for a wrong shape or a dtype that does not fit."""
        array = as_array(item, "observation leaf", field.path)
        if array.shape != batch + field.shape:
            raise SpaceError(
                f"observation leaf {_path_str(field.path)}: expected shape {batch + field.shape}, got "
                f"{shape_of(item, array)}"
            )
        if array.dtype != field.dtype:
            problem = _cast_problem(array, field.dtype)
            if problem is not None:
                raise SpaceError(f"observation leaf {_path_str(field.path)}: expected dtype {field.dtype}, got "
                                 f"{array.dtype}{problem}")
            if field.dtype.kind == "f" and not np.can_cast(array.dtype, field.dtype, "safe"):
                return _narrowed(field, array)
            array = array.astype(field.dtype)
        return array

    @staticmethod
    def _outside(field: _Field, array: np.ndarray, batch: tuple) -> SpaceError:
        index = tuple(int(i) for i in np.argwhere(field.bounds.outside(array))[0])
        where, element = index[:len(batch)], index[len(batch):]
        value = np.asarray(array[where] if where else array)
        if value.size <= 8:
            return SpaceError(f"observation leaf {_path_str(field.path)}: {np.array2string(value)} "
                              f"lies outside its range {field.bounds}")
        at = int(np.ravel_multi_index(element, field.shape)) if element else 0
        return SpaceError(f"observation leaf {_path_str(field.path)}: element {list(element)} is {value[element]}, "
                          f"outside its range {field.bounds.declared(at)}")

    def _batch_shape(self, pairs: list[tuple[tuple, Any]]) -> tuple:
        path, item = pairs[0]
        ndim = len(self._by_path[path].shape)
        shape = as_array(item, "observation leaf", path).shape
        return tuple(shape[: len(shape) - ndim])

    def unflatten(self, flat):
        """The nested observation behind ``flat`` (numpy array or torch tensor, any leading dims).

        numpy: every leaf is a view of ``flat``, except where its last axis is not contiguous (a transposed
        array): numpy cannot view that, so the leaves view a contiguous copy and writes into them do not
        reach ``flat``. torch: every leaf is a view where torch allows it.
        """
        if not (isinstance(flat, np.ndarray) or _is_torch(flat)):
            raise SpaceError(f"flat observation must be a numpy array or a torch tensor, got {_describe(flat)}")
        if flat.shape[-1:] != (self.size,):
            raise SpaceError(f"flat observation: expected last dimension {self.size}, got shape {tuple(flat.shape)}")
        if _is_torch(flat):
            return self._build([self._torch_leaf(flat, field) for field in self._canonical])
        flat = np.asarray(flat)
        if flat.dtype != self.dtype:
            raise SpaceError(f"flat observation: expected dtype {self.dtype}, got {flat.dtype}")
        try:
            records = flat.view(self.struct)[..., 0]
        except ValueError:  # the last axis is not contiguous
            records = np.ascontiguousarray(flat).view(self.struct)[..., 0]
        return self._build([records[field.name] for field in self._canonical])

    def _torch_leaf(self, flat, field: _Field):
        import torch

        batch = tuple(flat.shape[:-1])
        count = int(np.prod(field.shape, dtype=np.int64))
        start = field.byte_offset // self.dtype.itemsize
        if flat.dtype != torch_dtype(self.dtype):
            raise SpaceError(f"flat observation: expected dtype {self.dtype}, got {flat.dtype}")
        if not count:  # a zero-size leaf: nothing to view
            return torch.zeros(batch + field.shape, dtype=torch_dtype(field.dtype), device=flat.device)
        if self.dtype == np.uint8 and field.dtype != np.uint8:
            piece = flat[..., start:start + count * field.dtype.itemsize]
            if not piece.is_contiguous() and piece.stride(-1) != 1:
                piece = piece.contiguous()
            try:
                typed = piece.view(torch_dtype(field.dtype))
            except RuntimeError:  # storage offset not aligned: one copy into fresh (aligned) memory
                typed = piece.clone(memory_format=torch.contiguous_format).view(torch_dtype(field.dtype))
            return typed.reshape(batch + field.shape)
        return flat[..., start:start + count].reshape(batch + field.shape)

    def out_of_bounds(self, flat: np.ndarray) -> tuple[tuple, tuple] | None:
        """The first (leaf path, batch index) of ``flat`` whose value lies outside its space, or None."""
        records = np.asarray(flat).view(self.struct)[..., 0]
        for field in self.fields:
            values = records[field.name]
            if not field.bounds.inside(values):
                index = np.argwhere(field.bounds.outside(values))[0]
                return field.path, tuple(int(i) for i in index[: values.ndim - len(field.shape)])
        return None


# ---------------------------------------------------------------- actions


class _ActionField(NamedTuple):
    path: tuple
    dtype: np.dtype
    shape: tuple
    start: int  # offset in the flat action
    size: int
    offset: Any  # added on unflatten: a discrete leaf's `start`; None for Box (keeps -0.0) and for start 0
    limits: Any = None  # an integer Box leaf's (low, high) where its float flat bounds round past them, else None
    largest: float | None = None  # a float Box leaf's largest finite value


@functools.singledispatch
def _action_leaf(space: spaces.Space):
    """(is_discrete, nvec or (low, high), value offset) of one action leaf."""
    raise SpaceError(f"unsupported action leaf {space!r}")


@_action_leaf.register(spaces.Discrete)
def _(space: spaces.Discrete):
    _last_values(space, space.start, space.n)
    return True, _flat_counts(space, space.n), np.asarray(space.start, space.dtype)


@_action_leaf.register(spaces.MultiDiscrete)
def _(space: spaces.MultiDiscrete):
    start = np.broadcast_to(np.asarray(space.start, space.dtype), space.shape)
    _last_values(space, start, space.nvec)
    return True, _flat_counts(space, space.nvec), start


def _flat_counts(space: spaces.Space, counts) -> np.ndarray:
    """A discrete leaf's choice counts as the flat MultiDiscrete's int64 ``nvec``; SpaceError past int64."""
    counts = np.asarray(counts).ravel()
    if counts.dtype.kind == "u" and counts.max(initial=0) > np.iinfo(np.int64).max:
        raise SpaceError(f"action space {space}: {counts.max()} choices, more than the flat MultiDiscrete's int64 "
                         f"counts hold (at most 2**63 - 1)")
    return counts.astype(np.int64)


@_action_leaf.register(spaces.MultiBinary)
def _(space: spaces.MultiBinary):
    return True, np.full(int(np.prod(space.shape)), 2, np.int64), np.zeros(space.shape, space.dtype)


@_action_leaf.register(spaces.Box)
def _(space: spaces.Box):
    return False, (space.low.ravel(), space.high.ravel()), None


@functools.lru_cache(maxsize=None)
def _unsigned(dtype: np.dtype) -> tuple[np.dtype, int]:
    """(the unsigned dtype of a signed integer one's size and byte order, the least a negative value reads as in it)."""
    return np.dtype(dtype.str.replace("i", "u")), 2 ** (8 * dtype.itemsize - 1)


class ActionLayout:
    """How a (nested) action space maps to one flat ``MultiDiscrete`` or ``Box``.

    >>> layout = ActionLayout(spaces.Dict({"move": spaces.Discrete(4, start=-1), "item": spaces.MultiBinary(2)}))
    >>> layout.flat_space
    MultiDiscrete([2 2 4])
    >>> int(layout.unflatten(np.array([1, 0, 3]))["move"])
    2
    """

    def __init__(self, space: spaces.Space):
        self.space = space
        described = [(leaf, *_action_leaf(leaf.space)) for leaf in _require_leaves(leaves(space), space)]
        kinds = {is_discrete for _, is_discrete, _, _ in described}
        if len(kinds) > 1:
            raise SpaceError(
                f"{space} mixes discrete and continuous leaves: a flat action, which shoal's vec envs "
                f"and trainer need, is all discrete (Discrete, MultiDiscrete, MultiBinary) or all Box: make every "
                f"leaf one kind (Discrete leaves for binned Box values, or Box leaves whose values the env rounds); "
                f"only a single env stepped with raw actions takes it as it is (emulate_flat_atn=False)"
            )
        self.is_discrete = kinds.pop()
        fields, start = [], 0
        for leaf, _, bounds, offset in described:
            size = len(bounds) if self.is_discrete else len(bounds[0])
            offset = offset if offset is not None and np.any(offset) else None  # adding 0 is a wasted copy
            fields.append(_ActionField(leaf.path, leaf.space.dtype, leaf.space.shape, start, size, offset,
                                       None if self.is_discrete else _rounded_past(leaf.space)))
            start += size
        self.fields = fields
        self.size = start
        if self.is_discrete:
            self.flat_space = spaces.MultiDiscrete(np.concatenate([b for _, _, b, _ in described]))
            nvec = self.flat_space.nvec
            # what invalid_rows compares unsigned actions with: one n for all dimensions where it can
            self._limit = int(nvec[0]) if len(nvec) and (nvec == nvec[0]).all() else nvec.astype(np.uint64)
            self._largest_n = int(nvec.max()) if len(nvec) else 0
        else:
            dtype = np.result_type(*[leaf.space.dtype for leaf, *_ in described]).newbyteorder("=")
            dtype = dtype if dtype.kind == "f" else np.dtype(np.float64)
            self.flat_space = spaces.Box(
                np.concatenate([b[0] for _, _, b, _ in described]).astype(dtype),
                np.concatenate([b[1] for _, _, b, _ in described]).astype(dtype),
                dtype=dtype,
            )
            # A finite action past a float leaf's range (a float16 leaf beside a float64 one, or sent as float32)
            # goes to the leaf's largest finite value, as a float to an integer leaf goes to the nearest
            # integer, not to inf.
            self.fields = [field._replace(largest=float(np.finfo(field.dtype).max)) if field.dtype.kind == "f" else field
                           for field in self.fields]
        self.dtype = self.flat_space.dtype
        # Float leaves narrower than the flat dtype (a float32 leaf beside a float64 one): their actions are
        # checked as the leaf will hold them.
        self._narrow = [(slice(field.start, field.start + field.size), field.dtype) for field in self.fields
                        if field.dtype.kind == "f" and field.dtype.itemsize < self.dtype.itemsize]
        # the action sent for an agent that must act but has no data yet (zeros, inside a Box's bounds)
        self.neutral = (np.zeros(self.size, self.dtype) if self.is_discrete
                        else np.clip(np.zeros(self.size), self.flat_space.low, self.flat_space.high).astype(self.dtype))
        self._build = nester(space)
        self._build_rows = RowsNester(space)
        self._containers = containers(space)

    def invalid_rows(self, flat: np.ndarray) -> np.ndarray | None:
        """Which rows of a flat ``(rows, size)`` action array lie outside ``flat_space``; None when none do.

        Raises :class:`SpaceError` for a dtype of the wrong kind (floats for discrete actions, ...).
        """
        space = self.flat_space
        if self.is_discrete:
            if flat.dtype.kind not in "iub":
                raise SpaceError(f"{space} takes integer actions, got dtype {flat.dtype}")
            if not flat.size:
                return None
            # The usual case in one pass: read as unsigned, a negative action lies past every n, unless an n
            # is larger than half the dtype's range.
            unsigned, negatives_from = _unsigned(flat.dtype) if flat.dtype.kind == "i" else (None, 0)
            if unsigned is None or self._largest_n <= negatives_from:
                values, limit = flat if unsigned is None else flat.view(unsigned), self._limit
                if values.max() < limit if type(limit) is int else (values < limit).all():
                    return None
            bad = (flat < 0) | (flat >= space.nvec)
        else:
            if flat.dtype.kind not in "iuf":
                raise SpaceError(f"{space} takes numeric actions, got dtype {flat.dtype}")
            # As they will arrive: a float64 0.7 is float32's 0.7, which lies a little below it (a finite value
            # past the dtype's range becomes inf here, as held() makes it the largest finite one: inside a range
            # that ends at inf, outside any other).
            with np.errstate(over="ignore"):
                values = flat if flat.dtype == self.dtype and not self._narrow else flat.astype(self.dtype)
                for columns, dtype in self._narrow:  # rounded once, from the values sent
                    values[..., columns] = flat[..., columns].astype(dtype)
            bad = ~((values >= space.low) & (values <= space.high))  # also catches NaN
            if not bad.any():
                return None
        return bad.any(axis=-1)

    def held(self, flat: np.ndarray) -> np.ndarray:
        """Flat actions (checked by :meth:`invalid_rows`) ready to be cast to the flat dtype: a finite float
        past its range (float64 sent for float16) held to its largest finite value, as unflatten holds a leaf."""
        if self.is_discrete or flat.dtype.kind != "f":
            return flat
        return _saturated(flat, float(np.finfo(self.dtype).max))

    def allowed(self) -> str:
        """The valid range of a flat action, for messages."""
        space = self.flat_space
        return f"0 <= a < {space.nvec}" if self.is_discrete else f"{space.low} <= a <= {space.high}"

    def flatten(self, value: Any) -> np.ndarray:
        """Flatten one action (or a batch: every leaf with the same leading dims)."""
        pairs = list(_values(self.space, value))
        parts = []
        for (path, item), field in zip(pairs, self.fields):
            array = as_array(item, "action leaf", path)
            batch = array.shape[: array.ndim - len(field.shape)]
            if array.shape[len(batch):] != field.shape:
                raise SpaceError(f"action leaf {_path_str(path)}: expected shape {field.shape}, got "
                                 f"{shape_of(item, array)}")
            kinds = "iufb" if field.dtype.kind == "f" else "b" if field.dtype.kind == "b" else "iub"  # as contains
            if array.dtype.kind not in kinds:
                expected = {"iufb": "numbers", "b": "bools", "iub": "integers"}[kinds]
                raise SpaceError(f"action leaf {_path_str(path)}: expected {expected} (its dtype is {field.dtype}), "
                                 f"got {array.dtype}")
            if not self.is_discrete and _rounds_in(field.dtype, self.dtype):
                _check_exact(array, field, self.dtype)
            shifted = (array if field.offset is None else array - field.offset).reshape(batch + (field.size,))
            if self.is_discrete:
                nvec = self.flat_space.nvec[field.start:field.start + field.size]
                if np.any((shifted < 0) | (shifted >= nvec)):
                    low = np.zeros(field.size, np.int64) if field.offset is None else field.offset.ravel()
                    raise SpaceError(f"action leaf {_path_str(path)}: expected values from {low} to "
                                     f"{low + nvec - 1}, got {_short(array.tolist())}")
            parts.append(shifted)
        _check_counts("action", self._containers, [value])
        if len({part.shape[:-1] for part in parts}) > 1:
            raise SpaceError(f"action leaves have different leading (batch) dimensions: "
                             f"{[part.shape[:-1] for part in parts]}")
        flat = np.concatenate(parts, axis=-1).astype(self.dtype, copy=False)
        if not self.is_discrete:  # discrete leaves were checked above; NaN and values outside a Box were not
            row = self._first_invalid_row(flat)
            if row is not None:
                raise SpaceError(f"action {row} lies outside the action space: expected {self.allowed()}")
        return flat

    def _first_invalid_row(self, flat: np.ndarray) -> np.ndarray | None:
        """The first row of ``flat`` (any leading dims) outside :attr:`flat_space`; None when all lie inside."""
        rows = flat.reshape(-1, self.size) if flat.size else None
        bad = None if rows is None else self.invalid_rows(rows)
        return None if bad is None else rows[np.flatnonzero(bad)[0]]

    def unflatten(self, flat):
        """The nested action behind ``flat`` (numpy array or torch tensor, any leading dims).

        A numpy array or a CPU tensor is checked against :attr:`flat_space` (SpaceError outside it, NaN
        included, or for floats where it is discrete, on any device). The values of a tensor on a GPU are
        **not** checked (that would wait for the GPU): a value outside the space, or NaN, comes back as
        some wrong action, so check it there if it may happen.
        """
        if self.is_discrete and _is_torch(flat) and flat.is_floating_point():  # the dtype needs no GPU sync
            dtype = str(flat.dtype).removeprefix("torch.")
            raise SpaceError(f"{self.flat_space} takes integer actions, got dtype {dtype}")
        values = flat if isinstance(flat, np.ndarray) else _cpu_values(flat) if _is_torch(flat) else None
        if values is not None and values.shape[-1:] == (self.size,):
            row = self._first_invalid_row(values)
            if row is not None:
                raise SpaceError(f"flat action {row} is out of range: expected {self.allowed()}")
        return self._build(self._leaf_values(flat))

    def unflatten_rows(self, flat: np.ndarray, rows) -> list:
        """``[unflatten(flat[row]) for row in rows]`` for a numpy ``(n, size)`` array, one pass per leaf.

        Every leaf value is a numpy scalar or an array of its own (not a view of ``flat``).
        """
        columns = [list(piece) if piece.ndim > 1 or self.is_discrete
                   else [piece[row, ...] for row in range(len(piece))]  # a Box of shape (): 0-d arrays, as it samples
                   for piece in self._leaf_values(flat[rows])]
        return self._build_rows(columns)

    def _leaf_values(self, flat) -> list:
        if not (isinstance(flat, np.ndarray) or _is_torch(flat)):
            raise SpaceError(f"flat action must be a numpy array or a torch tensor, got {_describe(flat)}")
        if tuple(flat.shape[-1:]) != (self.size,):
            raise SpaceError(f"flat action: expected last dimension {self.size}, got shape {tuple(flat.shape)}")
        batch = tuple(flat.shape[:-1])
        pieces = [(field, flat[..., field.start:field.start + field.size].reshape(batch + field.shape))
                  for field in self.fields]
        # A float action for an integer Box leaf goes to the nearest integer: a cast would truncate (0.9 -> 0).
        if _is_torch(flat):
            import torch

            # In int64 (torch adds no unsigned tensors); a uint64 start past int64 wraps there and back exactly.
            pieces = [(field, piece if field.offset is None else piece.to(torch.int64)
                       + torch.as_tensor(np.asarray(field.offset).astype(np.int64), device=flat.device))
                      for field, piece in pieces]
            return [(_nearest_integers(piece, field.dtype, field.limits)
                     if field.dtype.kind in "iu" and piece.is_floating_point()
                     else piece.round() if field.dtype.kind == "b" and piece.is_floating_point()
                     else _saturated(piece, field.largest) if field.largest is not None else piece)
                    .to(torch_dtype(field.dtype)) for field, piece in pieces]
        pieces = [(field, piece if field.offset is None else _shifted(piece, field)) for field, piece in pieces]
        values = [(_nearest_integers(piece, field.dtype, field.limits)
                   if field.dtype.kind in "iu" and piece.dtype.kind == "f"
                   else np.rint(piece) if field.dtype.kind == "b" and piece.dtype.kind == "f"
                   else _saturated(piece, field.largest) if field.largest is not None else piece)
                  .astype(field.dtype) for field, piece in pieces]
        # One discrete action is a numpy scalar, one Box action an array (0-d for shape ()), as the spaces sample them.
        return [value[()] for value in values] if self.is_discrete else values


def _rounded_past(space: spaces.Box) -> tuple[np.ndarray, np.ndarray] | None:
    """An integer Box's (low, high) if float64 rounds one of them outward (int64's 2**63 - 2 becomes 2**63,
    which would come back as 2**63 - 1, outside the leaf); None otherwise, as for every other Box."""
    if space.dtype.kind not in "iu":
        return None
    past = any(int(float(low)) < low or int(float(high)) > high
               for low, high in zip(space.low.ravel().tolist(), space.high.ravel().tolist()))
    return (space.low, space.high) if past else None


def _shifted(piece: np.ndarray, field: _ActionField) -> np.ndarray:
    """A discrete leaf's flat choices plus its start, exactly: numpy adds int64 and uint64 as float64, so an
    unsigned leaf adds in its own dtype (the choices and the sum fit it) and a signed one in int64."""
    return piece.astype(field.dtype if field.dtype.kind == "u" else np.int64, copy=False) + field.offset


def _rounds_in(integers: np.dtype, floats: np.dtype) -> bool:
    """Whether some values of an integer dtype round in a float dtype (int64 in float64: past 2**53)."""
    return integers.kind in "iu" and np.iinfo(integers).bits > np.finfo(floats).nmant + 1


def _check_exact(array: np.ndarray, field: _ActionField, flat: np.dtype) -> None:
    """SpaceError for an integer action value that would not come back from the float flat dtype as it went in
    (the ends of the leaf's range do: they come back held to it)."""
    exact = 2 ** (np.finfo(flat).nmant + 1)  # every integer up to this one is held exactly
    if not ((array > exact) | (array < -exact)).any():
        return
    back = _nearest_integers(array.astype(flat), field.dtype, field.limits)
    for went, came in zip(array.ravel().tolist(), back.ravel().tolist()):
        if went != came:
            raise SpaceError(f"action leaf {_path_str(field.path)}: {went} has no exact {flat} value, it would reach "
                             f"the env as {came} (the flat action holds integers exactly up to +-2**"
                             f"{np.finfo(flat).nmant + 1})")


def _saturated(values, largest: float):
    """Finite ``values`` held to [-largest, largest] (numpy array or torch tensor); infinities and NaN stay."""
    if _is_torch(values):
        import torch

        if not values.is_floating_point() or torch.finfo(values.dtype).max <= largest:  # nothing finite past it
            return values
        return values.clamp(-largest, largest).where(values.isfinite(), values)
    if values.dtype.kind != "f" or np.finfo(values.dtype).max <= largest:
        return values
    return np.where(np.isfinite(values), np.clip(values, -largest, largest), values)


def _nearest_integers(values, dtype: np.dtype, limits: tuple | None = None):
    """Floats rounded to the nearest integer, held to ``dtype``'s range (numpy array or torch tensor), and
    to a leaf's ``limits`` (low, high) where given (for a tensor, signed integers only: torch does not compare
    uint64).

    A plain cast wraps where a float lies at or past the range's end, and float64 cannot hold int64's
    largest value: 2**63 - 1 becomes 2**63, which an int64 cast turns into -2**63.
    """
    info = np.iinfo(dtype)
    if _is_torch(values):
        import torch

        rounded = values.round()
        integers = rounded.to(torch_dtype(dtype))
        integers = torch.where(rounded >= float(info.max), torch.tensor(info.max, dtype=integers.dtype), integers)
        integers = torch.where(rounded <= float(info.min), torch.tensor(info.min, dtype=integers.dtype), integers)
        if limits is not None and dtype.kind == "i":  # torch has no uint64 comparisons: those stay unclamped
            native = dtype.newbyteorder("=")  # torch reads no other byte order
            low, high = (torch.as_tensor(np.asarray(limit, native), device=integers.device) for limit in limits)
            integers = torch.minimum(torch.maximum(integers, low), high)
        return integers
    rounded = np.rint(values)
    with np.errstate(invalid="ignore"):  # the values cast past the end are replaced below
        integers = np.asarray(rounded.astype(dtype))
    integers[rounded >= float(info.max)] = info.max
    integers[rounded <= float(info.min)] = info.min
    return integers if limits is None else np.clip(integers, *limits, out=integers)  # out=: a 0-d array stays one
