"""The trainer's optimizer: Adam and gradient-norm clipping in a few fused torch calls each (for PPO's
small networks torch's own per-call bookkeeping costs more than the arithmetic)."""

from __future__ import annotations

import math
from typing import Any

import torch

from shoal.errors import APIUsageError, is_number


def _number(what: str, value: Any, low: float, strict: bool = False) -> float:
    """``float(value)`` if it is a finite number >= ``low`` (> ``low`` if ``strict``); else APIUsageError."""
    if not (is_number(value) and math.isfinite(value)
            and (value > low if strict else value >= low)):
        raise APIUsageError(f"{what} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    return float(value)


class Adam:
    """Adam (betas 0.9, 0.999) with one step count for all parameters, as optax counts, stepping each
    device's parameters in one call of torch's fused kernel.

    ``torch.optim.Adam(fused=True)`` runs the same kernel, but its bookkeeping around it costs more than
    the math for a small network (95 against 25 us per step on the 2-core CPU), and making one imports
    ``torch._dynamo`` (1-2 s before the first step). ``state_dict`` uses torch's format, so a checkpoint
    loads into either. A parameter without a gradient in a step is left as it is.

    Args:
        parameters: the tensors to optimise, e.g. ``model.parameters()`` (one learning rate for all:
            no parameter groups).
        lr: the learning rate, a finite number >= 0; set ``optimizer.lr`` to change it between steps.
        eps: added to the denominator, a finite number >= 0.
    """

    def __init__(self, parameters, lr: float, eps: float = 1e-5):
        if isinstance(parameters, torch.Tensor) or (isinstance(parameters, torch.nn.Module)
                                                    and not isinstance(parameters, torch.nn.ParameterList)):
            what = "a tensor: pass [tensor]" if isinstance(parameters, torch.Tensor) else (
                f"the module {type(parameters).__name__} itself: pass model.parameters()")
            raise APIUsageError(f"Adam takes an iterable of parameter tensors, got {what}")
        try:
            self.parameters = list(parameters)
        except TypeError as error:
            raise APIUsageError(f"Adam takes an iterable of parameter tensors, e.g. model.parameters(), got "
                                f"{type(parameters).__name__}") from error
        wrong = next((p for p in self.parameters if not isinstance(p, torch.Tensor)), None)
        if not self.parameters or wrong is not None:
            got = "no parameters (an iterator already used up?)" if not self.parameters else (
                f"a {type(wrong).__name__} among them (parameter groups as dicts are not supported)")
            raise APIUsageError(f"Adam takes an iterable of parameter tensors, e.g. model.parameters(), got {got}")
        self.lr = lr
        self.eps, self.betas = _number("Adam: eps", eps, 0.0), (0.9, 0.999)
        self.count = 0
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.parameters]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.parameters]
        self.groups: dict[tuple, list[int]] = {}  # (device, dtype) -> indices: the kernel takes one of each
        for index, parameter in enumerate(self.parameters):
            self.groups.setdefault((parameter.device, parameter.dtype), []).append(index)
        self.steps = {key: torch.zeros((), dtype=torch.float32, device=key[0]) for key in self.groups}

    @property
    def lr(self) -> float:
        """The learning rate of the next steps; the trainer sets it once per update (annealing)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _number("Adam: lr", value, 0.0)

    def step(self) -> None:
        """One Adam step of every parameter that has a gradient."""
        self.count += 1
        for key, indices in self.groups.items():
            have = [i for i in indices if self.parameters[i].grad is not None]
            if not have:
                continue
            step = self.steps[key].fill_(self.count)
            torch._fused_adam_([self.parameters[i] for i in have], [self.parameters[i].grad for i in have],
                               [self.exp_avgs[i] for i in have], [self.exp_avg_sqs[i] for i in have], [],
                               [step] * len(have), lr=self._lr, beta1=self.betas[0], beta2=self.betas[1],
                               weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)

    def state_dict(self) -> dict:
        """The moments and step count, in ``torch.optim.Adam``'s format (tensors, not copies)."""
        return {"state": {i: {"step": torch.tensor(float(self.count)), "exp_avg": m, "exp_avg_sq": v}
                          for i, (m, v) in enumerate(zip(self.exp_avgs, self.exp_avg_sqs))},
                "param_groups": [{"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": 0.0,
                                  "amsgrad": False, "maximize": False, "params": list(range(len(self.parameters)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load :meth:`state_dict`, or ``torch.optim.Adam``'s, of an optimizer of the same parameters."""
        try:  # everything is checked before any state is loaded: a refused state dict leaves this optimizer as it was
            (group,) = state_dict["param_groups"]
            states = [state_dict["state"].get(index) for index in group["params"]]
            fits = "betas" in group and len(states) == len(self.parameters) and all(  # no betas: not Adam's (SGD's)
                state is None or (isinstance(state["exp_avg"], torch.Tensor)
                                  and isinstance(state["exp_avg_sq"], torch.Tensor)
                                  and state["exp_avg"].shape == m.shape == state["exp_avg_sq"].shape
                                  and math.isfinite(float(state["step"])) and float(state["step"]) >= 0)
                for state, m in zip(states, self.exp_avgs))
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
            fits = False
        if not fits:
            raise APIUsageError("the optimizer state is not Adam's state for this network's parameters")
        try:
            lr = _number("Adam: the state dict's lr", float(group["lr"]), 0.0)
        except (TypeError, ValueError, RuntimeError):
            raise APIUsageError(f"Adam: the state dict's lr must be a number, got {group['lr']!r}") from None
        for state, m, v in zip(states, self.exp_avgs, self.exp_avg_sqs):
            if state is None:  # torch.optim.Adam keeps none for a parameter that never had a gradient
                m.zero_()
                v.zero_()
            else:
                m.copy_(state["exp_avg"])
                v.copy_(state["exp_avg_sq"])
        self.count = max((int(state["step"]) for state in states if state is not None), default=0)
        self.lr = lr


def clip_grad_norm(parameters: list[torch.Tensor] | torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale all gradients together so their global L2 norm is at most ``max_norm`` (a finite number > 0);
    returns that norm, as it was before clipping.

    What ``torch.nn.utils.clip_grad_norm_`` does, in a few ops: torch's own groups the gradients by
    device and dtype on every call, which costs more than the math for a small network (~0.1 ms). As
    torch's does, it skips parameters without a gradient, and where none has one (before ``backward()``)
    it changes nothing and returns a norm of 0.
    """
    _number("clip_grad_norm: max_norm", max_norm, 0.0, strict=True)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    try:
        grads = [p.grad for p in parameters if p.grad is not None]
    except (TypeError, AttributeError) as error:
        raise APIUsageError(f"clip_grad_norm takes a list of parameter tensors, e.g. list(model.parameters()), got "
                            f"{type(parameters).__name__}") from error
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # the norm of the norms
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm
