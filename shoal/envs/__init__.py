"""Built-in bindings, by name: ``make_binding("cartpole")``, ``"atari:Breakout"``, ``"gym:<gymnasium id>"``,
``"pettingzoo:<registry id>"``.

>>> from shoal.envs import make_binding
>>> make_binding("cartpole")  # doctest: +ELLIPSIS
Binding('CartPole-v1', max_agents=1, obs=Box(..., (4,), float32), actions=MultiDiscrete([2]))

:func:`preset` gives the PPO settings shoal recommends for a name (``shoal train`` starts from them).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

import gymnasium
from gymnasium.envs.registration import find_highest_version, get_env_id, parse_env_id

from shoal.emulation import Binding
from shoal.errors import APIUsageError, EnvError, install_hint


def cartpole(**env_kwargs: Any) -> Binding:
    """Gymnasium's ``CartPole-v1`` (500-step episodes; solved at a mean return of 475)."""
    return gym("CartPole-v1", **env_kwargs)


def _missing_module(error: Exception) -> str | None:
    """The module Python found missing behind ``error`` (an ImportError, its cause or its context), if any."""
    return next((found.name for found in (error, error.__cause__, error.__context__)
                 if isinstance(found, ImportError) and found.name), None)


def _missing(error: Exception) -> str:
    """An error's words, and for an ImportError the module Python found missing where they do not name it."""
    name, text = _missing_module(error), str(error)
    return text if name is None or repr(name) in text else f"{text}; missing module {name!r}"


