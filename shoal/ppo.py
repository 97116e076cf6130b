"""PPO, read top to bottom: :class:`PPOConfig` and one function, :func:`train`.

The shape follows CleanRL's single-file ``ppo.py`` (rollout, GAE, optimize, log), on a shoal vector env:

- the rollout speaks ``send``/``recv``, so with ``envs_per_batch < num_envs`` one half of the envs
  simulates while the policy acts for the other; the last actions of a rollout are sent *before*
  the update, so the envs simulate while the network learns;
- a transition ``(obs_t, action_t, reward_t)`` counts iff the mask that came with ``obs_t`` and the
  mask that came with ``reward_t`` are both True and ``obs_t`` is not an agent's final observation
  (``docs/design.md``): padded and dead agent slots never enter advantages, losses or statistics,
  and GAE never runs across them;
- truncated episodes bootstrap from the value of their final observation (``infos``);
- recurrent state resets at every agent's episode start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from shoal.checkpoint import (check_run_dir, list_checkpoints, load_checkpoint, lock_run_dir, rng_states,
                              save_checkpoint, set_rng_states)
from shoal.emulation import Binding
from shoal.errors import APIUsageError, TrainingError, check_int, is_int, is_number
from shoal.optim import Adam, clip_grad_norm
from shoal.policy import (LSTMPolicy, Policy, available_memory, check_policy, default_policy, other_leaves,
                          state_parts)
from shoal.spaces import _short, leaf_difference, leaf_signature

MAX_TORCH_THREADS = 1024  # beyond it OpenMP fails to start its threads, or crashes


@dataclass
class PPOConfig:
    """Everything a PPO run needs. The defaults are CleanRL's ppo.py; `shoal train` starts from the
    env's tuned preset instead (shoal.envs.PRESETS)."""

    # ---- experiment
    env: str = "cartpole"
    """env to train on: cartpole, atari:<Game>, gym:<gymnasium id>, pettingzoo:<registry id>"""
    seed: int = 1
    """seed of torch, numpy, random and the envs"""
    torch_deterministic: bool = True
    """make cuDNN deterministic"""
    device: str = "auto"
    """torch device: auto (cuda when available), cpu, cuda, cuda:1 ..."""
    torch_threads: int = 1
    """CPU threads torch may use (0: torch's default; at most 1024); 1 is fastest for small nets on few cores"""
    run_dir: str | None = None
    """where logs and checkpoints go (shoal train: runs/<env>__<seed>__<time>; None in Python: no files)"""
    dashboard: bool = True
    """show the live console dashboard"""
    tensorboard: bool = True
    """write TensorBoard scalars to run_dir"""
    wandb: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "shoal"
    """W&B project name"""

    # ---- vectorization
    backend: Literal["serial", "multiprocessing", "ray"] = "serial"
    """where envs run: serial (this process), multiprocessing, ray"""
    num_envs: int = 4
    """env copies stepped in parallel"""
    num_workers: int = 0
    """worker processes (multiprocessing / ray); 0: one per core, fitted to num_envs and envs_per_batch"""
    envs_per_batch: int = 0
    """envs per recv batch; 0: all envs (synchronous); num_envs/2: simulation overlaps inference"""
    env_timeout: float | None = 600.0
    """seconds a worker's start (building its envs), reset or step may take before the run stops with an error
    (multiprocessing, ray; None: no limit)"""

    # ---- algorithm
    total_timesteps: int = 500_000
    """agent steps to train for (valid transitions, over all agents), in whole rollouts: at least one"""
    learning_rate: float = 2.5e-4
    """Adam learning rate"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over total_timesteps"""
    num_steps: int = 128
    """rollout length: transitions per agent slot per update"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 4
    """passes over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """PPO surrogate clipping"""
    clip_vloss: bool = True
    """clip the value loss around the old values"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient norm clip"""
    target_kl: float | None = None
    """stop the update's epochs early once the approximate KL exceeds this"""

    # ---- policy
    policy: Literal["auto", "mlp", "cnn", "mixed"] = "auto"
    """network: auto picks from the observation space"""
    hidden_size: int = 0
    """width of the network (0: the policy's default: mlp 64, cnn 512, mixed 128)"""
    lstm: bool = False
    """put an LSTM between the encoder and the heads"""

    # ---- run control
    checkpoint_interval: int = 50
    """write a checkpoint every this many updates (and at the end); 0: only at the end"""
    keep_checkpoints: int = 3
    """checkpoints kept in run_dir/checkpoints (0: all)"""
    stop_at_return: float | None = None
    """stop early once the mean return of the last 20 episodes reaches this"""

    def validate(self) -> None:
        """Raise :class:`APIUsageError` naming the first bad field. Numpy numbers become Python numbers (the
        config goes to JSON and into checkpoints)."""
        for field_ in dataclasses.fields(self):
            if isinstance(getattr(self, field_.name), np.generic):
                setattr(self, field_.name, getattr(self, field_.name).item())
        for name in ("torch_deterministic", "dashboard", "tensorboard", "wandb", "anneal_lr", "norm_adv",
                     "clip_vloss", "lstm"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise APIUsageError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("env", "device", "wandb_project") + (("run_dir",) if self.run_dir is not None else ()):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise APIUsageError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.env_timeout is not None and (not (is_int(self.env_timeout) or isinstance(self.env_timeout, float))
                                             or not self.env_timeout > 0):
            raise APIUsageError(f"env_timeout must be a positive number of seconds or None, got {self.env_timeout!r}")

        positive = ["num_envs", "total_timesteps", "num_steps", "num_minibatches", "update_epochs"]
        for name in positive:
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise APIUsageError(f"{name} must be a positive integer, got {value!r}")
        for name in ["num_workers", "envs_per_batch", "hidden_size", "checkpoint_interval", "keep_checkpoints", "torch_threads"]:
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise APIUsageError(f"{name} must be an integer >= 0, got {value!r}")
        if self.torch_threads > MAX_TORCH_THREADS:
            raise APIUsageError(f"torch_threads must be at most {MAX_TORCH_THREADS} (this machine has "
                                f"{os.cpu_count()} cores; 0 leaves torch's default), got {self.torch_threads!r}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise APIUsageError(f"seed must be an integer from 0 to 2**32 - 1 (numpy's range), got {self.seed!r}")
        numbers = ["learning_rate", "gamma", "gae_lambda", "clip_coef", "ent_coef", "vf_coef", "max_grad_norm"]
        for name in numbers + [name for name in ("target_kl", "stop_at_return") if getattr(self, name) is not None]:
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value):
                raise APIUsageError(f"{name} must be a finite number, got {value!r}")
        for name in ["learning_rate", "clip_coef", "max_grad_norm"] + (["target_kl"] if self.target_kl is not None else []):
            if not getattr(self, name) > 0:
                raise APIUsageError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("ent_coef", "vf_coef"):
            if getattr(self, name) < 0:
                raise APIUsageError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.policy not in ("auto", "mlp", "cnn", "mixed"):
            raise APIUsageError(f"policy must be auto, mlp, cnn or mixed, got {self.policy!r}")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise APIUsageError(f"gamma and gae_lambda must lie in [0, 1], got {self.gamma!r} and {self.gae_lambda!r}")
        if self.backend not in ("serial", "multiprocessing", "ray"):
            raise APIUsageError(f"backend must be serial, multiprocessing or ray, got {self.backend!r}")
        if self.num_workers and self.num_envs % self.num_workers:
            raise APIUsageError(f"num_envs ({self.num_envs}) must divide evenly among num_workers ({self.num_workers})")
        if self.envs_per_batch and (self.envs_per_batch > self.num_envs or self.num_envs % self.envs_per_batch):
            raise APIUsageError(f"envs_per_batch ({self.envs_per_batch}) must divide num_envs ({self.num_envs})")
        if self.num_workers and self.envs_per_batch and self.envs_per_batch % (self.num_envs // self.num_workers):
            raise APIUsageError(f"envs_per_batch ({self.envs_per_batch}) must be a multiple of each worker's envs, "
                                f"num_envs / num_workers = {self.num_envs // self.num_workers}: a batch holds whole "
                                f"workers")


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    policy: Policy
    global_step: int
    updates: int
    wall_time: float
    """seconds spent in train(), setup included"""
    episodes: list[tuple[int, float, float, int]] = field(default_factory=list)
    """(global_step, seconds since start, return, length) of every finished episode"""
    history: list[dict[str, Any]] = field(default_factory=list)
    """the metrics of every update, as logged"""
    run_dir: str | None = None

    start_step: int = 0
    """the global step this call started from (0, or a resumed checkpoint's step)"""

    @property
    def steps_per_second(self) -> float:
        """Agent steps per second of this call, setup included."""
        return (self.global_step - self.start_step) / max(self.wall_time, 1e-9)

    def mean_return(self, last: int = 20) -> float:
        """Mean return of the last ``last`` episodes (NaN before any)."""
        last = check_int("TrainResult.mean_return: last", last)
        returns = [episode[2] for episode in self.episodes[-last:]]
        return float(np.mean(returns)) if returns else math.nan

    def first_reached(self, target: float, window: int = 20) -> tuple[int, float] | None:
        """(global_step, seconds) when the mean of ``window`` consecutive episode returns first reached ``target``."""
        window = check_int("TrainResult.first_reached: window", window)
        if not is_number(target) or math.isnan(target):
            raise APIUsageError(f"TrainResult.first_reached: target must be a number, got {target!r}")
        returns = deque(maxlen=window)
        for step, seconds, ret, _ in self.episodes:
            returns.append(ret)
            if len(returns) == window and np.mean(returns) >= target:
                return step, seconds
        return None


def make_vecenv(config: PPOConfig, binding):
    """The vector env the config asks for (``num_workers=0`` picks a worker layout)."""
    from shoal import vector

    batch = config.envs_per_batch or config.num_envs
    workers = config.num_workers
    if workers == 0:
        if config.backend == "serial":  # workers only group envs into batches here
            workers = config.num_envs // batch
        else:  # one per core, and a whole number of workers per batch
            from shoal.vector.base import default_num_workers

            cores = default_num_workers()
            workers = max(w for w in range(1, config.num_envs + 1)
                          if config.num_envs % w == 0 and batch % (config.num_envs // w) == 0
                          and (w <= cores or w == config.num_envs // batch))
    # serial cannot interrupt its envs; the others' default startup_timeout would leave a slow constructor no way out
    options = {} if config.backend == "serial" else {"timeout": config.env_timeout,
                                                     "startup_timeout": config.env_timeout}
    return vector.make(binding, backend=config.backend, num_workers=workers,
                       envs_per_worker=config.num_envs // workers, batch_size=batch, **options)


def _approx_kl(ratio: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """The estimate ``mean((r - 1) - log r)`` of KL(old || new) from the probability ratios r."""
    with torch.no_grad():
        return ((ratio - 1) - log_ratio).mean()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise APIUsageError(f"device {name!r} is not a torch device: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise APIUsageError(f"device {name!r} holds no data, so nothing can train or play there: expected auto, cpu, "
                            f"cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):  # mps, xpu ...: usable only where this torch build supports them
        try:
            torch.zeros(1, device=device)
        except Exception:  # RuntimeError, AssertionError, ModuleNotFoundError (hpu) ... depending on the device type
            raise APIUsageError(f"device {name!r} is not available in this torch build: expected auto, cpu, cuda or "
                                f"cuda:N") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise APIUsageError(f"device {name!r}: this torch sees {torch.cuda.device_count()} CUDA device(s)"
                            f"{'' if torch.backends.cuda.is_built() else ' (it is a CPU-only build)'}: use cpu or auto")
    return device


def _check_vecenv(vecenv, binding) -> None:
    """APIUsageError unless ``vecenv`` is a vec env of ``binding``'s spaces."""
    spaces_of = [getattr(vecenv, name, None) for name in ("single_observation_space", "single_action_space")]
    if None in spaces_of or not hasattr(vecenv, "num_agents"):
        raise APIUsageError(f"vecenv must be a shoal.vector vec env (shoal.vector.make), got {type(vecenv).__name__}")
    if spaces_of != [binding.obs_layout.flat_space, binding.single_action_space]:
        raise APIUsageError(f"vecenv steps {getattr(vecenv.binding, 'env_name', '?')}, whose flat spaces "
                            f"{spaces_of[0]}, {spaces_of[1]} are not {binding.env_name}'s: make it from this binding")
    agents = list(getattr(getattr(vecenv, "binding", None), "possible_agents", []))
    if agents != list(binding.possible_agents):
        raise APIUsageError(f"vecenv steps an env with agents {_short(agents)}, not {binding.env_name}'s "
                            f"{_short(list(binding.possible_agents))}: make it from this binding")
    mismatch = other_leaves(vecenv.binding, binding)
    if mismatch:
        raise APIUsageError(f"vecenv steps {mismatch}: make it from this binding")


def check_flat(binding) -> None:
    """APIUsageError unless ``binding`` emulates the flat data contract the trainer reads."""
    if not isinstance(binding, Binding):
        raise APIUsageError(f"expected a shoal.Binding, got {type(binding).__name__}: e.g. "
                            f"shoal.envs.make_binding('cartpole') or shoal.Binding(env_creator=...)")
    off = [name for name in ("emulate_flat_obs", "emulate_flat_atn", "emulate_const_num_agents")
           if not getattr(binding, name, True)]
    if off:
        raise APIUsageError(f"{binding.env_name}: the trainer reads the flat data contract: build the Binding with "
                            f"{', '.join(name + '=True' for name in off)} (the defaults). Those options only shape "
                            f"what one EmulatedEnv returns; policies unflatten observations themselves")


POLICY_FIELDS = ("policy", "hidden_size", "lstm")  # the config's settings of the default policy


def make_policy(config: PPOConfig, binding) -> Policy:
    """The default policy for ``binding`` with the config's policy settings."""
    return default_policy(binding, hidden_size=config.hidden_size or None, lstm=config.lstm, kind=config.policy)


def train(config: PPOConfig, binding, policy: Policy | None = None, logger=None, vecenv=None,
          resume_from: str | Path | dict | None = None) -> TrainResult:
    """Train ``policy`` (default: :func:`make_policy`) with PPO on ``binding``'s env.

    Args:
        config: hyper-parameters and run settings.
        binding: the env (see ``shoal.envs.make_binding``).
        policy: a :class:`~shoal.policy.Policy`; built from the binding's spaces when None. The config's
            ``policy``, ``hidden_size`` and ``lstm`` shape that default only: with a policy given, they must keep
            their defaults (else an APIUsageError), so that config.json does not describe another network.
        logger: a :class:`~shoal.logging.Logger` (closed at the end); built from the config when None.
        vecenv: an already made vector env (it is not closed here); made from the config when None. Its
            layout (``num_envs``, ``envs_per_batch``, ``num_workers``, ``backend``, where it gives them) replaces
            the config's, so that config.json, the seeds and the logs describe the run that happens; with a
            ``run_dir``, a layout a PPOConfig cannot describe (batches that do not divide the envs) is refused.
        resume_from: a checkpoint file or run directory to continue from (model, optimizer, global step,
            update count, episode count, wall time and RNG states), or the checkpoint ``load_checkpoint`` loaded.
            Its step must be below ``config.total_timesteps``.

    With a ``run_dir``, the run holds that directory's lock until it returns (another run into it is an
    APIUsageError), and the directory must hold no checkpoints unless they are the resumed run's own past. On
    Ctrl-C (``KeyboardInterrupt``), or a ``BrokenPipeError`` (the logger's stdout closed), a final checkpoint is
    written there before the exception goes on, so ``resume_from=run_dir`` continues the run.

    >>> from shoal.envs import make_binding
    >>> result = train(PPOConfig(total_timesteps=2048, dashboard=False), make_binding("cartpole"))  # doctest: +SKIP
    """
    if logger is not None and not all(callable(getattr(logger, name, None)) for name in ("log", "message", "close")):
        raise APIUsageError(f"logger must be a shoal.logging.Logger (log, message and close), got "
                            f"{type(logger).__name__}")
    try:
        return _checked_train(config, binding, policy, logger, vecenv, resume_from)
    finally:  # train owns the logger it was given: closed at the end, also when the run is refused or fails
        if logger is not None:
            logger.close()


def _checked_train(config: PPOConfig, binding, policy: Policy | None, logger, vecenv, resume_from) -> TrainResult:
    """:func:`train` once its logger is checked: the other arguments, then the run."""
    if not isinstance(config, PPOConfig):
        raise APIUsageError(f"train needs a PPOConfig, got {type(config).__name__}: PPOConfig(**settings)")
    config.validate()
    if policy is not None:
        defaults = PPOConfig()
        changed = [f"{name}={getattr(config, name)!r}" for name in POLICY_FIELDS
                   if getattr(config, name) != getattr(defaults, name)]
        if changed:
            raise APIUsageError(f"the config sets {', '.join(changed)}, which only shape the default policy, but train "
                                f"got policy={_describe_policy(policy)}: leave them at their defaults ("
                                f"{', '.join(f'{name}={getattr(defaults, name)!r}' for name in POLICY_FIELDS)}) or "
                                f"drop policy=")
    check_flat(binding)
    if vecenv is not None:
        _check_vecenv(vecenv, binding)
        layout = {}  # what the vec env says of itself (a wrapper may not say everything)
        envs, batch, workers = (getattr(vecenv, name, None) for name in ("num_envs", "batch_size", "num_workers"))
        if is_int(envs):
            layout["num_envs"] = envs
            if is_int(batch):
                layout["envs_per_batch"] = 0 if batch == envs else batch
        if is_int(workers):
            layout["num_workers"] = workers
        if getattr(vecenv, "backend", None) in ("serial", "multiprocessing", "ray"):
            layout["backend"] = vecenv.backend
        adopted = dataclasses.replace(config, **layout)
        try:
            adopted.validate()
            config = adopted
        except APIUsageError as error:
            if config.run_dir is not None:  # config.json and checkpoints would hold a config no run can resume with
                raise APIUsageError(f"vecenv: its layout ({adopted.num_envs} envs, batches of "
                                    f"{adopted.envs_per_batch or adopted.num_envs}) is not one a PPOConfig can "
                                    f"describe, so a run_dir's run could not be resumed: {error}") from None
    _check_storage_fits(config, binding, vecenv)
    if resume_from is not None and not isinstance(resume_from, (str, os.PathLike, dict)):
        raise APIUsageError(f"resume_from must be a checkpoint file or run directory path, or a checkpoint dict "
                            f"(load_checkpoint), got {resume_from!r}")
    checkpoint = None
    if resume_from is not None:  # loaded on the CPU: RNG states must stay CPU tensors
        checkpoint = resume_from if isinstance(resume_from, dict) else load_checkpoint(resume_from)
        check_compatible(checkpoint, binding, config)
        if policy is None:
            check_default_policy(checkpoint)
        if checkpoint["global_step"] >= config.total_timesteps:
            raise APIUsageError(f"{checkpoint.get('path', 'the checkpoint')}: the run is already at step "
                                f"{checkpoint['global_step']:,} of total_timesteps {config.total_timesteps:,}: pass a "
                                f"larger total_timesteps (shoal train --total-timesteps) to go on")
        start_step = getattr(logger, "start_step", checkpoint["global_step"])
        if getattr(logger, "run_dir", None) is not None and start_step != checkpoint["global_step"]:
            # its CSV would lose the rows up to the checkpoint, or keep later ones
            raise APIUsageError(f"the logger starts at step {start_step:,}, but the run resumes from step "
                                f"{checkpoint['global_step']:,}: make it with start_step={checkpoint['global_step']}")
    # Two runs writing into one directory would corrupt each other's files: the run's directory is locked,
    # and so is a given logger's where that is another
    directories = {Path(d).resolve(): d for d in (config.run_dir, getattr(logger, "run_dir", None)) if d is not None}
    with contextlib.ExitStack() as locks:
        for directory in directories.values():
            locks.enter_context(lock_run_dir(directory))
        return _train(config, binding, policy, logger, vecenv, checkpoint)


def _train(config: PPOConfig, binding, policy: Policy | None, logger, vecenv, checkpoint: dict | None) -> TrainResult:
    """:func:`train` once its arguments are checked and its run directory is locked."""
    started = time.perf_counter()
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    torch.backends.cudnn.deterministic = config.torch_deterministic
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = resolve_device(config.device)
    policy_given = policy is not None  # else the config's settings rebuild it (shoal eval, --resume)
    policy = policy if policy_given else make_policy(config, binding)
    check_policy(policy, binding)
    try:
        policy = policy.to(device)
    except torch.OutOfMemoryError:
        size = sum(parameter.numel() * parameter.element_size() for parameter in policy.parameters())
        raise APIUsageError(f"the {_describe_policy(policy)} network, {size / 2**30:.1f} GiB of parameters, does not "
                            f"fit in the memory of {device}: choose a smaller network (hidden_size) or another "
                            f"device") from None
    if not any(parameter.requires_grad for parameter in policy.parameters()):
        raise APIUsageError(f"{_describe_policy(policy)} has no parameter that requires grad: PPO would have nothing "
                            f"to train (unfreeze some: parameter.requires_grad_(True))")
    optimizer = Adam(policy.parameters(), config.learning_rate)
    parameters = list(policy.parameters())
    # A batch norm cannot train on one row: an update that holds a single transition is skipped for it.
    batch_norm = any(isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                                         torch.nn.SyncBatchNorm)) for module in policy.modules())
    said_one_row = False
    global_step = update = earlier_episodes = 0
    earlier_wall_time = 0.0  # earlier_*: the resumed run's episodes and seconds before this call
    if checkpoint is not None:
        load_policy_state(policy, checkpoint)
        optimizer.load_state_dict(checkpoint["optimizer"])
        global_step, update = checkpoint["global_step"], checkpoint["update"]
        earlier_episodes = checkpoint.get("episodes", 0)  # 0 from a checkpoint written before these keys existed
        earlier_wall_time = checkpoint.get("wall_time", 0.0)
        set_rng_states(checkpoint["rng"])
    if config.run_dir is not None:
        check_run_dir(config.run_dir, checkpoint)
    recent_returns: deque = deque(checkpoint.get("recent_returns", []) if checkpoint else [], maxlen=20)

    space_signature, env_kwargs = _space_signature(binding), _env_kwargs(binding)  # the same in every checkpoint

    def save(at_update: int, at_step: int, at_episodes: int, at_wall_time: float, at_returns: list) -> None:
        if not all(bool(torch.isfinite(parameter).all()) for parameter in parameters):  # the last step broke them
            raise TrainingError(f"update {at_update} (step {at_step:,}): the policy's parameters are not finite: "
                                f"{_NOT_FINITE}{_kept_checkpoint(config.run_dir)}")
        save_checkpoint(config.run_dir, at_update, {
            "model": policy.state_dict(), "optimizer": optimizer.state_dict(), "policy": _describe_policy(policy),
            "policy_given": policy_given, "recent_returns": at_returns,
            "config": dataclasses.asdict(config), "env": config.env, "env_name": binding.env_name,
            "env_kwargs": env_kwargs,
            "spaces": space_signature, "global_step": at_step, "update": at_update, "rng": rng_states(),
            "episodes": at_episodes, "wall_time": at_wall_time,
        }, keep=config.keep_checkpoints)

    # (update, global_step, episode total, wall time, last 20 returns) after the last completed update: what a
    # checkpoint records
    completed = update, global_step, earlier_episodes, earlier_wall_time, list(recent_returns)

    from shoal.logging import Logger

    own_logger = logger is None  # else train() closes it
    if own_logger:
        logger = Logger(config.run_dir, total_steps=config.total_timesteps, title=_title(config, binding, device),
                        dashboard=config.dashboard, tensorboard=config.tensorboard, wandb=config.wandb,
                        wandb_project=config.wandb_project, config=dataclasses.asdict(config), start_step=global_step)
    try:
        if isinstance(logger, Logger):  # its files now, the run directory checked: not after a first update
            logger.open()
        if config.run_dir is not None:  # after the logger: a W&B that does not start leaves the directory empty
            (Path(config.run_dir) / "config.json").write_text(_config_json(config))
        own_vecenv = vecenv is None
        vecenv = vecenv if vecenv is not None else make_vecenv(config, binding)
    except BaseException:
        if own_logger:
            logger.close()
        raise

    try:
        T, N = config.num_steps, vecenv.num_agents
        max_agents = binding.max_agents
        obs_space, atn_space = binding.single_observation_space, binding.single_action_space
        discrete = hasattr(atn_space, "nvec")
        atn_size, atn_dtype = _action_columns(atn_space)
        slot_of_agent = {agent: slot for slot, agent in enumerate(binding.possible_agents)}
        gamma, gae_lambda = config.gamma, config.gae_lambda

        # Rollout storage, on the host, (T + 1, N): row t of slot n holds obs_t and what came of it. Row T
        # holds the observation after the rollout: its value bootstraps GAE, and its action is in flight
        # during the update, so it becomes row 0 of the next rollout. Dead slots store zeros, never garbage.
        obs = np.zeros((T + 1, N, *obs_space.shape), obs_space.dtype)
        actions = np.zeros((T + 1, N, atn_size), atn_dtype)
        logprobs, values, rewards = (np.zeros((T + 1, N), np.float32) for _ in range(3))
        masks, next_masks, terminals, truncations, starts = (np.zeros((T + 1, N), bool) for _ in range(5))
        length = np.zeros(N, np.int64)  # transitions stored this rollout, per slot
        in_flight = np.zeros(N, bool)  # an action was sent for the slot's newest obs
        last_mask = np.zeros(N, bool)  # the mask that came with the slot's newest obs
        if policy.is_recurrent:
            # Each a tuple of tensors with a row per slot (an LSTM's (h, c)); the policy gets its own form back.
            initial = policy.initial_state(N, device)
            single_tensor = isinstance(initial, torch.Tensor)

            def as_state(parts: tuple) -> Any:
                return parts[0] if single_tensor else parts

            # Copies, each its own memory: the rollout writes rows in place, and an initial state may share one
            # zero tensor between its parts (h, c = z, z) or between its rows (expanded).
            state = tuple(part.clone(memory_format=torch.contiguous_format) for part in
                          state_parts(initial, N, f"{type(policy).__name__}.initial_state returns"))  # after newest obs
            rollout_state = tuple(part.clone() for part in state)  # before row 0's obs, per slot
            next_rollout_state = tuple(part.clone() for part in state)  # before row T's obs, per slot

        result = TrainResult(policy=policy, global_step=global_step, updates=update, wall_time=0.0,
                             run_dir=config.run_dir, start_step=global_step)
        sim_time = inference_time = learn_time = 0.0
        step_at_start, clock = global_step, time.perf_counter()
        slot_rows = _SlotRows(max_agents)
        vecenv.async_reset(config.seed + update * config.num_envs)  # a resumed run does not replay its first episodes
        while global_step < config.total_timesteps:
            update += 1
            rollout_start_step = global_step
            frac = 1.0 - global_step / config.total_timesteps
            lr = config.learning_rate * frac if config.anneal_lr else config.learning_rate
            optimizer.lr = lr
            finished: list[tuple[float, int]] = []

            # ------------------------------------------------------------ rollout
            policy.eval()  # acting: dropout off, batch-norm on its running statistics (a batch may be one row)
            act = None if policy.is_recurrent else policy.acting_forward()  # this rollout's parameters
            with torch.inference_mode():  # no gradients anywhere in the rollout
                while (length < T).any():
                    tick = time.perf_counter()
                    batch = vecenv.recv()
                    tock = time.perf_counter()
                    sim_time += tock - tick
                    rows, span = slot_rows(batch.env_ids)  # (B,) the batch's slots, env-major
                    batch_slots = span if span is not None else rows  # a slice where it can: views, not copies
                    mask = batch.masks.copy()
                    terminal, truncation = batch.terminals & mask, batch.truncations & mask
                    reward = np.where(mask, batch.rewards, 0).astype(np.float32)

                    # Episode statistics, and bootstrap values for truncated agents from their final observation.
                    final_rows, final_obs, restarted = [], [], []
                    for position, env_infos in enumerate(batch.infos):
                        for agent, info in env_infos.items():
                            row = position * max_agents + slot_of_agent[agent]  # within the batch
                            if "reset_info" in info:  # the env reset in this step: the agent's obs is a first one
                                restarted.append(row)
                            if "episode" in info and (terminal[row] or truncation[row]):  # at its end only
                                episode = episode_statistics(info["episode"], binding.env_name, agent)
                                finished.append(episode)
                                recent_returns.append(episode[0])
                                result.episodes.append((global_step, time.perf_counter() - started, *episode))
                            if "final_observation" in info and truncation[row] and not terminal[row]:
                                final_rows.append(row)
                                final_obs.append(info["final_observation"])
                    if final_rows:
                        flat = torch.as_tensor(np.stack(final_obs), device=device)
                        if policy.is_recurrent:
                            ended = torch.as_tensor(rows[final_rows], device=device)
                            _, final_values, _ = policy(flat, as_state(tuple(part[ended] for part in state)),
                                                        torch.zeros(len(ended), dtype=torch.bool, device=device))
                        else:
                            _, final_values = act(flat)
                        reward[final_rows] += gamma * final_values.float().cpu().numpy()

                    # The in-flight transitions (obs_t, action_t) receive reward_t, their flags and mask_{t+1}.
                    t = length[batch_slots]
                    at = _step_index(t, rows, span)
                    rewards[at], terminals[at], truncations[at], next_masks[at] = reward, terminal, truncation, mask
                    acted = in_flight[batch_slots]
                    ran_ahead = acted & (t == T)
                    global_step += int((acted & ~ran_ahead & last_mask[batch_slots] & mask).sum())  # stored ones
                    if ran_ahead.any():
                        # This env finished its rollout while others lag and stepped again: its newest
                        # transition has no row. Drop it, and end the last stored one with a bootstrap from
                        # the value of the observation that followed it (exact, as for a time limit).
                        cut = rows[ran_ahead]
                        open_ = ~(terminals[T - 1, cut] | truncations[T - 1, cut])
                        rewards[T - 1, cut] += np.where(open_, gamma * values[T, cut], 0)
                        truncations[T - 1, cut] = True
                    t = t + (acted & (t < T))
                    length[batch_slots] = t
                    at = _step_index(t, rows, span)

                    # The new observation: store it, act on it.
                    start = terminal | truncation | ~last_mask[batch_slots]  # this obs begins an agent's episode
                    ended = terminal | truncation
                    if binding.is_multiagent and ended.any():
                        mask = _without_final(mask, ended, restarted)
                    obs[at], masks[at], starts[at] = batch.obs, mask, start  # copies: the batch is a shared buffer
                    live = None if mask.all() else np.flatnonzero(mask)  # dead slots: no forward pass, action 0
                    if live is not None:
                        obs[t[~mask], rows[~mask]] = 0
                    if live is not None and not len(live):  # every slot dead or dark: no one to act for
                        action, logprob, value = np.zeros((0, atn_size)), np.zeros(0), np.zeros(0)
                    else:
                        ob = torch.from_numpy(obs[at] if live is None else obs[t[live], rows[live]]).to(device)
                        if policy.is_recurrent:
                            acting = torch.as_tensor(rows if live is None else rows[live], device=device)
                            begin = torch.as_tensor(start if live is None else start[live], device=device)
                            before = tuple(part[acting].masked_fill_(begin.view(-1, *[1] * (part.dim() - 1)), 0)
                                           for part in state)
                            at_end = torch.as_tensor((t if live is None else t[live]) == T, device=device)
                            for stored, part in zip(next_rollout_state, before):
                                stored[acting[at_end]] = part[at_end]
                            params, value, after = policy(ob, as_state(before), begin)  # zeroed already: no NaN
                            after = state_parts(after, len(acting), f"{type(policy).__name__} returns")
                            for stored, part in zip(state, after):
                                stored[acting] = part
                        else:
                            params, value = act(ob)
                        action, logprob = policy.sample_actions(params)
                        action, logprob, value = (action.cpu().numpy(), logprob.cpu().numpy(),
                                                  value.float().cpu().numpy())
                    actions[at], logprobs[at], values[at] = (_expand(x, live, len(rows))
                                                             for x in (action, logprob, value))
                    sent = actions[at] if discrete else np.clip(actions[at], atn_space.low, atn_space.high)
                    if not discrete and not np.isfinite(sent).all():
                        raise TrainingError(f"update {update} (step {global_step:,}): the policy's actions are not "
                                            f"finite ({_short(sent.ravel().tolist())}): {_NOT_FINITE}")
                    tick = time.perf_counter()
                    inference_time += tick - tock
                    vecenv.send(sent)
                    sim_time += time.perf_counter() - tick
                    in_flight[batch_slots] = True
                    last_mask[batch_slots] = mask

            if global_step == rollout_start_step:  # else no step ever counts, and the run would never end
                raise TrainingError(
                    f"update {update} (step {global_step:,}): the rollout ({T} steps x {config.num_envs} envs) held no "
                    f"transition: no agent was shown (mask True) at two steps in a row, so there is nothing to "
                    f"learn from. Does {binding.env_name} return observations for the agents it lists? If its agents "
                    f"appear later, raise num_steps")
            learn_start = time.perf_counter()
            # ------------------------------------------------------------ GAE
            # A transition counts iff the masks that came with its obs and with its reward are both True
            # (the stored obs mask is False for an agent's final observation, see the rollout).
            # Advantages never propagate across an episode end or into a transition that does not count.
            valid = masks[:T] & next_masks[:T]  # (T, N)
            advantages = gae(rewards[:T], values, terminals[:T] | truncations[:T], valid, gamma, gae_lambda)
            returns = advantages + values[:T]
            variance = float(returns[valid].var()) if valid.sum() > 1 else math.nan
            explained = 1 - float((returns - values[:T])[valid].var()) / variance if variance > 0 else math.nan

            # ------------------------------------------------------------ optimize
            policy.train()
            def tensor(array: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(array)).to(device)

            if policy.is_recurrent:
                # Minibatches of whole slot sequences (T, slots): the LSTM replays each from its
                # rollout-start state; only counting transitions enter the loss.
                units = np.flatnonzero(valid.any(0))  # slots with data
                seq = {name: tensor(array[:T]) for name, array in dict(
                    obs=obs, starts=starts, valid=valid, actions=actions, logprobs=logprobs, advantages=advantages,
                    returns=returns, values=values).items()}
            else:
                units = np.flatnonzero(valid.reshape(-1))  # counting transitions, time-major
                flat = {name: tensor(array[:T].reshape(T * N, *array.shape[2:])[units]) for name, array in dict(
                    obs=obs, actions=actions, logprobs=logprobs, advantages=advantages, returns=returns,
                    values=values).items()}
            # num_minibatches of sizes within one of each other; fewer where they would hold under 2 transitions
            # (batch norm fails on one row in train mode); an LSTM's minibatches hold whole slots
            if policy.is_recurrent:  # a slot with one transition, alone in a minibatch, would be one row
                lone = len(units) and valid[:, units].sum(0).min() < 2
                count = min(config.num_minibatches, max(1, len(units) // 2) if lone else len(units))
            else:
                count = min(config.num_minibatches, max(1, len(units) // 2))
            if batch_norm and valid.sum() < 2:
                count = 0
                if not said_one_row:
                    said_one_row = True
                    logger.message(f"update {update} (step {global_step:,}): the rollout held one transition, on "
                                   f"which the policy's batch norm cannot train: no gradient step in such updates")
            bounds = [len(units) * i // count for i in range(count + 1)] if count else []
            stats = []  # per minibatch: (policy loss, value loss, entropy, ratio, log ratio); no ops, no syncs
            for epoch in range(config.update_epochs):
                # Shuffle once per epoch, so that minibatches are slices (views), not gathers; a
                # single minibatch is the whole batch in any order: no shuffle at all.
                order = torch.randperm(len(units), device=device) if count > 1 else None
                if not policy.is_recurrent:
                    shuffled = flat if order is None else {k: v[order] for k, v in flat.items()}
                for first, stop in zip(bounds, bounds[1:]):
                    if policy.is_recurrent:
                        mb = order[first:stop] if order is not None else slice(None)
                        slots = torch.as_tensor(units, device=device)[mb]
                        sequence_state = as_state(tuple(part[slots] for part in rollout_state))
                        counted = seq["valid"][:, slots]
                        # LSTMPolicy's own forward encodes the counted rows only; a subclass's may not take them
                        only = (counted,) if type(policy).forward is LSTMPolicy.forward else ()
                        params, new_values, _ = policy(seq["obs"][:, slots], sequence_state, seq["starts"][:, slots],
                                                       *only)
                        pick = counted.reshape(-1).nonzero().squeeze(1)  # (T * slots), time-major
                        params, new_values = params[pick], new_values[pick]
                        b = {k: seq[k][:, slots].reshape(-1, *seq[k].shape[2:])[pick]
                             for k in ("actions", "logprobs", "advantages", "returns", "values")}
                    else:
                        b = {k: v[first:stop] for k, v in shuffled.items()}
                        params, new_values, _ = policy(b["obs"])
                    new_logprobs, entropy = policy.evaluate_actions(params, b["actions"])
                    log_ratio = new_logprobs - b["logprobs"]
                    ratio = log_ratio.exp()
                    mb_advantages = b["advantages"]
                    if config.norm_adv and len(mb_advantages) > 1:
                        std, mean = torch.std_mean(mb_advantages)
                        mb_advantages = (mb_advantages - mean) / (std + 1e-8)
                    policy_loss = -torch.min(
                        mb_advantages * ratio,
                        mb_advantages * ratio.clamp(1 - config.clip_coef, 1 + config.clip_coef),
                    ).mean()
                    new_values = new_values.float()
                    if config.clip_vloss:
                        clipped = b["values"] + (new_values - b["values"]).clamp(-config.clip_coef, config.clip_coef)
                        value_loss = 0.5 * torch.max((new_values - b["returns"]) ** 2,
                                                     (clipped - b["returns"]) ** 2).mean()
                    else:
                        value_loss = 0.5 * ((new_values - b["returns"]) ** 2).mean()
                    entropy_loss = entropy.mean()
                    loss = policy_loss + config.vf_coef * value_loss
                    if config.ent_coef:  # with a zero coefficient the backward pass skips the entropy
                        loss = loss - config.ent_coef * entropy_loss
                    for parameter in parameters:  # optimizer.zero_grad(set_to_none=True), minus its profiler hook
                        parameter.grad = None
                    if not loss.requires_grad:
                        raise APIUsageError(f"{_describe_policy(policy)}: the loss carries no gradient: the policy's "
                                            f"outputs in train mode do not depend on any parameter that requires grad "
                                            f"(computed under torch.no_grad(), or detached?)")
                    loss.backward()
                    clip_grad_norm(parameters, config.max_grad_norm)
                    optimizer.step()
                    stats.append((policy_loss, value_loss, entropy_loss, ratio, log_ratio))
                if config.target_kl is not None and stats and _approx_kl(*stats[-1][3:]).item() > config.target_kl:
                    break
            losses = [math.nan] * 5
            if stats:  # the statistics once per update, not once per gradient step
                with torch.no_grad():
                    ratio, log_ratio = (torch.cat([mb[i] for mb in stats]) for i in (3, 4))
                    clipfrac = ((ratio - 1).abs() > config.clip_coef).float().mean()
                    losses = torch.stack([*(torch.stack([mb[i] for mb in stats]).mean() for i in range(3)),
                                          _approx_kl(ratio, log_ratio), clipfrac]).tolist()
                if not all(map(math.isfinite, losses)):  # the parameters were or are about to be NaN or inf
                    raise TrainingError(f"update {update} (step {global_step:,}): the losses are not finite (policy "
                                        f"{losses[0]}, value {losses[1]}, entropy {losses[2]}): {_NOT_FINITE}"
                                        f"{_kept_checkpoint(config.run_dir)}")

            # The next rollout starts from row T: its action is already in flight.
            for array in (obs, actions, logprobs, values, masks, starts):
                array[0] = array[T]
            length[:] = 0
            if policy.is_recurrent:
                for stored, part in zip(rollout_state, next_rollout_state):
                    stored.copy_(part)
            learn_time += time.perf_counter() - learn_start
            episode_total = earlier_episodes + len(result.episodes)
            wall_time = earlier_wall_time + time.perf_counter() - started

            # ------------------------------------------------------------ log
            busy = sim_time + inference_time + learn_time
            metrics = {
                "global_step": global_step,
                "update": update,
                "wall_time": wall_time,
                "episode/return": float(np.mean([r for r, _ in finished])) if finished else math.nan,
                "episode/length": float(np.mean([n for _, n in finished])) if finished else math.nan,
                "episode/count": len(finished),
                "episode/total": episode_total,
                "episode/return_mean20": float(np.mean(recent_returns)) if recent_returns else math.nan,
                "lr": lr,
                "perf/steps_per_second": (global_step - step_at_start) / max(time.perf_counter() - clock, 1e-9),
                "perf/sim_fraction": sim_time / busy,
                "perf/inference_fraction": inference_time / busy,
                "perf/learn_fraction": learn_time / busy,
                **dict(zip(("loss/policy", "loss/value", "loss/entropy", "loss/approx_kl", "loss/clipfrac"), losses)),
                "loss/explained_variance": explained,
            }
            logger.log(global_step, metrics)
            result.history.append(metrics)
            # Only now is the update complete: a Ctrl-C before its progress row is written saves the
            # checkpoint under the update before, which a resumed run repeats (its log drops later rows).
            completed = update, global_step, episode_total, wall_time, list(recent_returns)

            # ------------------------------------------------------------ checkpoint
            solved = (config.stop_at_return is not None and len(recent_returns) == recent_returns.maxlen
                      and np.mean(recent_returns) >= config.stop_at_return)
            last = global_step >= config.total_timesteps or solved
            if config.run_dir is not None and (last or (config.checkpoint_interval
                                                        and update % config.checkpoint_interval == 0)):
                save(*completed)
            if solved:
                logger.message(f"solved: mean return of the last 20 episodes {np.mean(recent_returns):.1f} "
                               f">= {config.stop_at_return} at step {global_step:,}")
                break
    except (KeyboardInterrupt, BrokenPipeError):
        # Ctrl-C, or the reader of stdout gone (shoal train | head): keep what was learned. The model and
        # optimizer as they are, under the step count and update number of the last completed update, so
        # that a resumed run's schedule goes on from there; the interrupted rollout is dropped (the envs
        # restart on resume anyway).
        if config.run_dir is not None:
            save(*completed)
        raise
    finally:
        policy.train()  # as it came, also when a rollout (in eval mode) was cut short
        try:
            if own_vecenv:
                vecenv.close()
        finally:  # also when closing the vec env fails
            if own_logger:  # its files are complete only then (train() closes a logger it was given)
                logger.close()
    result.global_step, result.updates = global_step, update
    result.wall_time = time.perf_counter() - started
    return result


def gae(rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, valid: np.ndarray, gamma: float,
        gae_lambda: float) -> np.ndarray:
    """Generalized advantage estimates ``(T, N)`` that respect masks.

    Args:
        rewards, dones, valid: ``(T, N)``; ``dones`` = terminal or truncated (a truncated transition's
            reward already includes ``gamma * V(final observation)``).
        values: ``(T + 1, N)``; row T is the value of the observation after the rollout.

    A transition that is not ``valid`` gets advantage 0 and cuts the recursion: nothing flows into or
    out of it (``np.where``, not a product, so garbage there, even NaN, never leaks).
    """
    _check_gae_inputs(rewards, values, dones, valid, gamma, gae_lambda)
    next_values = np.where(dones, 0, values[1:])
    deltas = np.where(valid, rewards + gamma * next_values - values[:-1], 0).astype(np.float32, copy=False)
    carry = valid & ~dones  # the next transition's advantage flows into this one's
    carry[:-1] &= valid[1:]
    decay = np.where(carry, np.float32(gamma * gae_lambda), np.float32(0))
    advantages = np.zeros(rewards.shape, np.float32)
    next_advantage = np.zeros(rewards.shape[1:], np.float32)
    for t in reversed(range(len(rewards))):  # all that cannot be vectorised: two ops a step
        next_advantage = advantages[t] = deltas[t] + decay[t] * next_advantage
    return advantages


def _check_gae_inputs(rewards, values, dones, valid, gamma, gae_lambda) -> None:
    """APIUsageError unless gae's arguments have its shapes and kinds (numpy would broadcast a wrong shape)."""
    arrays = {"rewards": rewards, "values": values, "dones": dones, "valid": valid}
    wrong = next((name for name, array in arrays.items() if not isinstance(array, np.ndarray)), None)
    if wrong:
        raise APIUsageError(f"gae: {wrong} must be a numpy array, got {type(arrays[wrong]).__name__}")
    if rewards.ndim != 2:
        raise APIUsageError(f"gae: rewards must have shape (T, N), got {rewards.shape}")
    steps, envs = rewards.shape
    shapes = {"values": (steps + 1, envs), "dones": (steps, envs), "valid": (steps, envs)}
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise APIUsageError(f"gae: {name} must have shape {shape} (rewards are {rewards.shape}), got "
                                f"{arrays[name].shape}")
    for name in ("dones", "valid"):
        if arrays[name].dtype != bool:
            raise APIUsageError(f"gae: {name} must be bools, got dtype {arrays[name].dtype}")
    for name, value in (("gamma", gamma), ("gae_lambda", gae_lambda)):
        if not (is_number(value) and 0 <= value <= 1):
            raise APIUsageError(f"gae: {name} must be a number in [0, 1], got {value!r}")


class _SlotRows:
    """env_ids of a batch -> (its slot rows ``(B,)`` env-major, the same as a slice or None), cached.

    Async batches of many workers come in more combinations than a run has batches (64 workers, half of them
    per batch: 1.8e18): the cache holds at most ``SIZE`` of them, and starts over when full."""

    SIZE = 1024

    def __init__(self, max_agents: int):
        self.max_agents = max_agents
        self.cache: dict[bytes, tuple[np.ndarray, slice | None]] = {}

    def __call__(self, env_ids) -> tuple[np.ndarray, slice | None]:
        env_ids = np.asarray(env_ids, np.int64)
        key = env_ids.tobytes()
        if key not in self.cache:
            if len(self.cache) >= self.SIZE:
                self.cache.clear()
            rows = (env_ids[:, None] * self.max_agents + np.arange(self.max_agents)).reshape(-1)
            contiguous = bool((np.diff(rows) == 1).all())
            self.cache[key] = rows, slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else None
        return self.cache[key]


def episode_statistics(episode: Any, env_name: str, agent: Any) -> tuple[float, int]:
    """(return, length) from an ending agent's ``infos[agent]["episode"]``: shoal's ``{"return", "length"}`` or
    Gymnasium's ``RecordEpisodeStatistics`` ``{"r", "l"}``; APIUsageError for anything else."""
    for keys in (("return", "length"), ("r", "l")):
        try:
            return float(np.asarray(episode[keys[0]])), int(np.asarray(episode[keys[1]]))
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    raise APIUsageError(f"{env_name}, agent {agent!r}: infos['episode'] at the agent's end must hold 'return' and "
                        f"'length' (shoal's episode statistics) or 'r' and 'l' (Gymnasium's "
                        f"RecordEpisodeStatistics), got {_short(episode)}. With record_episode_statistics=False it "
                        f"is the env's own: rename that key in the env, or switch the option back on")


def _without_final(mask: np.ndarray, ended: np.ndarray, first_rows: list) -> np.ndarray:
    """``mask`` without the rows whose observation is *final*: it came with its agent's own end, so nothing
    follows from it, even if the slot is live again next step (a respawn, an agent of the next episode). Only
    an agent of the episode the env began in this step (``first_rows``, its info has "reset_info") has a first
    observation there instead."""
    first = np.zeros(len(mask), bool)
    first[first_rows] = True
    return mask & ~(ended & ~first)


def _step_index(t: np.ndarray, rows: np.ndarray, span: slice | None):
    """Index of the pairs (t[i], rows[i]) into (T + 1, N) storage: an int and a slice (fast, views) when
    the batch is one time step of contiguous slots, as in every synchronous rollout."""
    if span is not None and t.min() == t.max():
        return int(t[0]), span
    return t, rows


def _expand(values: np.ndarray, live: np.ndarray | None, size: int) -> np.ndarray:
    """``values`` for the live rows -> ``size`` rows, zeros for the dead ones."""
    if live is None:
        return values
    out = np.zeros((size, *values.shape[1:]), values.dtype)
    out[live] = values
    return out


_NOT_FINITE = ("the policy's outputs or gradients overflowed or became NaN (a learning rate or rewards too large, "
               "observations past float32's range, which the default policies compute in, or a policy whose forward "
               "gives them); stopped without writing a checkpoint of it")


def _kept_checkpoint(run_dir: str | None) -> str:
    """The end of a divergence message: the run's newest checkpoint, which stays the newest, if it has one."""
    saved = list_checkpoints(run_dir) if run_dir is not None else []
    return f"; its last checkpoint, {saved[-1]}, is kept" if saved else ""


def _describe_policy(policy: Policy) -> str:
    """The policy's class, and the one it wraps (``LSTMPolicy(MixedPolicy)``), for checkpoints and messages."""
    inner = getattr(policy, "policy", None)
    return type(policy).__name__ + (f"({_describe_policy(inner)})" if isinstance(inner, Policy) else "")


def _title(config: PPOConfig, binding, device: torch.device) -> str:
    return (f"shoal PPO · {binding.env_name} · {config.backend} x {config.num_envs} envs"
            f"{' x ' + str(binding.max_agents) + ' agents' if binding.max_agents > 1 else ''} · {device}"
            f"{' · ' + config.run_dir if config.run_dir else ''}")


def _config_json(config: PPOConfig) -> str:
    import json

    return json.dumps(dataclasses.asdict(config), indent=2) + "\n"


def _describe_space(space) -> str:
    if hasattr(space, "nvec"):
        return f"MultiDiscrete({np.asarray(space.nvec).tolist()})"
    return f"{type(space).__name__}{tuple(space.shape)} {space.dtype}"


def _action_columns(atn_space) -> tuple[int, np.dtype]:
    """How the rollout stores one flat action: (values per action, dtype)."""
    if hasattr(atn_space, "nvec"):
        return len(atn_space.nvec), np.dtype(np.int64)
    return int(np.prod(atn_space.shape)), np.dtype(np.float32)


def _check_storage_fits(config: PPOConfig, binding, vecenv) -> None:
    """APIUsageError when the rollout storage, ``(num_steps + 1)`` rows for every agent slot, and the update's
    copies of its observations would not fit in memory: numpy's MemoryError names no setting, and an allocation
    the OS allows but cannot fill kills the run."""
    slots = vecenv.num_agents if vecenv is not None else config.num_envs * binding.max_agents
    obs_space, atn_space = binding.single_observation_space, binding.single_action_space
    atn_size, atn_dtype = _action_columns(atn_space)
    atn_bytes = atn_size * atn_dtype.itemsize
    obs_bytes = int(np.prod(obs_space.shape)) * obs_space.dtype.itemsize
    row_bytes = obs_bytes + atn_bytes + 3 * 4 + 5
    # the update copies the counted observations, and shuffles them once more per epoch
    size = (config.num_steps + 1) * slots * row_bytes + 2 * config.num_steps * slots * obs_bytes
    available = available_memory()
    if available is not None and size > available:
        raise APIUsageError(
            f"the rollout storage does not fit in memory: {config.num_steps + 1:,} rows (num_steps + 1) x {slots:,} "
            f"agent slots ({config.num_envs} envs x max_agents {binding.max_agents}) x {row_bytes:,} bytes (the "
            f"observation, {obs_space.dtype} {obs_space.shape}, and the action), and the update's two copies of the "
            f"observations, is {size / 2**30:,.1f} GiB, {available / 2**30:,.1f} GiB available: lower num_steps or "
            f"num_envs, or make observations smaller with a feature_parser")


def _space_signature(binding) -> dict[str, Any]:
    return {"observations": _describe_space(binding.single_observation_space),
            "actions": _describe_space(binding.single_action_space), "max_agents": str(binding.max_agents),
            "observation leaves": leaf_signature(binding.raw_single_observation_space)}


_CHECKPOINT_KEYS = ("model", "optimizer", "config", "env", "spaces", "global_step", "update", "rng")


def _check_keys(checkpoint: dict) -> None:
    if not isinstance(checkpoint, dict):
        raise APIUsageError(f"expected a checkpoint dict (load_checkpoint(path) gives one), got "
                            f"{type(checkpoint).__name__}")
    missing = [key for key in _CHECKPOINT_KEYS if key not in checkpoint]
    lacks = ", ".join(missing) or (
        "a config dict" if not isinstance(checkpoint["config"], dict)
        else next((f"an integer {key} >= 0 (it holds {_short(checkpoint[key])})" for key in ("global_step", "update")
                   if not (is_int(checkpoint[key]) and checkpoint[key] >= 0)), ""))
    if lacks:
        raise APIUsageError(f"{checkpoint.get('path', 'the checkpoint')} is not a checkpoint of shoal's trainer: it lacks "
                            f"{lacks} (train() writes {', '.join(_CHECKPOINT_KEYS)})")


def check_compatible(checkpoint: dict, binding, config: PPOConfig | None = None, *, other_env: bool = False) -> None:
    """Raise :class:`APIUsageError` when a checkpoint was trained on another env (unless ``other_env``: playing it
    on an env of the same spaces) or other spaces."""
    _check_keys(checkpoint)
    where = checkpoint.get("path", "the checkpoint")
    if config is not None and checkpoint.get("env") != config.env:
        raise APIUsageError(f"{where} was trained on env {checkpoint.get('env')!r}, not {config.env!r}: "
                            f"pass --env {checkpoint.get('env')} or use a checkpoint of {config.env!r}")
    expected, trained = _space_signature(binding), checkpoint.get("spaces")
    trained = trained if isinstance(trained, dict) else {}
    if not isinstance(trained.get("observation leaves"), list):  # from before they were recorded as a list:
        del expected["observation leaves"]  # compared on the rest
    differ = [key for key in expected if trained.get(key) != expected[key]]
    if differ == ["observation leaves"]:  # the same flat bytes, other leaves: name the first that differs
        raise APIUsageError(f"{where} does not fit env {binding.env_name!r}: its observation leaves are not the "
                            f"env's ({leaf_difference(trained[differ[0]], expected[differ[0]])})")
    if differ:
        describe = lambda spaces: ", ".join(f"{key} {spaces.get(key)}" for key in differ  # noqa: E731
                                            if key != "observation leaves")
        raise APIUsageError(f"{where} does not fit env {binding.env_name!r}: it was trained with "
                            f"{describe(trained)}; this env has {describe(expected)}")
    trained_on = checkpoint.get("env_name")  # absent from checkpoints written before it was recorded
    if not other_env and trained_on is not None and _bare_name(trained_on) != _bare_name(binding.env_name):
        raise APIUsageError(f"{where} was trained on {trained_on!r}, not on {binding.env_name!r}: the shoal command "
                            f"builds the env of the run's config.env ({checkpoint.get('env')!r}). A run given a "
                            f"binding of its own in Python goes on in Python with that binding (train(..., "
                            f"resume_from=...)); shoal eval --env NAME plays it on any env of its spaces")


def _as_data(value: Any) -> Any:
    """``value`` as what a checkpoint holds as data (numbers, strings, None, lists, tuples and dicts with string
    keys; numpy numbers become Python ones): an env's keyword arguments the shoal command can build the env with
    again. TypeError for anything else."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, (list, tuple)):  # a tuple stays one; other sequences (a namedtuple) become lists
        items = [_as_data(item) for item in value]
        return tuple(items) if type(value) is tuple else items
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _as_data(item) for key, item in value.items()}
    raise TypeError(f"{type(value).__name__} is no data")


def _env_kwargs(binding) -> dict | None:
    """The binding's env_kwargs as data, or None where some are not (an object, a function)."""
    try:
        return _as_data(binding.env_kwargs)
    except TypeError:
        return None


def _bare_name(env_name: str) -> str:
    """An env's name without its family and punctuation: PettingZoo's registry calls the env that its module
    calls knights_archers_zombies_v11 butterfly/knights_archers_zombies-v11."""
    return re.sub(r"[\W_]", "", env_name.lower().rpartition("/")[2])


def check_default_policy(checkpoint: dict) -> None:
    """APIUsageError where the checkpoint's policy was given to train(): the run's config builds the default
    policy (shoal eval, a resume without a policy), which is not that network even where its weights would load."""
    if checkpoint.get("policy_given"):
        raise APIUsageError(
            f"{checkpoint.get('path', 'the checkpoint')} holds the weights of the {checkpoint.get('policy')} that "
            f"train() was given: the shoal command, and train() without a policy, build only default policies. Build "
            f"that policy as the run did, in Python, and pass it (train(config, binding, policy, resume_from=...)), or "
            f"load them into it with load_policy_state and play it with shoal.ppo.evaluate")


def load_policy_state(policy: Policy, checkpoint: dict) -> None:
    """Load the checkpoint's model into ``policy``; APIUsageError when the two networks differ."""
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)):
        got = f"a dict with keys {sorted(map(str, checkpoint))}" if isinstance(checkpoint, dict) else type(
            checkpoint).__name__
        raise APIUsageError(f"load_policy_state takes a checkpoint dict with the model's state dict under 'model' "
                            f"(load_checkpoint(path) gives one), got {got}")
    try:
        policy.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        where, trained = checkpoint.get("path", "the checkpoint"), checkpoint.get("policy", "the")
        torch_says = " ".join(line.strip() for line in str(error).splitlines()[:2])
        if checkpoint.get("policy_given"):  # not the config's: its settings would not rebuild it
            raise APIUsageError(
                f"{where} holds the weights of the {trained} that train() was given, not this "
                f"{_describe_policy(policy)}'s network: build that policy as the run did, in Python (the shoal "
                f"command builds only default policies), load them into it with load_policy_state and play it with "
                f"shoal.ppo.evaluate. torch: {torch_says}") from None
        config = checkpoint.get("config", {})
        settings = ", ".join(f"{name}={config.get(name)!r}" for name in POLICY_FIELDS)
        raise APIUsageError(
            f"{where} holds {trained} weights trained with {settings}, not this {_describe_policy(policy)}'s "
            f"network: build the policy with those settings (config_from_checkpoint gives them) or pass the policy "
            f"it was trained with. torch: {torch_says}") from None
    broken = next((name for name, parameter in policy.named_parameters() if not torch.isfinite(parameter).all()), None)
    if broken is not None:  # train() never saves such weights: the file was damaged
        raise APIUsageError(f"{checkpoint.get('path', 'the checkpoint')}: the policy's parameter {broken!r} holds "
                            f"values that are not finite (NaN or inf): the file is damaged; use an earlier checkpoint")


def config_from_checkpoint(checkpoint: dict) -> PPOConfig:
    """The :class:`PPOConfig` a checkpoint was trained with (unknown fields ignored)."""
    _check_keys(checkpoint)
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    return PPOConfig(**{k: v for k, v in checkpoint["config"].items() if k in names})


UNSCORED_ENDS = 1000
"""Agent-episode ends without statistics (and none with) after which :func:`evaluate` stops: far more than a
game's lives."""


def evaluate(policy: Policy, binding, episodes: int = 10, seed: int = 0, deterministic: bool = False,
             device: str | torch.device | None = None, max_steps: int = 1_000_000) -> list[float]:
    """Play ``episodes`` episodes with ``policy`` on one env; returns each agent-episode's return.

    Returns come from ``infos[agent]["episode"]`` at the agent's end (the binding's episode statistics, or the
    env's own: see :func:`episode_statistics`).
    Play stops after ``max_steps`` env steps, with the episodes that ended by then (APIUsageError if none did).
    ``device``: where to play (the policy is moved there); None plays where its parameters are. The
    policy's train/eval mode and the global torch RNG states are as before afterwards.
    """
    check_flat(binding)
    check_policy(policy, binding)
    check_int("evaluate: episodes", episodes)
    check_int("evaluate: max_steps", max_steps)
    if not isinstance(deterministic, (bool, np.bool_)):
        raise APIUsageError(f"evaluate: deterministic must be True or False, got {deterministic!r}")
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise APIUsageError(f"evaluate: seed must be an int from 0 to 2**32 - 1, got {seed!r}")
    if device is not None:
        policy.to(resolve_device(str(device)))
    env = binding.make_env()
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    returns: list[float] = []
    state = policy.initial_state(binding.max_agents, device) if policy.is_recurrent else None
    starts = torch.ones(binding.max_agents, dtype=torch.bool, device=device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            obs, _ = env.reset(seed=seed)
            last_mask = env.masks.copy()
            unscored = 0  # ends that came without episode statistics: an Atari game's lost lives, say
            for _ in range(max_steps):
                with torch.no_grad():
                    flat = torch.as_tensor(np.array(obs), device=device)
                    params, _, state = policy(flat, state, starts) if policy.is_recurrent else policy(flat)
                    action, _ = policy.sample_actions(params, deterministic)
                if not hasattr(binding.single_action_space, "nvec"):
                    space = binding.single_action_space
                    action = action.clamp(torch.as_tensor(space.low, device=device),
                                          torch.as_tensor(space.high, device=device))
                obs, _, terminal, truncation, infos = env.step(action.cpu().numpy())
                # As in training: an agent's state starts over after its end and where it (re)appears. An
                # observation that came with its agent's end is final unless the env began a new episode.
                ended = terminal | truncation
                starts = torch.as_tensor(ended | ~last_mask, device=device)
                last_mask = env.masks.copy()
                if binding.is_multiagent and ended.any():
                    last_mask = _without_final(last_mask, ended, [binding.agent_slots[agent] for agent, info
                                                                  in infos.items() if "reset_info" in info])
                for agent, info in infos.items():
                    if "episode" in info and ended[binding.agent_slots[agent]]:
                        returns.append(episode_statistics(info["episode"], binding.env_name, agent)[0])
                if len(returns) >= episodes:
                    break
                unscored += int(ended.sum()) - sum("episode" in info for info in infos.values())
                if not returns and unscored >= UNSCORED_ENDS:  # not a game's lives: an env that gives no statistics
                    raise APIUsageError(
                        f"{binding.env_name}: {unscored:,} agent episodes ended without episode statistics "
                        f"(infos[agent]['episode']) and none with: with record_episode_statistics=False the env "
                        f"must give its own (see shoal.ppo.episode_statistics); build the Binding with "
                        f"record_episode_statistics=True")
    finally:
        env.close()
        policy.train(was_training)
    if not returns:
        raise APIUsageError(f"{binding.env_name}: no episode ended within max_steps={max_steps:,} steps: raise "
                            f"max_steps (shoal eval --max-steps) if its episodes are longer"
                            + ("" if binding.record_episode_statistics else " (its returns come from the env's own "
                               "infos[agent]['episode'] at an episode's end, record_episode_statistics=False: an "
                               "Atari game's, over all its lives; or the env gives none)"))
    return returns[:episodes]
