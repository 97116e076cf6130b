"""Emulation: make any Gymnasium or PettingZoo env look like a flat, fixed-size, Atari-like env.

A :class:`Binding` describes how to build an env and how its spaces flatten. Its :meth:`Binding.make_env`
returns an :class:`EmulatedEnv` whose ``reset``/``step`` speak the data contract of ``docs/design.md``:
arrays over ``max_agents`` slots, agents in sorted order, ``masks`` for live slots, same-step autoreset.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import inspect
import io
import os
import re
import sys
import threading
from typing import Any, Callable, Iterator, NamedTuple

import gymnasium
import numpy as np
from gymnasium import spaces

from shoal.errors import APIUsageError, EnvError, SpaceError, check_int
from shoal.spaces import (ActionLayout, ObservationLayout, _check_counts, _path_str, _short, _values, as_array,
                          containers, holds_dict, index_leaves, leaves, shape_of)

SINGLE_AGENT_ID = 0
REWARD_LIMIT = float(np.finfo(np.float32).max)  # the rewards buffer is float32: larger rewards would become inf


class Buffers(NamedTuple):
    """The arrays of the data contract for ``n`` slots (one env's ``max_agents``, or many envs')."""

    obs: np.ndarray  # (n, obs_size), the flat observation dtype
    rewards: np.ndarray  # (n,) float32
    terminals: np.ndarray  # (n,) bool
    truncations: np.ndarray  # (n,) bool
    masks: np.ndarray  # (n,) bool

    @classmethod
    def allocate(cls, binding: "Binding", num_envs: int = 1) -> "Buffers":
        """Zeroed buffers for ``num_envs`` envs of ``binding`` (``num_envs * max_agents`` slots)."""
        return cls(*(np.zeros(shape, dtype) for shape, dtype in cls.specs(binding, num_envs)))

    @staticmethod
    def specs(binding: "Binding", num_envs: int = 1) -> list[tuple[tuple, np.dtype]]:
        """(shape, dtype) of each buffer, in field order."""
        if not isinstance(binding, Binding):
            raise APIUsageError(f"Buffers need a shoal.Binding, got {type(binding).__name__}")
        check_int("Buffers: num_envs", num_envs)
        n = num_envs * binding.max_agents
        flag = ((n,), np.dtype(bool))
        return [((n, binding.obs_layout.size), binding.obs_layout.dtype), ((n,), np.dtype(np.float32)),
                flag, flag, flag]


def _per_agent(values: dict, agents: list, default) -> list:
    """``[values.get(agent, default) for agent in agents]``, at C speed when every agent is there."""
    try:
        return list(map(values.__getitem__, agents))
    except KeyError:
        return [values.get(agent, default) for agent in agents]


def _is_reward(value) -> bool:
    """Whether ``value`` is one finite real number (a 0-d array counts) that the float32 rewards can hold."""
    if type(value) is int:  # past int64, numpy makes an object array of it
        return abs(value) <= REWARD_LIMIT
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        return False
    return array.shape == () and array.dtype.kind in "biuf" and bool(abs(array) <= REWARD_LIMIT)


def _non_dict_info(infos: dict) -> tuple[Any, Any] | None:
    """(agent, info) for the first agent whose info is neither None nor a dict; None when all are."""
    return next((item for item in infos.items() if item[1] is not None and not isinstance(item[1], dict)), None)


def _layout_or_none(space: spaces.Space) -> ActionLayout | None:
    """The ActionLayout of a raw action space, or None where no flat layout holds it (mixed discrete and Box
    leaves, Text ...)."""
    try:
        return ActionLayout(space)
    except SpaceError:
        return None


def _leaf_layouts(space: spaces.Space) -> list[tuple[tuple, ActionLayout]] | None:
    """A layout per leaf, by path, of a raw action space that mixes discrete and Box leaves (no one flat layout
    holds it), to check its actions leaf by leaf; None where a leaf has no layout either (Text ...)."""
    try:
        return [(leaf.path, ActionLayout(leaf.space)) for leaf in leaves(space)]
    except SpaceError:
        return None


def _agent_order(agent) -> tuple:
    """Natural order: "piston_2" before "piston_10"; numbers before names."""
    if isinstance(agent, (int, np.integer)):
        return ((0, int(agent), ""),)
    parts = re.split(r"(\d+)", str(agent))
    return tuple((0, int(part), "") if part.isdecimal() else (1, 0, part) for part in parts if part) or ((1, 0, ""),)


def _bounds_difference(a: spaces.Space, b: spaces.Space) -> str | None:
    """Where two spaces that gymnasium calls equal differ after all: gymnasium allows ``np.allclose``'s tolerance
    between Box bounds, one flat layout none. Text naming the first bound that differs, or None."""
    try:
        pairs = list(zip(leaves(a), leaves(b)))
    except SpaceError:  # a space shoal does not flatten (Text...): a feature_parser may make one it does
        return None
    for x, y in pairs:
        if isinstance(x.space, spaces.Box):
            for side in ("low", "high"):
                mine, theirs = getattr(x.space, side), getattr(y.space, side)
                differ = np.flatnonzero(mine != theirs)
                if differ.size:
                    at = np.unravel_index(differ[0], mine.shape)
                    leaf = f" of leaf {_path_str(x.path)}" if x.path else ""
                    return (f"the {side} bound{leaf} differs at element {list(map(int, at))}: {mine[at].item()!r} vs "
                            f"{theirs[at].item()!r}")
    return None


def _infer_space(value: Any) -> spaces.Space:
    """A space that holds ``value`` (the output of a feature parser)."""
    if isinstance(value, dict):
        return spaces.Dict({key: _infer_space(item) for key, item in value.items()})
    if isinstance(value, (tuple, list)):
        return spaces.Tuple([_infer_space(item) for item in value])
    array = as_array(value, "feature_parser output")  # a tensor too (bfloat16 as float64); SpaceError if no array
    if array.dtype.kind == "b":
        return spaces.Box(0, 1, array.shape, bool)
    if array.dtype.kind in "iu":
        info = np.iinfo(array.dtype)
        return spaces.Box(info.min, info.max, array.shape, array.dtype)
    if array.dtype.kind == "f":
        return spaces.Box(-np.inf, np.inf, array.shape, array.dtype)
    raise SpaceError(f"feature_parser returned {type(value).__name__} {_short(value)} ({array.dtype} data): expected "
                     f"numbers, bools, or dicts/tuples of them")


def _name_of(env) -> str | None:
    """The env's own name: its registered id, or its metadata name."""
    spec = getattr(env, "spec", None)
    if getattr(spec, "id", None):
        return spec.id
    metadata = getattr(env, "metadata", None)
    return metadata.get("name") if isinstance(metadata, dict) else None


_OLD_GYM = "shimmy's GymV21CompatibilityV0 / GymV26CompatibilityV0"


def _api_mismatch(where: str, call: str, result: Any, multiagent: bool) -> EnvError:
    """The error for an env whose reset/step returned something else than its API's tuple (``where``: env, step)."""
    size = f"a {len(result)}-tuple" if isinstance(result, tuple) else f"a {type(result).__name__}"
    if call == "reset" and not multiagent and isinstance(result, tuple) and len(result) == 2:
        size = f"({type(result[0]).__name__}, {type(result[1]).__name__}), whose info is no dict"
    if call == "reset":
        expected = "(observations, infos), two dicts keyed by agent" if multiagent else "(observation, info)"
    elif multiagent:
        expected = "(observations, rewards, terminations, truncations, infos), five dicts keyed by agent"
    else:
        expected = "(observation, reward, terminated, truncated, info)"
    api = "PettingZoo Parallel API" if multiagent else "Gymnasium API"
    old_gym = "" if multiagent else (": an old Gym env (step returns 4 values, reset only the observation) "
                                     f"works through {_OLD_GYM}")
    return EnvError(f"{where}: {call}() returned {size}: expected {expected}, the {api}{old_gym}")