def _require_name(kind: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise APIUsageError(f"{kind} needs a non-empty string, got {value!r}")


def atari_game(game: str, /, **env_kwargs: Any) -> Binding:
    """An ALE game with the standard preprocessing (see :mod:`shoal.envs.atari`)."""
    _require_name("atari_game(game)", game)
    from shoal.envs.atari import atari_games, make_atari_env

    games = atari_games()
    if game not in games:
        close = difflib.get_close_matches(game, games, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known games: {', '.join(games[:12])}, ..."
        raise APIUsageError(f"unknown Atari game {game!r}: expected an ALE game name such as Breakout or Pong; {hint}")
    signature = inspect.signature(make_atari_env)
    try:  # a wrong keyword now, not as a TypeError from inside the env's construction
        signature.bind(game, **env_kwargs)
    except TypeError as error:
        raise APIUsageError(f"atari:{game}: {error}: make_atari_env takes "
                            f"{', '.join(list(signature.parameters)[1:])}") from None
    # The game's own score is reported through info["episode"] by GameStatistics: the binding's
    # statistics would count clipped rewards over single lives.
    try:
        return Binding(env_creator=make_atari_env, env_args=(game,), env_kwargs=env_kwargs,
                       env_name=f"{game} (Atari)", record_episode_statistics=False)
    except (gymnasium.error.DependencyNotInstalled, ImportError) as error:  # opencv, for AtariPreprocessing
        raise APIUsageError(f"Atari envs need a package that is not installed: {_missing(error)}; the atari extra "
                            f"installs it: {install_hint('atari')}") from None


def _register_namespace(env_id: str) -> None:
    """Register ale-py's games where an id may need them: an ``ALE/...`` id (a namespace only ale-py's import
    adds), or any id not registered yet where ale-py is installed (it also registers the old ids, such as
    ``BreakoutNoFrameskip-v4``), the same in every process whatever it imported before."""
    if env_id.startswith("ALE/") or (env_id not in gymnasium.registry
                                     and importlib.util.find_spec("ale_py") is not None):
        from shoal.envs.atari import import_ale

        import_ale()


def _make_gym(env_id: str, /, **env_kwargs: Any):
    """``gymnasium.make`` after :func:`_register_namespace`, in the process that builds the env: worker
    processes and Ray actors start without the parent's registrations (``gymnasium.make`` imports the module of a
    ``module:id``)."""
    _register_namespace(env_id.rpartition(":")[2])
    try:
        return gymnasium.make(env_id, **env_kwargs)
    except gymnasium.error.NameNotFound as error:  # found where the Binding was made: not in this worker
        raise EnvError(f"Gymnasium env {env_id!r}: {error} (in process {os.getpid()}, though it was registered where "
                       f"the Binding was made): an id registered in your script, under if __name__ == '__main__' "
                       f"or by hand, is not registered in worker processes; register it in a module and name it "
                       f"gym:<module>:<id>, which every process imports") from None


def _unexpected_keyword(error: TypeError, env_kwargs: dict, env: str) -> APIUsageError | None:
    """The error naming the one of ``env_kwargs`` that ``error``, raised building ``env``, says it does not take;
    None where it names none of them (a TypeError of the env's own code)."""
    name = next((name for name in env_kwargs if f"unexpected keyword argument {name!r}" in str(error)), None)
    return None if name is None else APIUsageError(f"{env} takes no keyword argument {name!r}: {error}")


def gym(env_id: str, /, **env_kwargs: Any) -> Binding:
    """Any registered Gymnasium env id (``ALE/...`` ids get ale-py registered first); ``module:id`` imports the
    module first, in every process, as ``gymnasium.make`` does (your package that registers its envs)."""
    _require_name("gym(env_id)", env_id)
    module, _, registered = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as error:
            hint = ""
            here = os.getcwd()
            if (_missing_module(error) == module.partition(".")[0] and here not in map(os.path.abspath, sys.path)
                    and importlib.machinery.PathFinder.find_spec(module.partition(".")[0], [here]) is not None):
                hint = (f"; it is in the current directory, which the `shoal` command does not search: run "
                        f"`python -m shoal ...` there, or set PYTHONPATH=.")
            raise APIUsageError(f"Gymnasium env {env_id!r}: cannot import module {module!r}, which should register "
                                f"{registered!r}: {_missing(error)}{hint}") from None
    _register_namespace(registered)
    if registered not in gymnasium.registry:
        close = difflib.get_close_matches(registered, list(gymnasium.registry), n=3)
        hint = f": did you mean {', '.join(close)}?" if close else ""
        registers = f" (module {module!r} does not register it)" if module else ""
        raise APIUsageError(f"unknown Gymnasium env id {env_id!r}{registers}: expected a registered id such as "
                            f"CartPole-v1 or Acrobot-v1, or module:id for an env that a module of yours registers "
                            f"when imported{hint}")
    try:
        return Binding(env_creator=_make_gym, env_args=(env_id,), env_kwargs=env_kwargs, env_name=env_id)
    except TypeError as error:
        refused = _unexpected_keyword(error, env_kwargs, f"Gymnasium env {env_id!r}")
        if refused is None:
            raise
        raise refused from None
    except (gymnasium.error.DependencyNotInstalled, ImportError) as error:  # raised while building the env
        if _missing_module(error) is None and not isinstance(error, gymnasium.error.DependencyNotInstalled):
            # An ImportError that names no module: the id is a stub that never builds (MuJoCo v2/v3 ids)
            namespace, name, version = parse_env_id(env_id)
            newest = find_highest_version(namespace, name)
            other = f"; try {get_env_id(namespace, name, newest)}" if newest is not None and newest != version else ""
            raise APIUsageError(f"Gymnasium env {env_id!r} cannot be built: {str(error).rstrip('.')}{other}") from None
        text = _missing(error)
        hint = "" if "pip install" in text else ": install the package that provides it"
        raise APIUsageError(f"Gymnasium env {env_id!r} needs a package that is not installed: {text}{hint}") from None


def pettingzoo(env_id: str, /, **env_kwargs: Any) -> Binding:
    """A PettingZoo env by its registry id, ``<family>/<name>-v<N>`` such as ``butterfly/pistonball-v6``.

    PettingZoo's module spelling (``butterfly.pistonball_v6``) works too, and an id without its version
    means the newest. The env comes from ``pettingzoo.make``: its parallel API where it has one, else
    its AEC API.
    """
    _require_name("pettingzoo(env_id)", env_id)
    import pettingzoo as pz
    from pettingzoo.env_registry.exceptions import PettingZooRegistryError, VersionNotFound

    name = env_id if "/" in env_id else env_id.replace(".", "/", 1)
    for kind in ("parallel", "aec"):
        try:
            spec = pz.spec(kind, name)
            break
        except VersionNotFound as error:
            raise APIUsageError(f"PettingZoo env {env_id!r}: {error}") from None
        except PettingZooRegistryError:
            continue
    else:
        family = name.partition("/")[0]
        try:  # a family can refuse to import with its own explanation (MPE moved to the mpe2 package)
            importlib.import_module(f"pettingzoo.{family}")
        except ImportError as error:
            if not isinstance(error, ModuleNotFoundError):
                raise APIUsageError(f"PettingZoo env {env_id!r}: {error}") from None
        known = sorted(pz.aec_registry)
        close = difflib.get_close_matches(name.replace("_v", "-v"), known, n=3)
        families = sorted({spec_id.partition("/")[0] for spec_id in known})
        hint = (f"did you mean {', '.join(close)}?" if close else
                f"families: {', '.join(families)} (pettingzoo.pprint_registry() lists every id)")
        raise APIUsageError(f"unknown PettingZoo env {env_id!r}: expected a registry id such as "
                            f"butterfly/pistonball-v6; {hint}")
    try:
        if isinstance(spec.entry_point, str):  # a missing extra shows here, not deep inside Binding's probe
            importlib.import_module(spec.entry_point.partition(":")[0])
        return Binding(env_creator=pz.make, env_args=(kind, spec.id), env_kwargs=env_kwargs, env_name=spec.id)
    except TypeError as error:
        refused = _unexpected_keyword(error, env_kwargs, f"PettingZoo env {spec.id!r}")
        if refused is None:
            raise
        raise refused from None
    except ImportError as error:  # importing the env's module, or building it (Hanabi imports open_spiel then)
        raise APIUsageError(f"PettingZoo env {spec.id!r} cannot be imported: {_missing(error)} (its family needs an "
                            f"extra: pip install 'pettingzoo[{spec.namespace}]')") from None


NAMED: dict[str, Callable[..., Binding]] = {"cartpole": cartpole}
"""Bindings by exact name."""
# (atari_game, not atari: shoal.envs.atari is the module of the Atari wrappers)
PREFIXED: dict[str, Callable[..., Binding]] = {"atari": atari_game, "gym": gym, "pettingzoo": pettingzoo}
"""Bindings by ``prefix:argument``."""
EXAMPLES = {"atari": "atari:Breakout", "gym": "gym:Acrobot-v1", "pettingzoo": "pettingzoo:butterfly/pistonball-v6"}
"""One name per prefix, for messages."""

# PPO settings per env family, on top of PPOConfig's CleanRL defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # Tuned on a 2-core machine to reach a 20-episode mean return >= 475 in the fewest seconds. On the CPU
    # even where there is a GPU: a 64-wide MLP acting on 8 rows is launch-bound there (H100: 30 s, its CPU: 11 s).
    "cartpole": dict(num_envs=8, num_steps=32, learning_rate=1e-3, gamma=0.98, gae_lambda=0.8, update_epochs=20,
                     num_minibatches=1, ent_coef=0.0, total_timesteps=100_000, stop_at_return=475.0, device="cpu"),
    # CleanRL's ppo_atari.py.
    "atari": dict(num_envs=8, num_steps=128, learning_rate=2.5e-4, num_minibatches=4, update_epochs=4,
                  clip_coef=0.1, ent_coef=0.01, total_timesteps=10_000_000, checkpoint_interval=100),
}


def _split(name: str) -> tuple[str, str | None]:
    if not isinstance(name, str) or not name:
        raise APIUsageError(f"env name must be a non-empty string, got {name!r}")
    prefix, sep, rest = name.partition(":")
    return (prefix, rest) if sep else (name, None)


def _unknown(name: str) -> APIUsageError:
    names = sorted(NAMED) + [f"{prefix}:<...>" for prefix in PREFIXED]
    return APIUsageError(f"unknown env {name!r}: expected one of {', '.join(names)} "
                         f"(e.g. cartpole, {', '.join(EXAMPLES.values())})")


def make_binding(name: str, /, **env_kwargs: Any) -> Binding:
    """The :class:`~shoal.Binding` for a built-in env name; ``env_kwargs`` go to the env's constructor."""
    prefix, argument = _split(name)
    if argument is None and prefix in NAMED:
        return NAMED[prefix](**env_kwargs)
    if argument is not None and prefix in PREFIXED:
        if not argument:
            raise APIUsageError(f"env {name!r} names no {prefix} env: expected {prefix}:<name>, e.g. {EXAMPLES[prefix]}")
        return PREFIXED[prefix](argument, **env_kwargs)
    raise _unknown(name)


def check_env_name(name: str) -> None:
    """Raise the error :func:`make_binding` would for a malformed name or an unknown prefix or name, without
    building the env (an unknown id after a known prefix, ``gym:Nope-v0``, is found when the env is built)."""
    prefix, argument = _split(name)
    if not ((argument is None and prefix in NAMED) or (argument and prefix in PREFIXED)):
        if argument is not None and prefix in PREFIXED:
            make_binding(name)  # raises the precise message
        raise _unknown(name)


def preset(name: str) -> dict[str, Any]:
    """Recommended :class:`~shoal.ppo.PPOConfig` overrides for an env name (empty when none)."""
    prefix, argument = _split(name)
    return dict(PRESETS.get(prefix if argument is not None else name, {}))


__all__ = ["make_binding", "preset", "cartpole", "atari_game", "gym", "pettingzoo", "NAMED", "PREFIXED", "PRESETS", "check_env_name"]
