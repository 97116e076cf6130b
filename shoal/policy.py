"""Policies: networks that read flat observations and return action parameters and a value.

Every policy takes the *flat* observations of the data contract, ``(B, obs_size)``, and calls
``binding.unflatten_observation`` itself, right where it needs the structure. A policy is two halves:

- ``encode(obs) -> features (B, feature_size)``: everything that reads the observation;
- ``decode(features) -> (params, value)``: the action head's parameters and the value ``(B,)``.

The split is what lets :class:`LSTMPolicy` wrap *any* policy: it runs an LSTM between the halves.
The action head turns ``params`` into actions: one categorical per dimension of a flat
``MultiDiscrete`` action space, or a diagonal Gaussian for a ``Box``.

Write your own policy by subclassing :class:`Policy`::

    class MyPolicy(Policy):
        def __init__(self, binding):
            super().__init__(binding, feature_size=128)
            self.net = nn.Linear(...)

        def encode(self, obs):                        # obs: (B, obs_size), flat
            nested = self.unflatten(obs)              # the env's own Dict/Tuple structure, as tensors
            return torch.relu(self.net(nested["map"].float().flatten(1)))

The base class supplies ``decode`` (a linear action head and a linear value head on the features).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np
import torch
from gymnasium import spaces
from torch import nn
from torch.nn import functional as F

from shoal.emulation import Binding
from shoal.errors import APIUsageError, SpaceError, check_int, is_int, is_number
from shoal.spaces import leaf_difference, leaf_signature, leaves, torch_dtype

State = tuple[torch.Tensor, torch.Tensor]  # LSTM (h, c), each (B, hidden_size)


def _described(value: Any) -> str:
    """What came, for an error message: a tensor's shape and dtype, else the type."""
    if isinstance(value, torch.Tensor):
        return f"of shape {tuple(value.shape)} and dtype {value.dtype}"
    kind = type(value)
    return f"of type {'' if kind.__module__ == 'builtins' else kind.__module__ + '.'}{kind.__qualname__}"


def state_parts(state: Any, batch: int, where: str) -> tuple[torch.Tensor, ...]:
    """A recurrent policy's state as a tuple of tensors: it may be one tensor (a GRU's) or a tuple of them (an
    LSTM's ``(h, c)``), each with ``batch`` rows in its first dimension. APIUsageError otherwise, saying that
    ``where`` gave it."""
    parts = (state,) if isinstance(state, torch.Tensor) else tuple(state) if isinstance(state, (tuple, list)) else None
    if parts and all(isinstance(part, torch.Tensor) and part.dim() >= 1 and part.shape[0] == batch for part in parts):
        return parts

    def one(value: Any) -> str:
        return f"{'a tensor' if isinstance(value, torch.Tensor) else 'a value'} {_described(value)}"

    got = (one(state) if parts is None or isinstance(state, torch.Tensor)
           else f"a {type(state).__name__} holding {', '.join(map(one, parts)) or 'nothing'}")
    raise APIUsageError(f"{where} {got}: a recurrent state must be a torch tensor or a tuple of them, each with the "
                        f"batch ({batch} rows) in its first dimension")


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain ``std`` and constant bias: the usual PPO initialisation.

    For a layer with one ``weight`` of 2 or more dimensions (``nn.Linear``, ``nn.Conv2d``...); a layer built
    with ``bias=False`` gets its weight initialised only.
    """
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        hint = (": initialise each of its weight_ih_l* and weight_hh_l* with nn.init.orthogonal_, as LSTMPolicy does"
                if isinstance(layer, nn.RNNBase) else "")
        raise APIUsageError(f"layer_init initialises a layer with one weight of 2 or more dimensions (nn.Linear, "
                            f"nn.Conv2d...), got {type(layer).__name__}{hint}")
    for name, value in (("std", std), ("bias", bias)):
        if not (is_number(value) and math.isfinite(value)):
            raise APIUsageError(f"layer_init: {name} must be a finite number, got {value!r}")
    nn.init.orthogonal_(weight, std)
    if getattr(layer, "bias", None) is not None:
        nn.init.constant_(layer.bias, bias)
    return layer


# ---------------------------------------------------------------- action heads


class DiscreteHead(nn.Module):
    """One categorical distribution per dimension of a flat ``MultiDiscrete([n0, n1, ...])``.

    ``params`` are logits ``(B, sum(nvec))``; actions are ``int64 (B, len(nvec))``.
    """

    def __init__(self, in_features: int, nvec: np.ndarray):
        super().__init__()
        self.nvec = [int(n) for n in np.asarray(nvec).ravel()]
        if not self.nvec or min(self.nvec) < 1:
            raise APIUsageError(f"DiscreteHead needs at least one dimension, each with >= 1 choice, got nvec {nvec!r}")
        self.num_logits = sum(self.nvec)
        self.linear = layer_init(nn.Linear(in_features, self.num_logits), std=0.01)
        # All dimensions of one size: one (B, D, n) tensor instead of a loop over dimensions.
        self.uniform = len(set(self.nvec)) == 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def _dimensions(self, values: torch.Tensor) -> list[torch.Tensor]:
        """``(B, sum(nvec))`` values per dimension: one (B, D, n) view when all dimensions have n choices, else
        (B, n) each."""
        if self.uniform:
            return [values.view(values.shape[0], len(self.nvec), self.nvec[0])]
        return list(values.split(self.nvec, dim=-1))

    def _log_probs(self, logits: torch.Tensor) -> list[torch.Tensor]:
        return [torch.log_softmax(part, dim=-1) for part in self._dimensions(logits)]

    @staticmethod
    def _entropy(log_p: torch.Tensor) -> torch.Tensor:
        """``-sum(p log p)`` over the last axis. A masked action (logit -inf) adds 0, as in torch's Categorical:
        its log p is clamped to the lowest float, since 0 * -inf would be NaN."""
        return -(log_p.exp() * log_p.clamp_min(torch.finfo(log_p.dtype).min)).sum(-1)

    def _input_error(self, logits: Any, actions: Any = None) -> APIUsageError:
        expected = f"float logits (B, {self.num_logits}) (nvec {self.nvec})"
        got = f"logits {_described(logits)}"
        if actions is not None:
            expected += f" and integer actions (B, {len(self.nvec)})"
            got += f" and actions {_described(actions)}"
        return APIUsageError(f"DiscreteHead: expected torch tensors, {expected}, got {got}")

    def _check_range(self, actions: torch.Tensor, error: RuntimeError) -> None:
        """APIUsageError from ``error`` if an action is out of its dimension's range."""
        bad = ((actions < 0) | (actions >= torch.as_tensor(self.nvec, device=actions.device))).nonzero()
        if len(bad):
            row, dim = bad[0].tolist()
            raise APIUsageError(f"DiscreteHead: actions must be integers from 0 to n - 1 in each dimension of nvec "
                                f"{self.nvec}, got {actions[row, dim].item()} in row {row}, dimension {dim}") from error

    def sample(self, logits: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(actions (B, D) int64, log-probability (B,))."""
        if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[1] == self.num_logits
                and logits.is_floating_point()):
            raise self._input_error(logits)
        batch = logits.shape[0]
        actions, logprob = [], None
        if not deterministic:
            # Gumbel-max, argmax(log p - log E) with E ~ Exp(1): cheaper than torch.multinomial here. Drawn for
            # the whole (B, sum(nvec)) at once, row after row, so a batch acted on in two halves draws the same.
            noise = torch.empty_like(logits).exponential_().clamp_min_(torch.finfo(logits.dtype).tiny).log()
            noises = self._dimensions(noise)
        for dim, log_p in enumerate(self._log_probs(logits)):
            chosen = log_p.argmax(-1) if deterministic else (log_p - noises[dim]).argmax(-1)
            taken = log_p.gather(-1, chosen.unsqueeze(-1)).reshape(batch, -1).sum(-1)
            logprob = taken if logprob is None else logprob + taken
            actions.append(chosen.reshape(batch, -1))
        return (actions[0] if len(actions) == 1 else torch.cat(actions, dim=-1)), logprob

    def evaluate(self, logits: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability (B,), entropy (B,)) of ``actions (B, D)``, each from 0 to its ``n - 1``.

        An action out of that range is an APIUsageError on the CPU; on a GPU, torch's indexing asserts.
        """
        if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[1] == self.num_logits
                and logits.is_floating_point() and isinstance(actions, torch.Tensor)
                and actions.shape == (logits.shape[0], len(self.nvec))
                and not (actions.is_floating_point() or actions.is_complex())):  # floats would be truncated
            raise self._input_error(logits, actions)
        batch = logits.shape[0]
        try:
            if self.uniform:  # the common case in as few ops as possible: this runs in every gradient step
                log_p = self._log_probs(logits)[0]  # (B, D, n)
                logprob = log_p.gather(-1, actions.long().unsqueeze(-1)).view(batch, -1).sum(-1)
                entropy = self._entropy(log_p).sum(-1)
                return logprob, entropy
            logprob = entropy = 0
            for dim, log_p in enumerate(self._log_probs(logits)):  # (B, n) per dimension
                logprob = logprob + log_p.gather(-1, actions[:, dim:dim + 1].long()).squeeze(-1)
                entropy = entropy + self._entropy(log_p)
            return logprob, entropy
        except RuntimeError as error:  # gather's "index 5 is out of bounds"
            self._check_range(actions, error)
            raise