def _takes_seed(env) -> bool:
    """Whether ``env.reset`` takes seed= alone and with options= (True where its signature cannot be read)."""
    try:
        signature = inspect.signature(env.reset)
    except (AttributeError, TypeError, ValueError):
        return True
    try:
        signature.bind(seed=0)
        signature.bind(seed=0, options=None)
    except TypeError:
        return False
    return True


def _layers(env) -> Iterator[Any]:
    """``env``, then each env it wraps (``.env``), then its ``unwrapped`` env."""
    seen, unwrapped = set(), getattr(env, "unwrapped", None)
    while env is not None and id(env) not in seen:
        seen.add(id(env))
        yield env
        env = getattr(env, "env", None)
    if unwrapped is not None and id(unwrapped) not in seen:
        yield unwrapped


_libc = None


def _flush_c_stdio() -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None)
    _libc.fflush(None)


def _flush(out, err) -> None:
    """Flush Python streams ``out`` and ``err`` (None where stdout is closed), the interpreter's own where they
    are others, and C's stdio buffers."""
    streams = (out, err) if sys.__stdout__ is out and sys.__stderr__ is err else (out, err, sys.__stdout__,
                                                                                   sys.__stderr__)
    for stream in streams:
        try:
            stream.flush()
        except Exception:  # None, a closed or broken stream: nothing to keep
            pass
    _flush_c_stdio()