class GaussianHead(nn.Module):
    """A diagonal Gaussian over a flat ``Box``: a linear mean and a learned, state-independent log std.

    Both are in units of half the space's width around its centre where its bounds (``low``, ``high``)
    are finite and at most ``UNSCALED_WIDTH`` apart, so the first policy spreads its actions over the
    whole range whatever the bounds (``Box(10, 20)`` as ``Box(-1, 1)``); elsewhere in the space's own
    units, around 0. ``params`` are the linear layer's outputs ``(B, D)``; actions are float ``(B, D)``
    in the space's units, unclipped (the trainer clips to the bounds before sending them to the env).
    """

    UNSCALED_WIDTH = 2e6  # wider bounds stand for "none" (e.g. float32's largest): a unit there is the space's own

    def __init__(self, in_features: int, size: int, low: Any = None, high: Any = None):
        super().__init__()
        if not (is_int(size) and size >= 1):
            raise APIUsageError(f"GaussianHead needs at least one action value, got size {size!r}")
        self.size = size
        self.linear = layer_init(nn.Linear(in_features, size), std=0.01)
        self.log_std = nn.Parameter(torch.zeros(size))
        center, scale = np.zeros(size), np.ones(size)
        if low is not None and high is not None:
            low, high = (np.broadcast_to(np.asarray(bound, np.float64), (size,)) for bound in (low, high))
            with np.errstate(invalid="ignore", over="ignore"):
                width = high - low
            bounded = np.isfinite(width) & (width > 0) & (width <= self.UNSCALED_WIDTH)
            center[bounded] = (low[bounded] + high[bounded]) / 2
            scale[bounded] = width[bounded] / 2
        self.register_buffer("center", torch.as_tensor(center, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        # A checkpoint from before the head scaled its actions holds no center and scale: its weights were
        # trained in the space's own units around 0, so they act as they were trained.
        if prefix + "center" not in state_dict and prefix + "log_std" in state_dict:
            state_dict[prefix + "center"] = torch.zeros_like(self.center)
            state_dict[prefix + "scale"] = torch.ones_like(self.scale)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def _log_prob(self, mean: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The log-density of ``actions`` (in the space's units), from how many standard deviations each lies
        from the mean: from the actions themselves, as stored, so sampling and evaluating agree exactly."""
        z = ((actions - self.center) / self.scale - mean) * torch.exp(-self.log_std)
        spread = self.log_std.sum() + self.scale.log().sum() + 0.5 * math.log(2 * math.pi) * self.size
        return -0.5 * z.pow(2).sum(-1) - spread

    def _input_error(self, mean: Any, actions: Any = None) -> APIUsageError:
        expected = f"float means (B, {self.size})" + ("" if actions is None else " and float actions of that shape")
        got = f"means {_described(mean)}" + ("" if actions is None else f" and actions {_described(actions)}")
        return APIUsageError(f"GaussianHead: expected torch tensors, {expected}, got {got}")

    def sample(self, mean: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(actions (B, D), log-probability (B,))."""
        if not (isinstance(mean, torch.Tensor) and mean.dim() == 2 and mean.shape[1] == self.size
                and mean.is_floating_point()):
            raise self._input_error(mean)
        noise = 0 if deterministic else torch.randn_like(mean) * self.log_std.exp()
        actions = self.center + self.scale * (mean + noise)
        return actions, self._log_prob(mean, actions)

    def evaluate(self, mean: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability (B,), entropy (B,)) of ``actions (B, D)``."""
        if not (isinstance(mean, torch.Tensor) and mean.dim() == 2 and mean.shape[1] == self.size
                and mean.is_floating_point() and isinstance(actions, torch.Tensor) and actions.shape == mean.shape
                and actions.is_floating_point()):
            raise self._input_error(mean, actions)
        entropy = (0.5 + 0.5 * math.log(2 * math.pi) + self.log_std + self.scale.log()).sum().expand(len(mean))
        return self._log_prob(mean, actions), entropy


@functools.singledispatch
def make_action_head(space: spaces.Space, in_features: int) -> nn.Module:
    """The action head for a flat action space (``binding.single_action_space``)."""
    raise SpaceError(f"no action head for {space!r}: expected a flat MultiDiscrete or Box action space")


@make_action_head.register(spaces.MultiDiscrete)
def _(space: spaces.MultiDiscrete, in_features: int) -> nn.Module:
    return DiscreteHead(in_features, space.nvec)


@make_action_head.register(spaces.Discrete)
def _(space: spaces.Discrete, in_features: int) -> nn.Module:
    return DiscreteHead(in_features, np.array([space.n]))


@make_action_head.register(spaces.Box)
def _(space: spaces.Box, in_features: int) -> nn.Module:
    return GaussianHead(in_features, int(np.prod(space.shape)), space.low.ravel(), space.high.ravel())


# ---------------------------------------------------------------- policies


class Policy(nn.Module):
    """Base class: subclasses implement :meth:`encode`; the base supplies the heads.

    Args:
        binding: the env's binding (for spaces and ``unflatten_observation``).
        feature_size: the width of what :meth:`encode` returns.
    """

    is_recurrent = False

    def __init__(self, binding, feature_size: int):
        super().__init__()
        if not isinstance(binding, Binding):
            raise APIUsageError(f"{type(self).__name__} needs the env's shoal.Binding (for its spaces), got "
                                f"{type(binding).__name__}")
        check_int(f"{type(self).__name__}: feature_size", feature_size)
        self.binding = binding
        self.feature_size = feature_size
        self.obs_size = int(np.prod(binding.single_observation_space.shape))
        self.action_head = make_action_head(binding.single_action_space, feature_size)
        self.value_head = layer_init(nn.Linear(feature_size, 1), std=1.0)

    def _obs_error(self, obs: Any, shapes: str = "(B, obs_size)") -> APIUsageError:
        hint = ""
        if isinstance(obs, np.ndarray):
            hint = ": convert it with torch.as_tensor(obs)"
        elif isinstance(obs, torch.Tensor) and tuple(obs.shape) == (self.obs_size,):
            hint = ": one observation needs a batch dimension, obs[None]"
        return APIUsageError(f"{type(self).__name__}: obs must be a torch tensor of shape {shapes} with "
                             f"obs_size={self.obs_size} ({self.binding.env_name}'s flat observations), got one "
                             f"{_described(obs)}{hint}")

    def unflatten(self, obs: torch.Tensor) -> Any:
        """The nested observation behind flat ``obs (B, obs_size)``: dicts/tuples of tensor views."""
        try:
            return self.binding.unflatten_observation(obs)
        except SpaceError as error:  # the caller's observations, not a space: a mistake in the call
            raise APIUsageError(f"{type(self).__name__}: {error} (the binding's flat observations)") from None

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """Flat observations ``(B, obs_size)`` -> features ``(B, feature_size)``."""
        raise NotImplementedError

    def decode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features -> (action parameters, value ``(B,)``)."""
        return self.action_head(features), self.value_head(features).squeeze(-1)

    def forward(self, obs: torch.Tensor, state: State | None = None, starts: torch.Tensor | None = None):
        """``obs (B, obs_size)`` -> (action parameters, value ``(B,)``, state (None: not recurrent))."""
        if not (isinstance(obs, torch.Tensor) and obs.dim() == 2 and obs.shape[1] == self.obs_size):
            raise self._obs_error(obs)
        params, value = self.decode(self.encode(obs))
        return params, value, None

    def acting_forward(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``obs (B, obs_size) -> (action parameters, value (B,))`` for acting (no gradients needed).

        A snapshot of the parameters: the trainer takes a new one for each rollout and calls it under
        ``torch.inference_mode``. A policy may precompute something here to act faster
        (:class:`MLPPolicy` fuses its two towers).
        """
        return lambda obs: self(obs)[:2]

    def sample_actions(self, params: torch.Tensor, deterministic: bool = False):
        """(actions, log-probability ``(B,)``) from the action parameters."""
        return self.action_head.sample(params, deterministic)

    def evaluate_actions(self, params: torch.Tensor, actions: torch.Tensor):
        """(log-probability ``(B,)``, entropy ``(B,)``) of given actions."""
        return self.action_head.evaluate(params, actions)


def _is_byte_buffer(binding) -> bool:
    """Whether the binding's flat observation is a byte buffer of leaves of different dtypes, not numbers
    (MLPPolicy cannot read it; MixedPolicy unflattens it)."""
    return len({field.dtype for field in binding.obs_layout.fields}) > 1


class MLPPolicy(Policy):
    """Separate actor and critic MLPs (tanh) over a flat vector observation, as in CleanRL's ``ppo.py``.

    ``encode`` returns both towers' outputs side by side ``(B, 2 * hidden_size)``; ``decode`` reads
    the actor half for the action head and the critic half for the value. Refuses an observation whose
    leaves have different dtypes: its flat form is a byte buffer, not numbers (:class:`MixedPolicy` reads it).
    """

    def __init__(self, binding, hidden_size: int = 64, num_layers: int = 2):
        check_int("MLPPolicy: hidden_size", hidden_size)
        check_int("MLPPolicy: num_layers", num_layers)
        super().__init__(binding, feature_size=2 * hidden_size)
        if _is_byte_buffer(binding):
            raise SpaceError(f"MLPPolicy (policy kind 'mlp') reads the flat observation as numbers; "
                             f"{binding.env_name}'s is a byte buffer of mixed-dtype leaves "
                             f"({binding.raw_single_observation_space}): use MixedPolicy (kind 'mixed'), which "
                             f"unflattens it")

        def tower() -> nn.Sequential:
            layers, width = [], self.obs_size
            for _ in range(num_layers):
                layers += [layer_init(nn.Linear(width, hidden_size)), nn.Tanh()]
                width = hidden_size
            return nn.Sequential(*layers)

        self.hidden_size = hidden_size
        self.actor, self.critic = tower(), tower()
        # The (actor, critic) Linear pairs, layer by layer, for forward (a plain tuple: not registered twice).
        self._layer_pairs = tuple(zip(self.actor[::2], self.critic[::2]))
        self.action_head = make_action_head(binding.single_action_space, hidden_size)
        self.value_head = layer_init(nn.Linear(hidden_size, 1), std=1.0)
        # The fast forwards below copy encode and decode: a subclass that overrides either gets Policy's.
        self._fused = type(self).encode is MLPPolicy.encode and type(self).decode is MLPPolicy.decode

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float()
        return torch.cat([self.actor(x), self.critic(x)], dim=-1)

    def decode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        actor, critic = features.split(self.hidden_size, dim=-1)
        return self.action_head(actor), self.value_head(critic).squeeze(-1)

    def forward(self, obs: torch.Tensor, state=None, starts=None):
        # decode(encode(obs)) without joining and splitting the towers, and with plain function calls:
        # at these sizes an nn.Module call costs more than its math, and this runs once per env step.
        if not self._fused:
            return super().forward(obs, state, starts)
        if not (isinstance(obs, torch.Tensor) and obs.dim() == 2 and obs.shape[1] == self.obs_size):
            raise self._obs_error(obs)
        actor = critic = obs.float()
        for actor_layer, critic_layer in self._layer_pairs:
            actor = torch.tanh(F.linear(actor, actor_layer.weight, actor_layer.bias))
            critic = torch.tanh(F.linear(critic, critic_layer.weight, critic_layer.bias))
        head, value = self.action_head.linear, self.value_head
        return F.linear(actor, head.weight, head.bias), F.linear(critic, value.weight, value.bias).squeeze(-1), None

    @torch.no_grad()
    def acting_forward(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        if not self._fused or type(self).forward is not MLPPolicy.forward:  # a forward of its own acts, too
            return super().acting_forward()
        # Both towers as one network, one matmul per layer: the first layer's weights stacked
        # (2h, in), the others block-diagonal (2h, 2h), the heads block-diagonal (params + 1, 2h).
        # Acting runs on a few rows per env step, where a matmul costs its call, not its size.
        pairs = [(a.weight, c.weight, a.bias, c.bias) for a, c in self._layer_pairs]
        pairs.append((self.action_head.linear.weight, self.value_head.weight, self.action_head.linear.bias,
                      self.value_head.bias))
        layers = [(torch.cat(pairs[0][:2]), torch.cat(pairs[0][2:]))]
        layers += [(torch.block_diag(a, c), torch.cat([a_bias, c_bias])) for a, c, a_bias, c_bias in pairs[1:]]
        *hidden, (head_weight, head_bias) = layers

        def act(obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if not (isinstance(obs, torch.Tensor) and obs.dim() == 2 and obs.shape[1] == self.obs_size):
                raise self._obs_error(obs)
            x = obs.float()
            for weight, bias in hidden:
                x = torch.tanh(F.linear(x, weight, bias))
            out = F.linear(x, head_weight, head_bias)  # (B, params + 1): the value is the last column
            return out[:, :-1], out[:, -1]

        return act


class NatureCNN(Policy):
    """The Nature-DQN convolutional network for stacked frames, ``uint8`` scaled to [0, 1].

    Reads the raw observation as ``(C, H, W)`` (channels first, e.g. 4 stacked 84x84 frames) or
    ``(H, W, C)`` (``channels_last``; by default where the last axis is shorter than the first, e.g.
    84x84x4 or 64x64x6); a 2-D ``(H, W)`` frame gets one channel. Frames need at least 36x36 pixels.
    The raw observation space must be a ``Box`` of 2 or 3 dimensions, else a SpaceError.
    """

    def __init__(self, binding, hidden_size: int = 512, channels_last: bool | None = None):
        check_int("NatureCNN: hidden_size", hidden_size)
        if channels_last is not None and not isinstance(channels_last, (bool, np.bool_)):
            raise APIUsageError(f"NatureCNN: channels_last must be True, False or None (read from the frame's "
                                f"shape), got {channels_last!r}")
        super().__init__(binding, feature_size=hidden_size)
        space = binding.raw_single_observation_space
        if not (isinstance(space, spaces.Box) and len(space.shape) in (2, 3)):
            instead = ("MixedPolicy (kind 'mixed'), which reads each leaf of a nested observation"
                       if _is_byte_buffer(binding) else "MLPPolicy or MixedPolicy (kind 'mlp' or 'mixed')")
            raise SpaceError(f"NatureCNN (policy kind 'cnn') reads frames, a Box of 2 or 3 dimensions; "
                             f"{binding.env_name}'s observation space is {space}: use {instead}")
        shape = space.shape
        if channels_last and len(shape) == 2:
            raise APIUsageError(f"NatureCNN: channels_last=True reads (H, W, C) frames; {binding.env_name}'s are "
                                f"(H, W) = {shape}, one channel: leave channels_last out")
        self.channels_last, self.chw = _frame_layout(shape, channels_last)
        chw = self.chw
        if min(chw[1:]) < 36:  # its three convolutions shrink 36 pixels to 1
            raise SpaceError(f"NatureCNN needs frames of at least 36x36 pixels; {binding.env_name}'s observations "
                             f"read as {chw[0]} channels of {chw[1]}x{chw[2]}: use policy kind 'mixed' or 'mlp'"
                             f"{'' if len(shape) == 2 else ', or pass channels_last'}")
        self.scale = 1 / 255 if space.dtype == np.uint8 else 1.0
        self.convs = nn.Sequential(
            layer_init(nn.Conv2d(chw[0], 32, 8, stride=4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            conv_size = self.convs(torch.zeros(1, *chw)).shape[1]
        self.linear = nn.Sequential(layer_init(nn.Linear(conv_size, hidden_size)), nn.ReLU())

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        frames = self.unflatten(obs)  # (B, *raw shape), a view
        if self.channels_last:
            frames = frames.permute(0, 3, 1, 2)
        frames = frames.reshape(len(obs), *self.chw).float() * self.scale  # (B, C, H, W)
        return self.linear(self.convs(frames))


# ---------------------------------------------------------------- nested observations


@functools.singledispatch
def leaf_width(space: spaces.Space) -> int:
    """How many floats :func:`leaf_features` makes of one observation leaf."""
    raise SpaceError(f"no features for observation leaf {space!r}")


@leaf_width.register(spaces.Box)
@leaf_width.register(spaces.MultiBinary)
def _(space) -> int:
    return int(np.prod(space.shape))


@leaf_width.register(spaces.Discrete)
def _(space: spaces.Discrete) -> int:
    return int(space.n)


@leaf_width.register(spaces.MultiDiscrete)
def _(space: spaces.MultiDiscrete) -> int:
    return int(space.nvec.sum())


@functools.singledispatch
def leaf_features(space: spaces.Space, value: torch.Tensor) -> torch.Tensor:
    """One observation leaf ``(B, *leaf shape)`` -> floats ``(B, leaf_width(space))``.

    Box: as floats (``uint8`` scaled to [0, 1]); Discrete / MultiDiscrete: one-hot;
    MultiBinary: 0/1 floats.
    """
    raise SpaceError(f"no features for observation leaf {space!r}")


@leaf_features.register(spaces.Box)
def _(space: spaces.Box, value: torch.Tensor) -> torch.Tensor:
    x = value.reshape(len(value), -1).float()
    return x / 255 if space.dtype == np.uint8 else x


@leaf_features.register(spaces.MultiBinary)
def _(space: spaces.MultiBinary, value: torch.Tensor) -> torch.Tensor:
    return value.reshape(len(value), -1).float()


@leaf_features.register(spaces.Discrete)
def _(space: spaces.Discrete, value: torch.Tensor) -> torch.Tensor:
    index = (value.reshape(len(value)).long() - int(space.start)).clamp(0, int(space.n) - 1)
    return nn.functional.one_hot(index, int(space.n)).float()


@leaf_features.register(spaces.MultiDiscrete)
def _(space: spaces.MultiDiscrete, value: torch.Tensor) -> torch.Tensor:
    # int64 in native byte order: torch promotes no unsigned dtype but uint8, and takes no big-endian array
    nvec = torch.as_tensor(space.nvec.ravel().astype(np.int64), device=value.device)
    start = torch.as_tensor(np.broadcast_to(space.start, space.shape).ravel().astype(np.int64), device=value.device)
    offsets = torch.cumsum(nvec, 0) - nvec  # where each dimension's one-hot block begins
    index = torch.minimum((value.reshape(len(value), -1).long() - start).clamp(min=0), nvec - 1) + offsets
    out = torch.zeros(len(value), int(nvec.sum()), device=value.device)
    return out.scatter_(1, index, 1.0)


class MixedPolicy(Policy):
    """For nested or discrete observations: unflatten, turn every leaf into floats, then an MLP.

    Raw bytes never enter a layer: a mixed-dtype observation is read leaf by leaf through typed
    views, discrete leaves become one-hot vectors, images are scaled to [0, 1].
    """

    def __init__(self, binding, hidden_size: int = 128, num_layers: int = 2):
        check_int("MixedPolicy: hidden_size", hidden_size)
        check_int("MixedPolicy: num_layers", num_layers)
        super().__init__(binding, feature_size=hidden_size)
        self.leaves = leaves(binding.raw_single_observation_space)
        width = sum(leaf_width(leaf.space) for leaf in self.leaves)
        layers = []
        for _ in range(num_layers):
            layers += [layer_init(nn.Linear(width, hidden_size)), nn.ReLU()]
            width = hidden_size
        self.mlp = nn.Sequential(*layers)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        nested = self.unflatten(obs)
        parts = []
        for leaf in self.leaves:
            value = nested
            for key in leaf.path:
                value = value[key]
            parts.append(leaf_features(leaf.space, value))
        return self.mlp(torch.cat(parts, dim=-1))


# ---------------------------------------------------------------- recurrence


class LSTMPolicy(Policy):
    """Any policy with an LSTM between its ``encode`` and ``decode``.

    ``state`` is ``(h, c)``, each ``(B, feature_size)`` (not ``nn.LSTM``'s ``(1, B, feature_size)``).
    ``starts (B,)`` or ``(T, B)`` marks rows whose observation begins a new episode for that agent: their
    state is zeroed before the step. ``starts`` is bool, or numbers such as CleanRL's float ``dones``,
    where any nonzero value marks a start.
    """

    is_recurrent = True

    def __init__(self, policy: Policy):
        nn.Module.__init__(self)
        if not isinstance(policy, Policy):
            raise APIUsageError(f"LSTMPolicy wraps a shoal.policy.Policy (it reads its encode, decode and "
                                f"feature_size), got {type(policy).__name__}")
        if policy.is_recurrent:  # its encode and decode skip its own recurrence, which would never run
            raise APIUsageError(f"LSTMPolicy wraps a policy without recurrence, got {type(policy).__name__}, which "
                                f"is recurrent already: use it as it is (default_policy(..., lstm=True) is one "
                                f"LSTMPolicy)")
        kind = type(policy)
        forward_from = next(cls for cls in kind.__mro__ if "forward" in vars(cls))
        if forward_from.__module__ != __name__ or kind.encode is Policy.encode:  # shoal's own forwards are fast copies
            raise APIUsageError(f"LSTMPolicy runs the wrapped policy's encode(obs) -> features and decode(features) "
                                f"-> (action parameters, value), never its forward: {kind.__name__} must define encode "
                                f"(decode has a default) and no forward of its own (put what its forward does into "
                                f"them)")
        self.binding = policy.binding
        self.policy = policy
        self.feature_size = policy.feature_size
        self.obs_size = policy.obs_size
        self.lstm = nn.LSTM(policy.feature_size, policy.feature_size)
        for name, param in self.lstm.named_parameters():
            if "bias" in name:
                nn.init.constant_(param, 0)
            else:
                nn.init.orthogonal_(param, 1.0)

    @property
    def action_head(self) -> nn.Module:
        return self.policy.action_head

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """Zero ``(h, c)`` for ``batch_size`` rows, of the LSTM's dtype."""
        check_int("LSTMPolicy.initial_state: batch_size", batch_size)
        try:
            zeros = torch.zeros(batch_size, self.feature_size, device=device, dtype=self.lstm.weight_hh_l0.dtype)
        except (RuntimeError, TypeError, AssertionError) as error:  # torch's kinds for a bad or absent device
            raise APIUsageError(f"LSTMPolicy.initial_state: device {device!r} is not a torch device this process "
                                f"can use ({str(error).splitlines()[0]}): expected e.g. 'cpu' or 'cuda'") from None
        return zeros, zeros.clone()

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy.encode(obs)

    def decode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy.decode(features)

    def forward(self, obs: torch.Tensor, state: State | None = None, starts: torch.Tensor | None = None,
                counted: torch.Tensor | None = None):
        """One step, ``obs (B, obs_size)``, or a sequence, ``obs (T, B, obs_size)`` with ``starts (T, B)``.

        ``counted`` (bool, shaped as ``starts``) marks the rows whose outputs are used: only they are
        encoded (the trainer passes it, so that the wrapped ``encode``, a batch norm's statistics say,
        never sees a dead slot's row). The others get zero features: their outputs mean nothing, nor do
        those of the rows after them until the next start.
        Returns (action parameters, values, state); a sequence's outputs are flattened to ``(T * B, ...)``.
        """
        if not (isinstance(obs, torch.Tensor) and 2 <= obs.dim() <= 3 and obs.shape[-1] == self.obs_size):
            raise self._obs_error(obs, "(B, obs_size) or (T, B, obs_size)")
        sequence = obs.dim() == 3
        steps, batch = (obs.shape[0], obs.shape[1]) if sequence else (1, obs.shape[0])
        if state is not None and not (isinstance(state, tuple) and len(state) == 2
                                      and isinstance(state[0], torch.Tensor) and isinstance(state[1], torch.Tensor)
                                      and state[0].shape == state[1].shape == (batch, self.feature_size)
                                      and state[0].dtype == state[1].dtype == self.lstm.weight_hh_l0.dtype):
            raise self._state_error(state, batch)
        if starts is None:
            starts = torch.zeros(steps, batch, dtype=torch.bool, device=obs.device)
        elif not (isinstance(starts, torch.Tensor) and starts.shape == obs.shape[:-1]):
            raise APIUsageError(f"LSTMPolicy: starts must be a torch tensor of shape {tuple(obs.shape[:-1])}, one "
                                f"per observation, got one {_described(starts)}")
        elif starts.dtype != torch.bool:
            starts = starts != 0
        if counted is not None and not (isinstance(counted, torch.Tensor) and counted.shape == obs.shape[:-1]
                                        and counted.dtype == torch.bool):
            raise APIUsageError(f"LSTMPolicy: counted must be a bool torch tensor of shape {tuple(obs.shape[:-1])}, "
                                f"one per observation, got one {_described(counted)}")
        starts = starts.view(steps, batch, 1)
        obs = obs.reshape(steps * batch, -1)
        if counted is None:
            features = self.policy.encode(obs)
        else:
            rows = counted.reshape(-1).nonzero().squeeze(1)
            encoded = self.policy.encode(obs[rows])
            features = encoded.new_zeros(steps * batch, encoded.shape[-1]).index_copy(0, rows, encoded)
        features = features.view(steps, batch, -1)
        if state is None:
            state = self.initial_state(batch, obs.device)
        if steps == 1:  # acting: the cell function itself, without nn.LSTM's ~0.2 ms of per-call checks
            # torch.where, not a product: a zeroed state must not carry NaN from a garbage row.
            h, c = (torch.where(starts[0], 0.0, part) for part in state)
            h, c = torch.lstm_cell(features[0], (h, c), *self.lstm.all_weights[0])
            params, value = self.policy.decode(h)
            return params, value, (h, c)
        # One LSTM call (its own loop over steps, in C++) for each stretch of steps in which no row begins
        # an episode; at a stretch's first step the state of the rows that begin one is zeroed.
        cuts = (torch.nonzero(starts[1:, :, 0].any(1)).flatten() + 1).tolist()
        h, c = state[0][None], state[1][None]  # (1, B, feature_size): one layer
        hidden = []
        for first, end in zip([0, *cuts], [*cuts, steps]):
            h = torch.where(starts[first], 0.0, h)
            c = torch.where(starts[first], 0.0, c)
            out, (h, c) = self.lstm(features[first:end], (h, c))
            hidden.append(out)
        params, value = self.policy.decode(torch.cat(hidden).view(steps * batch, -1))
        return params, value, (h[0], c[0])

    def _state_error(self, state: Any, batch: int) -> APIUsageError:
        parts = state if isinstance(state, tuple) and len(state) == 2 else None

        got = type(state).__name__ if parts is None else f"h {_described(parts[0])} and c {_described(parts[1])}"
        hint = ""
        if parts is not None and all(isinstance(part, torch.Tensor) and part.dim() == 3 for part in parts):
            hint = ": that is nn.LSTM's (num_layers, B, feature_size) layout, pass (h[0], c[0])"
        dtype = self.lstm.weight_hh_l0.dtype
        return APIUsageError(f"LSTMPolicy: state must be a tuple (h, c) as initial_state returns, each a {dtype} "
                             f"tensor of shape (B, feature_size) = ({batch}, {self.feature_size}) for {batch} "
                             f"observations, got {got}{hint}")


# ---------------------------------------------------------------- defaults


def other_leaves(own: Any, binding: Binding) -> str | None:
    """Where binding ``own`` has other observation leaves than ``binding`` in the same flat bytes (an int64 leaf
    where ``binding`` has a float64 one), ``"{own}, whose observation leaves are not {binding}'s (the first
    difference)"``; else None."""
    if not isinstance(own, Binding) or own is binding:
        return None
    theirs, ours = (leaf_signature(b.raw_single_observation_space) for b in (own, binding))
    if theirs == ours:
        return None
    return (f"{own.env_name}, whose observation leaves are not {binding.env_name}'s "
            f"({leaf_difference(theirs, ours)})")


def check_policy(policy: Any, binding) -> None:
    """APIUsageError unless ``policy`` is a :class:`Policy` whose actions fit ``binding``'s action space.

    Runs it once on two zero observations, in eval mode (batch statistics stay as they are) and outside
    inference mode: this also sets up lazy modules (``nn.LazyLinear``) before an optimizer is given their
    parameters.
    """
    if not isinstance(policy, Policy):
        raise APIUsageError(f"policy must be a shoal.policy.Policy (subclass it and write encode; see 'Your own "
                            f"policy' in docs/training.md), got {type(policy).__name__}")
    space, name = binding.single_action_space, type(policy).__name__
    own = getattr(policy, "binding", None)
    for kind in ("observation", "action"):
        theirs = getattr(own, f"single_{kind}_space", None)
        if theirs is not None and theirs != getattr(binding, f"single_{kind}_space"):
            raise APIUsageError(f"{name} was built for {own.env_name}, whose flat {kind} space {theirs} is not "
                                f"{binding.env_name}'s {getattr(binding, f'single_{kind}_space')}: build it with "
                                f"this binding")
    mismatch = other_leaves(own, binding)
    if mismatch:
        raise APIUsageError(f"{name} was built for {mismatch}: build it with this binding")
    discrete = isinstance(space, spaces.MultiDiscrete)
    device = next(iter(policy.parameters()), torch.empty(0)).device
    try:
        obs = torch.zeros((2, *binding.single_observation_space.shape),
                          dtype=torch_dtype(binding.single_observation_space.dtype), device=device)
    except SpaceError as error:
        raise APIUsageError(f"{name} cannot read {binding.env_name}'s observations: {error}") from None
    was_training = policy.training
    try:
        policy.eval()
        with torch.no_grad():
            if policy.is_recurrent:
                params, value = _recurrent_outputs(policy, obs, device)
            else:
                params, value, _ = policy(obs)
            for what, output in (("action parameters", params), ("values", value)):
                if not (isinstance(output, torch.Tensor) and output.is_floating_point()):
                    got = f"of dtype {output.dtype}" if isinstance(output, torch.Tensor) else _described(output)
                    raise APIUsageError(f"{name} returns {what} {got}: expected a floating-point torch tensor (the "
                                        f"losses need their gradients; from integers the network would never learn)")
            action, logprob = policy.sample_actions(params, deterministic=True)
            evaluated = policy.evaluate_actions(params, action)
            acted = None if policy.is_recurrent else policy.acting_forward()(obs)
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as error:
        raise APIUsageError(f"{name} fails on two zero observations of {binding.env_name} (shape "
                            f"{tuple(obs.shape)}, {obs.dtype}): {type(error).__name__}: {error}") from error
    finally:
        policy.train(was_training)
    if len(params) != 2 or tuple(value.shape) != (2,):
        raise APIUsageError(f"{name} returns action parameters of shape {tuple(params.shape)} and values of shape "
                            f"{tuple(value.shape)} for 2 observations: expected one row of each per observation, "
                            f"values of shape (2,)")
    if acted is not None:  # an acting_forward of its own must agree with forward
        if not (isinstance(acted, tuple) and len(acted) == 2):
            got = f"a tuple of {len(acted)}" if isinstance(acted, tuple) else f"a value {_described(acted)}"
            raise APIUsageError(f"{name}.acting_forward() gives a function that returns {got} for 2 observations: "
                                f"expected (action parameters, values), as forward's first two outputs")
        for what, mine, theirs in (("action parameters", acted[0], params), ("values", acted[1], value)):
            if not (isinstance(mine, torch.Tensor) and mine.is_floating_point() and mine.shape == theirs.shape):
                raise APIUsageError(f"{name}.acting_forward() gives {what} {_described(mine)} for 2 observations: "
                                    f"expected floating-point ones of shape {tuple(theirs.shape)}, as forward gives")
    evaluated = evaluated if isinstance(evaluated, tuple) and len(evaluated) == 2 else (evaluated, evaluated)
    for what, output in (("sample_actions() gives log-probabilities", logprob),
                         ("evaluate_actions() gives log-probabilities", evaluated[0]),
                         ("evaluate_actions() gives entropies", evaluated[1])):
        if not (isinstance(output, torch.Tensor) and output.is_floating_point() and tuple(output.shape) == (2,)):
            raise APIUsageError(f"{name}.{what} {_described(output)} for 2 observations: expected floating-point "
                                f"ones of shape (2,), one per observation")
    expected = (2, int(np.prod(space.shape)))
    head = getattr(policy, "action_head", None)
    if (tuple(action.shape) != expected or action.is_floating_point() == discrete
            or discrete and isinstance(head, DiscreteHead) and head.nvec != space.nvec.tolist()):
        chooses = f"chooses among {head.nvec}" if isinstance(head, DiscreteHead) else (
            f"gives {'float' if action.is_floating_point() else 'integer'} actions of shape {tuple(action.shape[1:])}")
        raise APIUsageError(f"{name}'s action head {chooses}: {binding.env_name}'s flat action space is {space}; "
                            f"build the policy with this binding (Policy.__init__ makes the matching head)")


def _recurrent_outputs(policy: Policy, obs: torch.Tensor, device: torch.device) -> tuple:
    """A recurrent policy's (action parameters, values) for ``obs`` (2 rows), called as the trainer calls it,
    with a state from ``initial_state`` and ``starts``; APIUsageError where its state or a replayed sequence's
    outputs do not have the form the trainer needs."""
    name = type(policy).__name__
    state_parts(policy.initial_state(3, device), 3, f"{name}.initial_state(3, {str(device)!r}) returns")
    state = policy.initial_state(2, device)  # (2 alone might be nn.LSTM's number of layers)
    before = state_parts(state, 2, f"{name}.initial_state(2, {str(device)!r}) returns")
    params, value, state = policy(obs, state, torch.ones(2, dtype=torch.bool, device=device))
    after = state_parts(state, 2, f"{name} returns, for 2 observations,")
    forms = [[(tuple(part.shape), part.dtype) for part in parts] for parts in (before, after)]
    if forms[0] != forms[1]:
        raise APIUsageError(f"{name} returns, for 2 observations, a state of (shape, dtype) {forms[1]}: expected "
                            f"those of initial_state(2), {forms[0]}")
    # The update replays sequences (T, B), outputs flattened to (T * B, ...)
    sequence = "a sequence of 3 steps of 2 observations (obs of shape (3, 2, obs_size))"
    try:
        replayed = policy(obs.expand(3, *obs.shape), policy.initial_state(2, device),
                          torch.ones(3, 2, dtype=torch.bool, device=device))[:2]
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as error:
        raise APIUsageError(f"{name} fails on {sequence}, as the update replays each slot's rollout: "
                            f"{type(error).__name__}: {error}") from error
    if not all(isinstance(output, torch.Tensor) and len(output) == 6 for output in replayed):
        raise APIUsageError(f"{name} returns, for {sequence}, action parameters and values "
                            f"{' and '.join(map(_described, replayed))}: expected 6 rows each, the sequence flattened "
                            f"to (T * B, ...), as the update replays each slot's rollout")
    return params, value


def _frame_layout(shape: tuple, channels_last: bool | None) -> tuple[bool, tuple]:
    """How :class:`NatureCNN` reads a frame of ``shape``: (channels_last, (C, H, W))."""
    if channels_last is None:  # channels are the short axis: 4 frames of 84x84, or 6 planes of 64x64
        channels_last = len(shape) == 3 and shape[2] < shape[0]
    if len(shape) == 2:
        return False, (1, *shape)
    return bool(channels_last), (shape[2], shape[0], shape[1]) if channels_last else tuple(shape)


def _is_image(space: spaces.Space) -> bool:
    """uint8 frames that :class:`NatureCNN` reads as at least 36x36 pixels, its smallest input."""
    if not isinstance(space, spaces.Box) or space.dtype != np.uint8 or len(space.shape) not in (2, 3):
        return False
    return min(_frame_layout(space.shape, None)[1][1:]) >= 36


def default_policy(binding, hidden_size: int | None = None, lstm: bool = False, kind: str = "auto") -> Policy:
    """The policy shoal picks from the binding's raw observation space.

    ``kind``: ``"auto"`` (Nature CNN for ``uint8`` frames of at least 36x36, MLP for a vector ``Box``,
    :class:`MixedPolicy` for anything nested or discrete), or one of ``"mlp"``, ``"cnn"``, ``"mixed"``.
    ``lstm=True`` wraps it in :class:`LSTMPolicy`.
    """
    if not isinstance(binding, Binding):
        raise APIUsageError(f"default_policy needs the env's shoal.Binding, got {type(binding).__name__}")
    if hidden_size is not None:
        check_int("default_policy: hidden_size", hidden_size)
    if not isinstance(lstm, (bool, np.bool_)):
        raise APIUsageError(f"default_policy: lstm must be True or False, got {lstm!r}")
    space = binding.raw_single_observation_space
    if kind == "auto":
        if _is_image(space):
            kind = "cnn"
        elif isinstance(space, spaces.Box) and space.dtype != np.uint8 or isinstance(space, spaces.MultiBinary):
            kind = "mlp"
        else:
            kind = "mixed"
    builders = {
        "mlp": lambda: MLPPolicy(binding, hidden_size or 64),
        "cnn": lambda: NatureCNN(binding, hidden_size or 512),
        "mixed": lambda: MixedPolicy(binding, hidden_size or 128),
    }
    if kind not in builders:
        raise SpaceError(f"unknown policy kind {kind!r}: expected one of auto, {', '.join(builders)}")

    def build() -> Policy:
        policy = builders[kind]()
        return LSTMPolicy(policy) if lstm else policy

    def too_big(reason: str) -> APIUsageError:
        remedy = "choose a smaller hidden_size"
        if kind == "mixed":
            wide = [leaf for leaf in leaves(space) if leaf_width(leaf.space) > 2**20]
            if wide:  # the first layer's inputs, not its width, are what does not fit
                remedy = (f"its discrete observation leaf {wide[0].space} is one-hot, {leaf_width(wide[0].space):,} "
                          f"inputs wide, each with hidden_size weights: give such a leaf as a number (a Box) with "
                          f"a feature_parser, or use a policy of your own")
        return APIUsageError(f"default_policy: the {kind} policy{' with an LSTM' if lstm else ''} of hidden_size "
                             f"{hidden_size or 'its default'} does not fit in memory ({reason}): {remedy}")

    try:
        # Sized first on the meta device, which allocates nothing: a network that the OS lets us allocate
        # but not fill would have the process killed while its weights are initialized.
        with torch.device("meta"):
            size = sum(parameter.numel() * parameter.element_size() for parameter in build().parameters())
        available = available_memory()
        if available is not None and size > available:
            raise too_big(f"{size / 2**30:,.1f} GiB of parameters, {available / 2**30:,.1f} GiB available")
        return build()
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        # torch's CPU allocator has no error type of its own; a size past int64 overflows before allocating
        if not (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in reason
                or "size calculation overflowed" in reason):
            raise
        raise too_big(f"torch: {reason}") from None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where it is not known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