def _dup(fd: int) -> int | None:
    """A copy of file descriptor ``fd`` above 2 (not in the place of a closed 1 or 2); None where ``fd`` is closed
    (a program started with ``>&-``)."""
    try:
        copy = os.dup(fd)
    except OSError:
        return None
    if copy > 2:
        return copy
    moved = fcntl.fcntl(copy, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(copy)
    return moved


def _restore(target: int, fd: int | None) -> None:
    """Put descriptor ``fd`` (a ``_dup``) back as ``target``; close ``target`` where it was closed (None)."""
    if fd is None:
        with contextlib.suppress(OSError):
            os.close(target)
    else:
        os.dup2(fd, target)
        os.close(fd)


class _Silence:
    """The silence of one process's stdout and stderr (file descriptors 1 and 2, ``sys.stdout`` and
    ``sys.stderr``). Shared by everything silenced meanwhile, the envs of several threads too: it begins with
    the first and ends with the last, so that none restores what another silenced."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: tuple = ()  # (file descriptors, streams) to restore, while silenced

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                try:
                    self._begin()
                except BaseException:  # a Ctrl-C in the middle, say: undo what was done
                    self._depth -= 1
                    self._end()
                    raise
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if not self._depth:
                    self._end()

    def _begin(self) -> None:
        _flush(sys.stdout, sys.stderr)
        self._saved = [_dup(1), _dup(2)], (sys.stdout, sys.stderr)
        devnull = os.open(os.devnull, os.O_WRONLY)  # descriptor 1 or 2 itself, where that one was closed
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        if devnull > 2:
            os.close(devnull)
        sys.stdout = sys.stderr = io.StringIO()

    def _end(self) -> None:
        if not self._saved:
            return
        (fds, streams), self._saved = self._saved, ()
        # Each part is restored also when a Ctrl-C (KeyboardInterrupt) cuts into one before it
        try:
            # What an env wrote through a stream it took before (sys.__stdout__, a module's own reference) is
            # flushed while the descriptors still lead nowhere
            _flush(*streams)
        finally:
            try:
                sys.stdout, sys.stderr = streams
            finally:
                try:
                    _restore(1, fds[0])
                finally:
                    _restore(2, fds[1])


_silenced = _Silence()
"""``with _silenced():`` silences Python- and C-level stdout and stderr; always restores both, also on exceptions."""


class Binding:
    """How to build an env and present it to RL code as a flat, fixed-size env.

    Args:
        env_cls / env_creator: exactly one: called as ``f(*env_args, **env_kwargs)`` to build an env,
            a ``gymnasium.Env`` (single agent) or a PettingZoo ``ParallelEnv``/``AECEnv`` (multi-agent).
        env_name: a name for messages and logs (default: the class or function name).
        feature_parser: ``f(obs) -> featurized obs``, applied to each agent's raw observation.
        feature_space: the space of the featurized observation; inferred from one parsed observation
            when omitted.
        reward_shaper: ``f(rewards, infos) -> rewards``, dicts keyed by agent id.
        emulate_flat_obs: False returns nested observations (views of the flat buffer) from reset/step.
        emulate_flat_atn: False makes step take raw actions (one, or a dict by agent id).
        emulate_const_num_agents: False returns dicts keyed by the agents present at this step.
        suppress_env_prints: silence the env's Python- and C-level stdout/stderr in reset/step.
        record_episode_statistics: put ``{"return", "length"}`` in ``infos[agent]["episode"]`` at its end.

    >>> binding = Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",))
    >>> binding.single_observation_space, binding.single_action_space, binding.max_agents  # doctest: +ELLIPSIS
    (Box(..., (4,), float32), MultiDiscrete([2]), 1)
    """

    def __init__(
        self,
        env_cls: Callable | None = None,
        env_creator: Callable | None = None,
        env_args: tuple = (),
        env_kwargs: dict | None = None,
        env_name: str | None = None,
        feature_parser: Callable[[Any], Any] | None = None,
        reward_shaper: Callable[[dict, dict], dict] | None = None,
        emulate_flat_obs: bool = True,
        emulate_flat_atn: bool = True,
        emulate_const_num_agents: bool = True,
        suppress_env_prints: bool = False,
        record_episode_statistics: bool = True,
        feature_space: spaces.Space | None = None,
    ):
        if (env_cls is None) == (env_creator is None):
            raise APIUsageError(
                f"Binding needs exactly one of env_cls or env_creator, got "
                f"{'both' if env_cls is not None else 'neither'}"
            )
        creator = env_cls if env_cls is not None else env_creator
        if not callable(creator):
            raise APIUsageError(f"Binding: env_cls/env_creator must be callable, got {type(creator).__name__} {creator!r}")
        for name, hook in (("feature_parser", feature_parser), ("reward_shaper", reward_shaper)):
            if hook is not None and not callable(hook):
                raise APIUsageError(f"Binding: {name} must be callable, got {type(hook).__name__}")
        if feature_space is not None and not isinstance(feature_space, spaces.Space):
            raise APIUsageError(f"Binding: feature_space must be a gymnasium space (the featurized observation's), "
                                f"got {type(feature_space).__name__} {_short(feature_space)}")
        if feature_space is not None and feature_parser is None:
            raise APIUsageError(f"Binding: feature_space {_short(feature_space)} needs a feature_parser: it is the "
                                f"space of the parser's output (the env's own observation_space is read from the env)")
        if not isinstance(env_args, (tuple, list)):
            raise APIUsageError(f"Binding: env_args must be a tuple, got {type(env_args).__name__}")
        if env_kwargs is not None and not isinstance(env_kwargs, dict):
            raise APIUsageError(f"Binding: env_kwargs must be a dict of keyword arguments, got "
                                f"{type(env_kwargs).__name__} {_short(env_kwargs)}")
        options = dict(emulate_flat_obs=emulate_flat_obs, emulate_flat_atn=emulate_flat_atn,
                       emulate_const_num_agents=emulate_const_num_agents, suppress_env_prints=suppress_env_prints,
                       record_episode_statistics=record_episode_statistics)
        for name, value in options.items():
            if not isinstance(value, (bool, np.bool_)):
                raise APIUsageError(f"Binding: {name} must be True or False, got {value!r}")
        self.env_creator = creator
        self.env_args = tuple(env_args)
        self.env_kwargs = dict(env_kwargs or {})
        named = creator
        while isinstance(named, functools.partial):  # partial(make_env, ...) is make_env's
            named = named.func
        self.env_name = env_name or getattr(named, "__name__", type(named).__name__)
        self.feature_parser = feature_parser
        self.reward_shaper = reward_shaper
        self.emulate_flat_obs = emulate_flat_obs
        self.emulate_flat_atn = emulate_flat_atn
        self.emulate_const_num_agents = emulate_const_num_agents
        self.suppress_env_prints = suppress_env_prints
        self.record_episode_statistics = record_episode_statistics

        with self.quiet():
            probe = self.env_creator(*self.env_args, **self.env_kwargs)
        if env_name is None:
            self.env_name = _name_of(probe) or self.env_name
        probe, self.is_multiagent = self._adapt(probe)
        try:
            self._read_spaces(probe, feature_space)
        except BaseException:
            with self.quiet(), contextlib.suppress(Exception):  # the error to tell is the one that came first
                probe.close()
            raise
        try:
            with self.quiet():
                probe.close()
        except Exception as error:
            raise EnvError(f"{self.env_name}: close() of the env built to read its spaces raised "
                           f"{type(error).__name__}: {error}") from error

    # -------------------------------------------------------------- construction

    def quiet(self):
        """A context that silences the env's output when ``suppress_env_prints`` is on."""
        return _silenced() if self.suppress_env_prints else contextlib.nullcontext()

    def create_raw_env(self):
        """A new env as the creator builds it (AEC envs converted to parallel), not emulated."""
        with self.quiet():
            env = self.env_creator(*self.env_args, **self.env_kwargs)
        return self._adapt(env)[0]

    def _adapt(self, env) -> tuple[Any, bool]:
        """(parallel or gymnasium env, is_multiagent) for what the creator returned."""
        from pettingzoo import AECEnv, ParallelEnv

        if isinstance(env, gymnasium.Env):
            return env, False
        if isinstance(env, AECEnv):
            from pettingzoo.utils.conversions import aec_to_parallel

            metadata = getattr(env, "metadata", None)  # AECEnv only annotates it: a subclass may have none
            if not (isinstance(metadata, dict) and metadata.get("is_parallelizable", False)):
                env.close()
                raise APIUsageError(
                    f"{self.env_name}: {type(env.unwrapped).__name__} is a PettingZoo AEC env whose metadata does not "
                    f"set is_parallelizable, so PettingZoo's aec_to_parallel cannot turn it into a ParallelEnv "
                    f"(turn-based games such as chess or tic-tac-toe): expected a ParallelEnv, or an AEC env whose "
                    f"agents all act once per cycle and that says so with metadata['is_parallelizable'] = True. A "
                    f"turn-based game works wrapped in pettingzoo.utils.conversions.turn_based_aec_to_parallel (every "
                    f"agent acts each step; only the one whose turn it is counts)")
            return aec_to_parallel(env), True
        if isinstance(env, ParallelEnv) or all(
                hasattr(env, name) for name in ("possible_agents", "observation_space", "action_space", "step")):
            return env, True
        old_gym = any(kind.__module__.partition(".")[0] == "gym" for kind in type(env).__mro__)
        raise APIUsageError(
            f"{self.env_name}: the creator returned {type(env).__module__}.{type(env).__name__}: "
            f"expected a gymnasium.Env or a PettingZoo ParallelEnv/AECEnv"
            + (f": an env of the old gym package works wrapped in {_OLD_GYM} (pip install shimmy)" if old_gym else "")
        )

    def _read_spaces(self, env, feature_space: spaces.Space | None) -> None:
        if self.is_multiagent:
            self.possible_agents = tuple(sorted(self._possible_agents(env), key=_agent_order))
            if not self.possible_agents:
                raise EnvError(f"{self.env_name}: possible_agents is empty: expected at least one agent")
            if len(set(self.possible_agents)) < len(self.possible_agents):
                twice = sorted({agent for agent in self.possible_agents if self.possible_agents.count(agent) > 1},
                               key=_agent_order)
                raise EnvError(f"{self.env_name}: possible_agents names {twice[0]!r} more than once: expected each "
                               f"agent once (an agent's slot is its place in the sorted possible_agents)")
            obs_space = self._common_space(env, "observation_space", parsed=self.feature_parser is not None)
            atn_space = self._common_space(env, "action_space")
        else:
            self.possible_agents = (SINGLE_AGENT_ID,)
            obs_space, atn_space = getattr(env, "observation_space", None), getattr(env, "action_space", None)
            if not (isinstance(obs_space, spaces.Space) and isinstance(atn_space, spaces.Space)):
                raise EnvError(f"{self.env_name}: observation_space and action_space must be gymnasium spaces, got "
                               f"{type(obs_space).__name__} and {type(atn_space).__name__}")
        self.max_agents = len(self.possible_agents)
        self.agent_slots = {agent: slot for slot, agent in enumerate(self.possible_agents)}
        self.env_observation_space = obs_space  # None where the agents' own differ and the feature_parser unites them
        if self.feature_parser is not None and feature_space is None:
            try:
                feature_space = _infer_space(self.feature_parser(self._first_observation(env)))
            except SpaceError as error:
                raise APIUsageError(f"{self.env_name}: {error} (the featurized observation space is inferred from "
                                    f"its output at reset(seed=0); pass feature_space= to give it)") from None
        self.raw_single_observation_space = feature_space if feature_space is not None else obs_space
        self.raw_single_action_space = atn_space
        try:
            self.obs_layout = ObservationLayout(self.raw_single_observation_space)
        except SpaceError as error:
            raise SpaceError(f"{self.env_name}: observation space: {error}") from None
        try:
            self.atn_layout = ActionLayout(atn_space) if self.emulate_flat_atn else None
        except SpaceError as error:
            raise SpaceError(f"{self.env_name}: action space: {error}") from None
        self.single_observation_space = (
            self.obs_layout.flat_space if self.emulate_flat_obs else self.raw_single_observation_space)
        self.single_action_space = self.atn_layout.flat_space if self.atn_layout else atn_space

    def _possible_agents(self, env) -> list:
        """The env's ``possible_agents``; EnvError unless it is a list of hashable agent ids."""
        agents = getattr(env, "possible_agents", None)
        if not isinstance(agents, (list, tuple)):
            raise EnvError(f"{self.env_name}: possible_agents must be a list of agent ids, set when the env is built "
                           f"(shoal reads it before the first reset), got {type(agents).__name__} {_short(agents)}")
        for agent in agents:
            try:
                hash(agent)
            except TypeError:
                raise EnvError(f"{self.env_name}: possible_agents holds {type(agent).__name__} {_short(agent)}: "
                               f"expected hashable agent ids (names or numbers)") from None
        return agents

    def _common_space(self, env, method: str, parsed: bool = False) -> spaces.Space | None:
        """The ``method`` space every agent has; SpaceError where two differ, unless ``parsed`` (a feature_parser
        makes every agent's observation one space): then None."""
        space_of = getattr(env, method, None)
        if not callable(space_of):
            raise EnvError(f"{self.env_name}: {method} must be a method {method}(agent) -> gymnasium space, the "
                           f"PettingZoo API, got {type(space_of).__name__} {_short(space_of)}")
        first = space_of(self.possible_agents[0])
        if not isinstance(first, spaces.Space):
            raise EnvError(f"{self.env_name}: {method}({self.possible_agents[0]!r}) must return a gymnasium space, "
                           f"got {type(first).__name__} {_short(first)}")
        for agent in self.possible_agents[1:]:
            other = space_of(agent)
            difference = _bounds_difference(first, other) if other == first else ""
            if difference is None:
                continue
            if parsed:
                return None
            what = (" (" + difference + ")") if difference else ""
            remedy = ("give the Binding a feature_parser (and its feature_space) that turns every agent's observation "
                      "into one space, e.g. by padding" if method == "observation_space" else
                      "wrap the env so that every agent has one action space (e.g. the largest, each agent ignoring "
                      "what it cannot use)")
            raise SpaceError(f"{self.env_name}: every agent needs the same {method} to share one flat layout: agent "
                             f"{self.possible_agents[0]!r} has {first}, agent {agent!r} has {other}{what}; {remedy}")
        return first

    def _first_observation(self, env) -> Any:
        with self.quiet():
            obs, _ = self._checked_reset(self._reset_env(env, 0))
        if not self.is_multiagent:
            return obs
        if not obs:
            raise EnvError(f"{self.env_name}: reset(seed=0) returned no observations, so the feature_parser's "
                           f"output space cannot be inferred: pass feature_space=")
        return next(iter(obs.values()))

    def _reset_env(self, env, seed: int | None, options: dict | None = None) -> Any:
        """``env.reset(seed=seed)`` (and ``options=`` when given); EnvError if the env's reset takes no seed= or
        options= (a TypeError raised inside the env's own code goes on unchanged)."""
        try:
            return env.reset(seed=seed) if options is None else env.reset(seed=seed, options=options)
        except TypeError as error:
            # The reset that cannot take them: the one called, or one a wrapper passes them on to.
            inner = next((layer for layer in _layers(env) if not _takes_seed(layer)), None)
            if not ("keyword argument" in str(error) or "required" in str(error)) or inner is None:
                raise
            if self.is_multiagent:
                api = "the PettingZoo Parallel API"
            else:
                api = ("the Gymnasium API (call super().reset(seed=seed) in it to seed np_random); a Gym env from "
                       "before 0.26 works through shimmy's GymV21CompatibilityV0 (gymnasium 1.x has no "
                       "compatibility wrapper of its own)")
            came = f"{type(inner).__name__}.reset{inspect.signature(inner.reset)}"
            raise EnvError(f"{self.env_name}: {came} cannot take seed= and options= ({error}): expected "
                           f"reset(self, *, seed=None, options=None), {api}") from None

    def _checked_reset(self, result: Any) -> tuple:
        """``(obs, infos)`` as an env's reset returned them; EnvError if it returned something else (an old
        Gym env returns only the observation; a multi-agent env's must be dicts keyed by agent)."""
        if not (isinstance(result, tuple) and len(result) == 2):
            raise _api_mismatch(self.env_name, "reset", result, self.is_multiagent)
        obs, infos = result
        if not self.is_multiagent and not (infos is None or isinstance(infos, dict)):  # an old Gym env's (a, b)
            raise _api_mismatch(self.env_name, "reset", result, False)
        if self.is_multiagent:
            for what, value in (("observations", obs), ("infos", infos)):
                if not isinstance(value, dict) and not (what == "infos" and value is None):
                    raise EnvError(f"{self.env_name}: reset() returned {what} of type {type(value).__name__}: expected "
                                   f"a dict keyed by agent, the PettingZoo Parallel API")
        return result

    def make_env(self, buffers: Buffers | None = None) -> "EmulatedEnv":
        """A new emulated env; it writes into ``buffers`` (``max_agents`` rows) when given, as vec envs do, and
        then keeps to the flat data contract whatever ``emulate_flat_obs`` and ``emulate_const_num_agents`` say."""
        return EmulatedEnv(self, buffers)

    # -------------------------------------------------------------- flatten / unflatten

    def flatten_observation(self, obs: Any) -> np.ndarray:
        """Nested observation (any leading dims) -> flat ``(..., obs_size)`` array."""
        return self.obs_layout.flatten(obs)

    def unflatten_observation(self, flat):
        """Flat observations (numpy or torch, any leading dims) -> nested structure of views."""
        return self.obs_layout.unflatten(flat)

    def flatten_action(self, action: Any) -> np.ndarray:
        """Nested action (any leading dims) -> flat ``(..., atn_size)`` array."""
        return self._action_layout().flatten(action)

    def unflatten_action(self, flat):
        """Flat actions (numpy or torch, any leading dims) -> nested actions."""
        return self._action_layout().unflatten(flat)

    def _action_layout(self) -> ActionLayout:
        if self.atn_layout is None:
            raise APIUsageError(f"{self.env_name}: actions are not flattened (emulate_flat_atn=False)")
        return self.atn_layout

    def __repr__(self) -> str:
        return (f"Binding({self.env_name!r}, max_agents={self.max_agents}, "
                f"obs={self.single_observation_space}, actions={self.single_action_space})")


class EmulatedEnv:
    """One env behind the data contract: ``(max_agents, ...)`` arrays, sorted slots, masks.

    ``reset``/``step`` return the env's buffers themselves (overwritten by the next call: copy what
    you keep). The wrapped env stays reachable as ``.env``.
    """

    def __init__(self, binding: Binding, buffers: Buffers | None = None):
        if not isinstance(binding, Binding):
            raise APIUsageError(f"EmulatedEnv needs a shoal.Binding, got {type(binding).__name__}: build one, e.g. "
                                f"shoal.Binding(env_creator=gymnasium.make, env_args=('CartPole-v1',)), then call "
                                f"its make_env()")
        if buffers is not None and not (isinstance(buffers, tuple) and len(buffers) == len(Buffers._fields)):
            raise APIUsageError(f"{binding.env_name}: buffers must be a shoal.emulation.Buffers, got "
                                f"{type(buffers).__name__}")
        self.binding = binding
        self.env = binding.create_raw_env()
        self.buffers = buffers if buffers is not None else Buffers.allocate(binding)
        self._check_buffers()
        self.obs, self.rewards, self.terminals, self.truncations, self.masks = self.buffers
        self._write_obs = binding.obs_layout.writer(self.obs)
        self._write_rows = binding.obs_layout.rows_writer(self.obs)
        self._plain_outputs = buffers is not None or binding.emulate_flat_obs and binding.emulate_const_num_agents
        self._nested_final = buffers is None and not binding.emulate_flat_obs  # final observations as obs come
        leaf = binding.raw_single_action_space
        self._lone_discrete = ((int(leaf.n), leaf.start.item()) if binding.emulate_flat_atn
                               and isinstance(leaf, spaces.Discrete) else None)
        self._ended: set = set()  # agents whose episode ended; their slots stay dark until they respawn
        self._gone: set = set()  # ended agents that have left env.agents: seen there again, they respawned
        # Slots whose agent the last reset or step showed live (mask True, not ending): with raw actions they
        # need the caller's action; an ending agent's mask is True too, and a new episode may list it dark.
        self._shown_live = np.zeros(binding.max_agents, bool)
        self._episode_return = np.zeros(binding.max_agents, np.float64)
        self._episode_length = np.zeros(binding.max_agents, np.int64)
        self._raw_layout = None if binding.emulate_flat_atn else _layout_or_none(binding.raw_single_action_space)
        self._raw_leaf_layouts = (None if binding.emulate_flat_atn or self._raw_layout is not None
                                  else _leaf_layouts(binding.raw_single_action_space))
        self._lone_episode = [0.0, 0]  # a single-agent env's return and length: Python numbers add faster
        self.tick = 0  # steps since creation, for messages
        self._needs_reset = True
        self._closed = False  # read only where _needs_reset already stops a call: closing sets both

    def _check_buffers(self) -> None:
        binding = self.binding
        for name, (shape, dtype), got in zip(Buffers._fields, Buffers.specs(binding), self.buffers):
            if not (isinstance(got, np.ndarray) and got.shape == shape and got.dtype == dtype
                    and got.flags.c_contiguous and got.flags.writeable):
                layout = "" if not isinstance(got, np.ndarray) else (
                    " (not C-contiguous)" if not got.flags.c_contiguous else
                    " (read-only)" if not got.flags.writeable else "")
                raise APIUsageError(
                    f"{binding.env_name}: buffers.{name} must be a writable C-contiguous array of shape {shape} and "
                    f"dtype {dtype}, got {getattr(got, 'shape', type(got).__name__)} {getattr(got, 'dtype', '')}"
                    f"{layout}")

    # -------------------------------------------------------------- env adapters

    def _quietly(self, method: Callable, *args, **kwargs):
        """``method(*args, **kwargs)``, silenced when the binding asks for it (no context to enter otherwise)."""
        if self.binding.suppress_env_prints:
            with _silenced():
                return method(*args, **kwargs)
        return method(*args, **kwargs)

    def _listed(self) -> list:
        """The env's ``agents``; EnvError unless it is a list (of agent ids)."""
        agents = self.env.agents
        if not isinstance(agents, (list, tuple)):
            raise EnvError(f"{self.binding.env_name}, step {self.tick}: env.agents must be a list of agent ids, got "
                           f"{type(agents).__name__} {_short(agents)}")
        return agents

    # -------------------------------------------------------------- the contract

    def reset(self, seed: int | None = None, options: dict | None = None):
        """Start an episode; ``options`` go to the env's own reset (automatic resets pass none). Returns
        ``(obs, infos)``."""
        if self._closed:
            raise self._closed_error("reset()")
        if seed is not None:  # as a Python int: envs take no numpy ints (gymnasium refuses them)
            seed = check_int(f"{self.binding.env_name}: seed", seed, minimum=0)
        if options is not None and not isinstance(options, dict):
            raise APIUsageError(f"{self.binding.env_name}: reset options must be a dict or None, got "
                                f"{type(options).__name__} {_short(options)}")
        self.rewards[:] = 0
        self.terminals[:] = False
        self.truncations[:] = False
        self._needs_reset = True  # until it succeeds: a failed reset leaves the episode half begun
        infos = self._begin_episode(seed, options)
        self._needs_reset = False
        return self._output(self.obs), infos

    def _autoreset(self) -> dict:
        """:meth:`_begin_episode` at the step that ends an episode. If it fails, the env needs ``reset()``: its
        episode state is half begun. The error gets a note saying it came from this reset."""
        try:
            return self._begin_episode(None)
        except BaseException as error:
            self._needs_reset = True
            error.add_note(f"raised in the automatic reset that starts the next episode, at step {self.tick}")
            raise

    def _begin_episode(self, seed: int | None, options: dict | None = None) -> dict:
        obs, infos = self.binding._checked_reset(self._quietly(self.binding._reset_env, self.env, seed, options))
        if not self.binding.is_multiagent:  # every slot is overwritten: nothing to clear
            self._lone_episode = [0.0, 0]
            self._write_single(obs)
            self.masks[0] = True
            if infos is not None and not isinstance(infos, dict):  # [] or 0 too: not a dict
                raise self._not_a_dict(SINGLE_AGENT_ID, infos)
            return {SINGLE_AGENT_ID: dict(infos)} if infos else {}
        infos = infos or {}
        if not infos.keys() <= self.binding.agent_slots.keys():
            raise self._unknown_agent(infos, "returned reset infos for")
        self._check_infos(infos)
        self._ended.clear()
        self._gone.clear()
        self._episode_return[:] = 0
        self._episode_length[:] = 0
        self.obs[:] = 0
        self.masks[:] = False
        self._write_agents(list(obs), list(obs.values()))
        listed = set(self._listed())
        if not listed.issuperset(obs):  # shown but not listed: it will not act, so its observation is no start
            unlisted = [self.binding.agent_slots[agent] for agent in obs if agent not in listed]
            self.obs[unlisted] = 0
            self.masks[unlisted] = False
        self._shown_live[:] = self.masks
        return {agent: dict(info) for agent, info in infos.items() if info}

    def _write_agents(self, agents: list, values: list) -> np.ndarray | list[int]:
        """Check each agent's observation, write it into its slot and mark the slot live. Returns the slots."""
        binding = self.binding
        if not agents:
            return np.empty(0, np.intp)
        if len(agents) == 1 and agents[0] in binding.agent_slots:  # a plain int indexes faster than an array
            slots = [binding.agent_slots[agents[0]]]
        else:
            slots = self._slots(agents, "returned")
        if binding.feature_parser is not None:
            values = [binding.feature_parser(value) for value in values]
        try:
            if len(agents) == 1:
                self._write_obs(slots[0], values[0])
            else:
                self._write_rows(slots, values)
        except SpaceError:
            # Agent by agent: finds the one whose value is wrong, or writes them all where only their mix
            # failed (an int64 and a uint64 value of one leaf make a float64 column together).
            for agent, slot, value in zip(agents, slots, values):
                try:
                    self._write_obs(slot, value)
                except SpaceError as error:
                    raise self._misfit([agent], error) from None
        self.masks[slots] = True
        return slots

    def _slots(self, agents: list, how: str) -> np.ndarray:
        """The agents' slots; EnvError naming an agent that is not in possible_agents."""
        try:
            return np.fromiter(map(self.binding.agent_slots.__getitem__, agents), np.intp, len(agents))
        except KeyError:
            raise self._unknown_agent(agents, how) from None

    def _unknown_agent(self, agents, how: str, who: str = "the env", error: type = EnvError,
                       step: int | None = None) -> Exception:
        """The error for the first of ``agents`` that is not in possible_agents (``who`` ``how``: what was done
        with it): EnvError for the env's doing, APIUsageError for the caller's or a hook's."""
        binding = self.binding
        unknown = next(agent for agent in agents if agent not in binding.agent_slots)
        return error(f"{binding.env_name}, step {self.tick if step is None else step}: {who} {how} agent {unknown!r}, "
                     f"which is not in possible_agents {_short(list(binding.possible_agents))}")

    def _write_single(self, obs) -> None:
        """``_write_agents`` for the one agent of a single-agent env."""
        if self.binding.feature_parser is not None:
            obs = self.binding.feature_parser(obs)
        try:
            self._write_obs(0, obs)
        except SpaceError as error:
            raise self._misfit([SINGLE_AGENT_ID], error) from None

    def _misfit(self, agents: list, error: SpaceError) -> Exception:
        """EnvError for an observation that does not fit its space; APIUsageError where the feature_parser made it."""
        binding = self.binding
        who = f"agent {agents[0]!r}" if len(agents) == 1 else f"agents {_short(agents)}"
        if binding.feature_parser is not None:
            return APIUsageError(f"{binding.env_name}, {who}, step {self.tick}: the feature_parser's output does not "
                                 f"fit the featurized observation space {binding.raw_single_observation_space} (given "
                                 f"as feature_space=, or inferred from its output at reset(seed=0)): {error}")
        return EnvError(f"{binding.env_name}, {who}, step {self.tick}: observation does not fit "
                        f"{binding.raw_single_observation_space}: {error}")

    def step(self, actions):
        """Act in every live slot. Returns ``(obs, rewards, terminals, truncations, infos)``.

        A step that fails once the env has stepped (the env, a hook or a check of what the env returned
        raised) leaves the episode half done: the next step needs ``reset()``.
        """
        if self._needs_reset:
            if self._closed:
                raise self._closed_error("step()")
            raise APIUsageError(f"{self.binding.env_name}: step() needs reset() first (it was not called yet, the "
                                f"automatic reset at the end of an episode failed, or a step failed once the env "
                                f"had stepped)")
        tick = self.tick
        try:
            return self._step_multi(actions) if self.binding.is_multiagent else self._step_single(actions)
        except BaseException:
            if self.tick != tick:
                self._needs_reset = True
            raise

    def _step_multi(self, actions):
        """``step`` for a multi-agent env."""
        binding = self.binding
        # Every listed agent gets an action (the Parallel API asks for one each), also an ended agent the env
        # still lists; only the live ones act in their episodes.
        addressed = list(self._listed())
        addressed_slots = self._slots(addressed, "lists in env.agents")
        live, live_slots = addressed, addressed_slots
        if self._ended and not self._ended.isdisjoint(addressed):
            live = [agent for agent in addressed if agent not in self._ended]
            live_slots = self._slots(live, "lists in env.agents")
        raw_actions = self._unflatten_actions(actions, addressed, addressed_slots)
        acting = np.zeros(binding.max_agents, bool)  # slots whose agent acts in its episode at this step
        acting[live_slots] = True
        self.tick += 1
        result = self._quietly(self.env.step, raw_actions)
        try:
            obs, env_rewards, terminals, truncations, infos = result
        except (TypeError, ValueError):
            raise _api_mismatch(f"{binding.env_name}, step {self.tick}", "step", result, True) from None
        if not (isinstance(obs, dict) and isinstance(env_rewards, dict) and isinstance(terminals, dict)
                and isinstance(truncations, dict) and isinstance(infos, (dict, type(None)))):
            kinds = ", ".join(type(value).__name__ for value in result)
            raise EnvError(f"{binding.env_name}, step {self.tick}: step() returned ({kinds}): expected five dicts "
                           f"keyed by agent (observations, rewards, terminations, truncations, infos), the PettingZoo "
                           f"Parallel API")
        infos = infos or {}
        known = binding.agent_slots.keys()
        if not (env_rewards.keys() <= known and terminals.keys() <= known and truncations.keys() <= known
                and infos.keys() <= known):
            for what, values in (("a reward", env_rewards), ("terminated", terminals), ("truncated", truncations),
                                 ("infos", infos)):
                if not values.keys() <= known:
                    raise self._unknown_agent(values, f"returned {what} for")
        self._check_infos(infos)  # before the shaper, which sees them: its edits are checked after it
        # The shaper gets a copy: episode statistics count the env's own rewards, even if it edits its input.
        rewards = env_rewards if binding.reward_shaper is None else self._shaped(dict(env_rewards), infos)

        was_live = self.masks.copy()
        self.masks[:] = False
        self.rewards[:] = 0
        self.terminals[:] = False
        self.truncations[:] = False
        listed = set(self._listed())
        if self._gone:  # ended agents that left env.agents and are listed again: new agent-episodes
            self._respawn(self._gone.intersection(listed))
        if self._ended:
            agents = [agent for agent in obs if agent not in self._ended]
            slots = self._write_agents(agents, [obs[agent] for agent in agents])
        else:
            agents = list(obs)
            slots = self._write_agents(agents, list(obs.values()))
        terminals, truncations = self._flag_dict(terminals, "terminated"), self._flag_dict(truncations, "truncated")
        flagged = any(terminals.values()) or any(truncations.values())
        left = ()  # agents that acted or were shown, and are not in env.agents without a flag: truncated now
        if not (listed.issuperset(live) and listed.issuperset(agents)):
            left = [agent for agent in dict.fromkeys(live + agents) if agent not in listed
                    and not terminals.get(agent) and not truncations.get(agent)]
        unseen = dark = ()
        if live and not all(map(obs.__contains__, live)):
            missing = [agent for agent in live if agent not in obs]
            unseen = [agent for agent in missing if terminals.get(agent) or truncations.get(agent) or agent in left]
            dark = [agent for agent in missing if agent not in unseen]
        if flagged:  # listed agents that neither acted nor were shown, flagged: they appear, or come back, ending
            late = [agent for flags in (terminals, truncations) for agent, flag in flags.items()
                    if flag and agent not in obs and agent in listed]
            if late:
                acting_before = set(live)
                unseen = [*unseen, *(agent for agent in dict.fromkeys(late)
                                     if agent not in acting_before and agent not in self._ended)]
        if unseen:  # they ended without a final observation: deliver their reward and flag anyway
            unseen_slots = [binding.agent_slots[agent] for agent in unseen]
            self.obs[unseen_slots] = 0
            self.masks[unseen_slots] = True
            agents, slots = agents + unseen, np.concatenate([np.asarray(slots, np.intp), unseen_slots])
        reward_values = self._rewards_of(env_rewards, agents)
        self.rewards[slots] = reward_values if rewards is env_rewards else self._rewards_of(rewards, agents, True)
        self.terminals[slots] = _per_agent(terminals, agents, False)
        self.truncations[slots] = _per_agent(truncations, agents, False)
        if left:
            self.truncations[[binding.agent_slots[agent] for agent in left]] = True
        acted = acting[slots]  # not an agent that just appeared, nor one seen again after its end
        self._episode_return[slots] += np.where(acted, reward_values, 0.0)
        self._episode_length[slots] += acted
        if dark:  # acting agents without an observation: their slots stay dark, their rewards still count
            dark_slots = [binding.agent_slots[agent] for agent in dark]
            self._episode_return[dark_slots] += self._rewards_of(env_rewards, dark)
            self._episode_length[dark_slots] += 1
        passed_over = env_rewards.keys() - set(agents).union(dark)  # their rewards must be numbers all the same
        if passed_over:
            self._rewards_of(env_rewards, [agent for agent in env_rewards if agent in passed_over])
        out_infos = {agent: info for agent, info in infos.items() if info}  # passthrough: every agent's, dark too
        if any("reset_info" in info for info in out_infos.values()):  # shoal's key, the sign of a reset: not the env's
            out_infos = {agent: {key: value for key, value in info.items() if key != "reset_info"}
                         for agent, info in out_infos.items() if info.keys() != {"reset_info"}}
        self.obs[was_live & ~self.masks] = 0

        ended = self._ended
        episode_over = not any(agent not in ended and not terminals.get(agent) and not truncations.get(agent)
                               for agent in listed)
        if episode_over:  # an agent the env dropped without a flag was cut off: it is truncated
            cut = self.masks & ~self.terminals & ~self.truncations
            self.truncations[cut] = True
        if episode_over or left or flagged:
            for slot in np.flatnonzero(self.masks & (self.terminals | self.truncations)):
                agent = binding.possible_agents[slot]
                self._ended.add(agent)
                episode = float(self._episode_return[slot]), int(self._episode_length[slot])
                final = self._final_info(slot, out_infos.get(agent), episode, agent not in unseen)
                if final:
                    out_infos[agent] = final
                else:  # no observation, statistics or other env info: not even the env's keys that were shoal's
                    out_infos.pop(agent, None)
        if self._ended:
            self._gone |= self._ended.difference(self._gone, listed)
        if episode_over:
            delivered = self.masks.copy()
            reset_infos = self._autoreset()
            for slot in np.flatnonzero(self.masks):  # the new episode's agents: their observations are its first
                agent = binding.possible_agents[slot]
                out_infos[agent] = {**out_infos.get(agent, {}), "reset_info": reset_infos.get(agent, {})}
            self.masks |= delivered
        else:
            self._shown_live[:] = self.masks & ~(self.terminals | self.truncations)
        return self._outputs(out_infos)

    def _shaped(self, rewards: dict, infos: dict) -> dict:
        """The reward shaper's rewards; APIUsageError unless it returned a dict."""
        shaped = self.binding.reward_shaper(rewards, infos)
        if not isinstance(shaped, dict):
            raise APIUsageError(
                f"{self.binding.env_name}, step {self.tick}: reward_shaper returned {type(shaped).__name__}: expected a "
                f"dict {{agent_id: reward}} (a single-agent env's one agent is {SINGLE_AGENT_ID!r})")
        if not shaped.keys() <= self.binding.agent_slots.keys():
            raise self._unknown_agent(shaped, "returned a reward for", "reward_shaper", APIUsageError)
        if not infos.keys() <= self.binding.agent_slots.keys():  # the env's were checked before: the shaper's
            raise self._unknown_agent(infos, "added infos for", "reward_shaper", APIUsageError)
        edited = _non_dict_info(infos)
        if edited is not None:
            agent, info = edited
            raise APIUsageError(f"{self.binding.env_name}, agent {agent!r}, step {self.tick}: reward_shaper made its "
                                f"info {type(info).__name__} {_short(info)}: expected a dict")
        return shaped

    def _respawn(self, agents: set) -> None:
        """Agents that ended, left ``env.agents`` and are listed there again (same id): each starts a new
        agent-episode in its slot, with fresh episode statistics, whether or not the env shows it yet."""
        for agent in agents:
            self._ended.discard(agent)
            self._gone.discard(agent)
            slot = self.binding.agent_slots[agent]
            self._episode_return[slot] = 0
            self._episode_length[slot] = 0

    def _step_single(self, actions):
        """``step`` for a single-agent env: the same contract, without the per-agent bookkeeping."""
        binding = self.binding
        action = None
        if self._lone_discrete is not None and type(actions) is np.ndarray:  # skip the general checks when valid
            array = actions
            if array.size == 1 and array.ndim in (1, 2) and array.dtype.kind in "iu":
                value = array.item()
                n, start = self._lone_discrete
                if 0 <= value < n:
                    action = value + start  # a Python int: every Discrete takes one, and envs compare it fastest
        if action is None:
            action = self._unflatten_actions(actions, [SINGLE_AGENT_ID], np.zeros(1, np.intp))[SINGLE_AGENT_ID]
        self.tick += 1
        if binding.suppress_env_prints:
            result = self._quietly(self.env.step, action)
        else:  # the common case, without the call through _quietly
            result = self.env.step(action)
        try:
            obs, env_reward, terminal, truncation, info = result
        except (TypeError, ValueError):
            raise _api_mismatch(f"{binding.env_name}, step {self.tick}", "step", result, False) from None
        if not ((type(env_reward) is float or type(env_reward) is int) and abs(env_reward) <= REWARD_LIMIT):
            env_reward = self._rewards_of({SINGLE_AGENT_ID: env_reward}, [SINGLE_AGENT_ID])[0]
        reward = env_reward
        if info is not None and not isinstance(info, dict):
            raise self._not_a_dict(SINGLE_AGENT_ID, info)
        if binding.reward_shaper is not None:
            shaper_infos = {SINGLE_AGENT_ID: info}
            reward = self._shaped({SINGLE_AGENT_ID: env_reward}, shaper_infos)
            reward = self._rewards_of(reward, [SINGLE_AGENT_ID], True)[0]
            info = shaper_infos.get(SINGLE_AGENT_ID)  # the shaper's edits show, as for a multi-agent env
        self._write_single(obs)
        if type(terminal) is not bool or type(truncation) is not bool:
            terminal, = self._flags([terminal], [SINGLE_AGENT_ID], "terminated")
            truncation, = self._flags([truncation], [SINGLE_AGENT_ID], "truncated")
        self.rewards[0] = reward
        self.terminals[0] = terminal
        self.truncations[0] = truncation
        episode = self._lone_episode
        episode[0] += env_reward
        episode[1] += 1
        infos = {SINGLE_AGENT_ID: info} if info else {}
        if terminal or truncation:
            final = infos[SINGLE_AGENT_ID] = self._final_info(0, info, (float(episode[0]), episode[1]))
            final["reset_info"] = self._autoreset().get(SINGLE_AGENT_ID, {})
        if self._plain_outputs:
            return self.obs, self.rewards, self.terminals, self.truncations, infos
        return self._outputs(infos)

    def _flag_dict(self, flags: dict, name: str) -> dict:
        """A multi-agent env's flags by agent as bools (checked by :meth:`_flags`)."""
        values = list(flags.values())
        checked = self._flags(values, list(flags), name)
        return flags if checked is values else dict(zip(flags, checked))

    def _flags(self, values: list, agents: list, name: str) -> list:
        """``values`` as bools; EnvError for one that is not a bool (numpy's, or an integer 0 or 1, pass too)."""
        if all(type(value) is bool for value in values):
            return values
        for agent, value in zip(agents, values):
            if not (isinstance(value, (bool, np.bool_)) or isinstance(value, (int, np.integer)) and value in (0, 1)):
                raise EnvError(f"{self.binding.env_name}, agent {agent!r}, step {self.tick}: {name} must be a bool, "
                               f"got {type(value).__name__} {_short(value)}")
        return [bool(value) for value in values]

    def _check_infos(self, infos: dict) -> None:
        """EnvError for the first agent whose info (if any) is not a dict."""
        bad = _non_dict_info(infos)
        if bad:
            raise self._not_a_dict(*bad)

    def _not_a_dict(self, agent, info) -> EnvError:
        return EnvError(f"{self.binding.env_name}, agent {agent!r}, step {self.tick}: info must be a dict, got "
                        f"{type(info).__name__} {_short(info)}")

    def _final_info(self, slot: int, info: dict | None, episode: tuple[float, int], observed: bool = True) -> dict:
        """An ending agent's infos: its own (copied), its final observation (if the env gave one) and its
        episode (return, length), if it acted at all."""
        final = dict(info) if info else {}
        if observed:
            row = self.obs[slot].copy()
            final["final_observation"] = self.binding.unflatten_observation(row) if self._nested_final else row
        else:  # the key is shoal's: the trainer must not bootstrap from an env value of that name
            final.pop("final_observation", None)
        if self.binding.record_episode_statistics:
            if episode[1]:
                final["episode"] = {"return": episode[0], "length": episode[1]}
            else:  # it appeared ending: no episode of its own to count
                final.pop("episode", None)
        return final

    def _rewards_of(self, rewards: dict, agents: list, shaped: bool = False) -> np.ndarray:
        """The agents' rewards as float64; EnvError (APIUsageError if ``shaped``: the reward_shaper's) for one
        that is not a finite number float32 can hold (None, text, NaN, inf, 1e300, an array)."""
        values = _per_agent(rewards, agents, 0.0)
        try:
            array = np.asarray(values)  # no dtype: numpy would turn None into NaN and "1" into 1.0
            if array.shape == (len(agents),) and array.dtype.kind in "biuf":
                array = array.astype(np.float64, copy=False)
                if not array.size or np.abs(array).max() <= REWARD_LIMIT:  # a NaN maximum fails the comparison too
                    return array
        except (TypeError, ValueError):
            pass
        wrong = next(((agent, value) for agent, value in zip(agents, values) if not _is_reward(value)), None)
        if wrong is None:  # each one a reward, but no one dtype holds them all (an int past int64 among them)
            return np.array([float(value) for value in values])
        agent, value = wrong
        where = f"{self.binding.env_name}, agent {agent!r}, step {self.tick}"
        expected = f"a finite number within float32's range (+-{REWARD_LIMIT:.4g})"
        if shaped:
            raise APIUsageError(f"{where}: reward_shaper returned {type(value).__name__} {_short(value)}: expected "
                                f"{expected}")
        raise EnvError(f"{where}: reward must be {expected}, got {type(value).__name__} {_short(value)}")

    def _unflatten_actions(self, actions, agents: list, slots: np.ndarray) -> dict:
        """The env's actions for ``agents`` (in ``slots``), by agent id."""
        binding = self.binding
        if not binding.emulate_flat_atn:
            return self._raw_actions(actions, agents)
        array = self._checked_actions(actions, slots)
        return dict(zip(agents, binding.atn_layout.unflatten_rows(array, slots)))

    def _raw_actions(self, actions, agents: list) -> dict:
        """``emulate_flat_atn=False``: the caller's own actions, each checked against the raw action space.

        An agent with mask True that has not ended needs one; an agent the env lists but has not shown
        (mask False) or that has ended gets the neutral action when the caller gives none, as with flat actions. A
        space with no neutral action (mixed leaves) leaves an ended agent out and asks for a dark one's.
        """
        binding = self.binding
        if not binding.is_multiagent:
            self._check_raw_action(SINGLE_AGENT_ID, actions)
            return {SINGLE_AGENT_ID: actions}
        if not isinstance(actions, dict):
            raise APIUsageError(f"{binding.env_name}: with emulate_flat_atn=False, step takes a dict "
                                f"of raw actions by agent id, got {type(actions).__name__}")
        where = f"{binding.env_name}, step {self.tick + 1}"
        if not actions.keys() <= binding.agent_slots.keys():
            raise self._unknown_agent(actions, "holds an action for", "step's actions", APIUsageError, self.tick + 1)
        chosen = {}
        for agent in agents:
            if agent in actions:
                self._check_raw_action(agent, actions[agent])
                chosen[agent] = actions[agent]
            elif self._shown_live[binding.agent_slots[agent]]:
                given = sorted(actions, key=_agent_order)
                raise APIUsageError(f"{where}: no action for agent {agent!r}: expected one for every agent with mask "
                                    f"True that has not ended, got actions for {_short(given)}")
            elif self._raw_layout is not None:  # a fresh one each time: the env may keep or edit what it gets
                chosen[agent] = self._raw_layout.unflatten(self._raw_layout.neutral)
            elif agent not in self._ended:  # an ended agent goes without where no neutral action exists
                raise APIUsageError(f"{where}: no action for agent {agent!r}, which the env lists in env.agents but "
                                    f"has not shown yet (mask False): shoal has no neutral action for "
                                    f"{binding.raw_single_action_space}, so pass one")
        return chosen

    def _check_raw_action(self, agent, action) -> None:
        """APIUsageError naming the agent unless ``action`` is one action of the raw action space."""
        layout, space = self._raw_layout, self.binding.raw_single_action_space
        try:
            if layout is not None:
                if layout.flatten(action).shape != (layout.size,):
                    raise SpaceError(f"expected one action, got a batch of {_short(action)}")
            elif self._raw_leaf_layouts is not None:  # mixed discrete and Box leaves: each as its own layout
                _check_counts("action", containers(space), [action])
                for (path, value), (_, leaf_layout) in zip(_values(space, action), self._raw_leaf_layouts):
                    try:
                        flat = leaf_layout.flatten(value)
                    except SpaceError as error:  # its message names the leaf's own (empty) path
                        raise SpaceError(f"action leaf {_path_str(path)}: "
                                         f"{str(error).removeprefix('action leaf (the whole space): ')}") from None
                    if flat.shape != (leaf_layout.size,):
                        raise SpaceError(f"action leaf {_path_str(path)}: expected one action, got a batch of "
                                         f"{_short(value)}")
            elif not space.contains(action):  # a space no layout holds (Text ...): gymnasium's own test
                raise SpaceError(f"got {type(action).__name__} {_short(action)}")
        except SpaceError as error:
            raise APIUsageError(f"{self.binding.env_name}, agent {agent!r}, step {self.tick + 1}: raw action does not "
                                f"fit the action space {space}: {error}") from None

    def _checked_actions(self, actions, slots: np.ndarray) -> np.ndarray:
        binding = self.binding
        layout = binding.atn_layout
        expected = (binding.max_agents, layout.size)
        where = f"{binding.env_name}, step {self.tick + 1}"
        try:
            array = as_array(actions, "actions")
        except SpaceError as error:
            raise APIUsageError(f"{where}: {error}") from None
        if binding.max_agents == 1 and array.shape == (layout.size,):
            array = array[None]
        if array.shape != expected:
            raise self._dict_actions_error(actions, array) or APIUsageError(
                f"{where}: actions must have shape {expected} (max_agents, action size), got {shape_of(actions, array)}")
        try:
            bad = layout.invalid_rows(array)
        except SpaceError as error:
            raise self._dict_actions_error(actions, array) or APIUsageError(f"{where}: {error}") from None
        if bad is None:
            return array
        shown = np.flatnonzero(bad & self.masks)  # the slots the last step returned with mask True: checked
        if len(shown):
            slot = shown[0]
            raise APIUsageError(f"{where}, agent {binding.possible_agents[slot]!r} (slot {slot}): action "
                                f"{array[slot]} is out of range: expected {layout.allowed()}")
        dark = slots[bad[slots]]  # listed agents not shown (dark, or ended): their rows go unchecked
        if len(dark):
            array = array.copy()
            array[dark] = layout.neutral
        return array

    def _dict_actions_error(self, actions, array: np.ndarray) -> APIUsageError | None:
        """For actions that are or hold a dict, which are refused anyway: say so."""
        if not holds_dict(actions, array):
            return None
        binding = self.binding
        raw = "a dict of raw actions by agent id" if binding.is_multiagent else "the raw action"
        came = f"a dict with keys {_short(list(actions))}" if isinstance(actions, dict) else "dicts"
        return APIUsageError(
            f"{binding.env_name}, step {self.tick + 1}: actions came as {came}: with emulate_flat_atn=True, step takes "
            f"one array of shape {(binding.max_agents, binding.atn_layout.size)} (max_agents, action size), the flat "
            f"action of the agent in slot i in row i (binding.flatten_action flattens one); to pass {raw}, build the "
            f"Binding with emulate_flat_atn=False")

    def _outputs(self, infos: dict) -> tuple:
        if self._plain_outputs:
            return self.obs, self.rewards, self.terminals, self.truncations, infos
        return (self._output(self.obs), self._output(self.rewards), self._output(self.terminals),
                self._output(self.truncations), infos)

    def _output(self, array: np.ndarray):
        """An output array in the form the emulate_* options ask for."""
        binding = self.binding
        if array is self.obs and not binding.emulate_flat_obs:
            array = binding.unflatten_observation(self.obs)
        if binding.emulate_const_num_agents:
            return array
        return {agent: index_leaves(array, binding.agent_slots[agent])
                for agent in binding.possible_agents if self.masks[binding.agent_slots[agent]]}

    def render(self):
        """The wrapped env's ``render()``."""
        if self._closed:
            raise self._closed_error("render()")
        try:
            return self.env.render()
        except gymnasium.error.Error as error:  # ale-py's: no render_mode was given
            if getattr(self.env, "render_mode", None) is not None:
                raise
            raise APIUsageError(f"{self.binding.env_name}: render() needs the env built with a render_mode ({error}): "
                                f"pass render_mode='rgb_array' in the binding's env_kwargs (make_binding(name, "
                                f"render_mode='rgb_array') for a built-in one)") from None

    def close(self) -> None:
        """Close the wrapped env; reset, step and render refuse from then on. Closing again does nothing."""
        if self._closed:
            return
        self._closed = self._needs_reset = True
        with self.binding.quiet():
            self.env.close()

    def _closed_error(self, call: str) -> APIUsageError:
        return APIUsageError(f"{self.binding.env_name}: {call} on a closed EmulatedEnv: make a new one with "
                             f"binding.make_env()")

