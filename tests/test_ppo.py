"""The trainer: masks, truncation bootstrapping, recurrent state, checkpoints, resume, learning."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import math
import pickle
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import gymnasium
from pettingzoo import ParallelEnv
import numpy as np
import pytest
import torch

import envs
from shoal import Binding
from shoal import ppo, vector
from shoal.checkpoint import (check_run_dir, latest_checkpoint, list_checkpoints, load_checkpoint, lock_run_dir,
                              save_atomic, save_checkpoint, set_rng_states)
from shoal.envs import make_binding, preset
from shoal.errors import APIUsageError, TrainingError, WorkerError
from shoal.logging import Logger, read_progress
from shoal.policy import DiscreteHead, LSTMPolicy, MixedPolicy, MLPPolicy, Policy
from shoal.optim import Adam, clip_grad_norm
from shoal.ppo import PPOConfig, config_from_checkpoint, evaluate, gae, train
from shoal.vector import Batch

QUICK = dict(num_envs=4, num_steps=16, total_timesteps=4 * 16 * 5, update_epochs=2, num_minibatches=2,
             dashboard=False, tensorboard=False)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LOSSES = ["loss/policy", "loss/value", "loss/entropy", "loss/approx_kl", "loss/clipfrac", "loss/explained_variance",
          "episode/return", "global_step"]


class GarbageInDeadSlots:
    """A vec env that fills every slot with mask False with garbage: NaN and huge observations,
    NaN rewards, random flags. The data contract says such slots carry nothing; the trainer must agree."""

    def __init__(self, vecenv, seed: int = 0):
        self.vecenv = vecenv
        self.rng = np.random.default_rng(seed)

    def __getattr__(self, name):
        return getattr(self.vecenv, name)

    def recv(self) -> Batch:
        batch = self.vecenv.recv()
        dead = ~batch.masks
        obs = batch.obs.copy()
        obs[dead] = self.rng.choice(np.array([np.nan, 1e30, -7.0], np.float32), size=obs[dead].shape)
        rewards = batch.rewards.copy()
        rewards[dead] = np.nan
        terminals, truncations = batch.terminals.copy(), batch.truncations.copy()
        terminals[dead] = self.rng.random(dead.sum()) < 0.5
        truncations[dead] = self.rng.random(dead.sum()) < 0.5
        return batch._replace(obs=obs, rewards=rewards, terminals=terminals, truncations=truncations)


def _history(result, keys=LOSSES):
    return [[row[key] for key in keys] for row in result.history]


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("lstm", [False, True], ids=["mlp", "lstm"])
def test_padded_env_with_garbage_in_dead_slots_trains_exactly_like_the_plain_env(lstm):
    config = PPOConfig(**QUICK, seed=3, lstm=lstm)
    plain = Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",))
    padded = Binding(env_cls=envs.PaddedCartPole)
    assert padded.max_agents == 3 and padded.agent_slots["cart"] == 1

    expected = train(config, plain)
    with vector.make(padded, "serial", envs_per_worker=config.num_envs) as vecenv:
        got = train(config, padded, vecenv=GarbageInDeadSlots(vecenv))

    assert expected.global_step == got.global_step == 320  # dead slots are not steps
    assert np.isfinite(np.array(_history(got), dtype=float)[:, :5]).all()
    assert _history(got) == _history(expected)  # bit for bit: same losses, same returns
    for a, b in zip(expected.policy.state_dict().values(), got.policy.state_dict().values()):
        assert torch.equal(a, b)


def test_the_cache_of_batch_rows_stays_bounded_on_many_worker_combinations():
    slot_rows = ppo._SlotRows(max_agents=2)
    rows, span = slot_rows([2, 3])
    assert rows.tolist() == [4, 5, 6, 7] and span == slice(4, 8)
    rows, span = slot_rows(np.array([0, 3]))
    assert rows.tolist() == [0, 1, 6, 7] and span is None
    for first in range(3 * ppo._SlotRows.SIZE):  # as async batches of many workers come
        assert slot_rows([first, first + 2])[0].tolist() == [2 * first, 2 * first + 1, 2 * first + 4, 2 * first + 5]
    assert len(slot_rows.cache) <= ppo._SlotRows.SIZE


def test_gae_cuts_at_invalid_transitions_and_episode_ends():
    gamma, lam = 0.9, 0.8
    # One slot, 4 transitions: t=1 ends an episode, t=2 is invalid (an agent's dead slot: NaN reward).
    rewards = np.array([[1.0], [2.0], [np.nan], [4.0]], np.float32)
    values = np.array([[0.5], [0.25], [np.nan], [1.0], [2.0]], np.float32)
    dones = np.array([[False], [True], [True], [False]])
    valid = np.array([[True], [True], [False], [True]])
    advantages = gae(rewards, values, dones, valid, gamma, lam)

    a3 = 4.0 + gamma * 2.0 - 1.0
    a2 = 0.0
    a1 = 2.0 - 0.25  # done: no bootstrap, no propagation
    a0 = 1.0 + gamma * 0.25 - 0.5 + gamma * lam * a1
    np.testing.assert_allclose(advantages[:, 0], [a0, a1, a2, a3], rtol=1e-6)


def test_gae_never_propagates_into_a_transition_that_does_not_count():
    # Transition 0 is valid and not done, transition 1 does not count: 0 bootstraps from V(obs_1) only.
    rewards = np.array([[1.0], [100.0]], np.float32)
    values = np.array([[0.0], [3.0], [50.0]], np.float32)
    advantages = gae(rewards, values, np.zeros((2, 1), bool), np.array([[True], [False]]), 0.5, 1.0)
    np.testing.assert_allclose(advantages[:, 0], [1.0 + 0.5 * 3.0, 0.0])


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and left alone
def test_gradient_clipping_matches_torch(max_norm):
    torch.manual_seed(0)
    ours, theirs = ([torch.zeros(shape, requires_grad=True) for shape in [(64, 4), (64,), (2, 64)]] for _ in range(2))
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape)
        b.grad = a.grad.clone()
    clip_grad_norm(ours, max_norm)
    torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)


def test_gae_refuses_arrays_numpy_would_broadcast_and_bad_coefficients():
    rewards, dones, valid = np.ones((4, 4), np.float32), np.zeros((4, 4), bool), np.ones((4, 4), bool)
    values = np.ones((5, 4), np.float32)
    with pytest.raises(APIUsageError, match=r"gae: values must have shape \(5, 4\) \(rewards are \(4, 4\)\), got \(5,\)"):
        gae(rewards, values[:, 0], dones, valid, 0.99, 0.95)  # broadcast along the wrong axis, before
    with pytest.raises(APIUsageError, match="gae: dones must be bools, got dtype float32"):
        gae(rewards, values, dones.astype(np.float32), valid, 0.99, 0.95)
    with pytest.raises(APIUsageError, match="gae: valid must be a numpy array, got list"):
        gae(rewards, values, dones, valid.tolist(), 0.99, 0.95)
    with pytest.raises(APIUsageError, match=r"gae: gamma must be a number in \[0, 1\], got nan"):
        gae(rewards, values, dones, valid, math.nan, 0.95)
    with pytest.raises(APIUsageError, match=r"gae: rewards must have shape \(T, N\), got \(4,\)"):
        gae(rewards[0], values, dones, valid, 0.99, 0.95)


def test_gae_matches_the_step_by_step_recursion():
    def reference(rewards, values, dones, valid, gamma, lam):  # the textbook loop, one transition at a time
        advantages, next_advantage = np.zeros(rewards.shape, np.float32), np.zeros(rewards.shape[1:], np.float32)
        for t in reversed(range(len(rewards))):
            delta = rewards[t] + gamma * np.where(dones[t], 0, values[t + 1]) - values[t]
            carry = ~dones[t] & (valid[t + 1] if t + 1 < len(rewards) else True)
            next_advantage = np.where(valid[t], delta + gamma * lam * np.where(carry, next_advantage, 0), 0)
            advantages[t] = next_advantage
        return advantages

    rng = np.random.default_rng(0)
    for _ in range(50):
        steps, slots = rng.integers(1, 30), rng.integers(1, 6)
        rewards = rng.normal(size=(steps, slots)).astype(np.float32)
        values = rng.normal(size=(steps + 1, slots)).astype(np.float32)
        dones, valid = rng.random((steps, slots)) < 0.1, rng.random((steps, slots)) < 0.8
        rewards[~valid] = np.nan  # garbage where a transition does not count
        np.testing.assert_array_equal(gae(rewards, values, dones, valid, 0.99, 0.95),
                                      reference(rewards, values, dones, valid, 0.99, 0.95))


def test_adam_steps_exactly_as_torch_adam_and_shares_its_state_format():
    torch.manual_seed(0)
    ours, theirs = (MLPPolicy(make_binding("cartpole")) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    frozen = ours.value_head.bias.detach().clone()
    optimizers = Adam(ours.parameters(), 3e-4), torch.optim.Adam(theirs.parameters(), lr=3e-4, eps=1e-5)
    obs = torch.randn(32, 4)
    for _ in range(20):
        for policy, optimizer in zip((ours, theirs), optimizers):
            params, value, _ = policy(obs)
            for parameter in policy.parameters():
                parameter.grad = None
            ((params ** 2).mean() + value.mean()).backward()
            policy.value_head.bias.grad = None  # a parameter without a gradient stays as it is
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours.value_head.bias, frozen)

    resumed = Adam(ours.parameters(), 1.0)
    resumed.load_state_dict(optimizers[1].state_dict())  # torch's state into ours...
    assert resumed.count == 20 and resumed.lr == 3e-4
    torch.optim.Adam(theirs.parameters(), lr=1.0).load_state_dict(optimizers[0].state_dict())  # ...and ours into torch's
    with pytest.raises(APIUsageError, match="not Adam's state for this network"):
        Adam(list(ours.parameters())[:-1], 1.0).load_state_dict(optimizers[0].state_dict())
    before = [m.clone() for m in resumed.exp_avgs]
    no_step = optimizers[0].state_dict()
    no_step["state"] = {index: {k: v for k, v in state.items() if k != "step"} for index, state in no_step["state"].items()}
    for wrong in (torch.optim.SGD(ours.parameters(), lr=0.5).state_dict(), no_step):  # loaded, or half loaded, before
        with pytest.raises(APIUsageError, match="not Adam's state for this network"):
            resumed.load_state_dict(wrong)
        assert resumed.lr == 3e-4 and all(torch.equal(a, b) for a, b in zip(before, resumed.exp_avgs))


def test_nested_multiagent_env_with_deaths_and_spawns_trains():
    binding = Binding(env_cls=envs.NestedMultiAgentEnv, env_kwargs=dict(num_agents=3, max_steps=12))
    result = train(PPOConfig(**{**QUICK, "total_timesteps": 600}, seed=0), binding)
    # Agents die early and "late" spawns at step 3: fewer counted steps than slots x steps.
    assert 600 <= result.global_step < result.updates * 4 * 16 * binding.max_agents
    assert all(np.isfinite(row["loss/value"]) for row in result.history)
    assert type(result.policy).__name__ == "MixedPolicy"  # the default for nested observations


# ---------------------------------------------------------------- episode ends


def _fit_constant_value(**overrides) -> float:
    binding = Binding(env_cls=envs.ConstantRewardEnv)
    config = PPOConfig(num_envs=2, num_steps=32, total_timesteps=2 * 32 * 150, gamma=0.9, learning_rate=3e-3,
                       anneal_lr=False, clip_vloss=False, update_epochs=8, num_minibatches=1, ent_coef=0.0,
                       dashboard=False, tensorboard=False, **overrides)
    result = train(config, binding)
    with torch.no_grad():
        return float(result.policy.cpu()(torch.ones(1, 1))[1])


def test_truncated_episodes_bootstrap_from_the_final_observation():
    # Truncated every 4 steps, reward 1: bootstrapping learns V = 1 / (1 - 0.9) = 10; treating the
    # truncation as terminal would learn the mean discounted return to the cut, about 2.8.
    assert _fit_constant_value() == pytest.approx(10.0, abs=1.5)


class _AlwaysDoneReplay:
    """Makes the env's truncations look terminal: the control experiment for the test above."""

    def __init__(self, vecenv):
        self.vecenv = vecenv

    def __getattr__(self, name):
        return getattr(self.vecenv, name)

    def recv(self) -> Batch:
        batch = self.vecenv.recv()
        return batch._replace(terminals=batch.terminals | batch.truncations)


def test_treating_truncation_as_terminal_would_learn_a_different_value():
    binding = Binding(env_cls=envs.ConstantRewardEnv)
    config = PPOConfig(num_envs=2, num_steps=32, total_timesteps=2 * 32 * 150, gamma=0.9, learning_rate=3e-3,
                       anneal_lr=False, clip_vloss=False, update_epochs=8, num_minibatches=1, ent_coef=0.0,
                       dashboard=False, tensorboard=False)
    with vector.make(binding, "serial", envs_per_worker=2) as vecenv:
        result = train(config, binding, vecenv=_AlwaysDoneReplay(vecenv))
    with torch.no_grad():
        value = float(result.policy.cpu()(torch.ones(1, 1))[1])
    assert value < 4.0


@pytest.mark.parametrize("backend,envs_per_batch,device", [
    ("serial", 0, "cpu"), ("serial", 2, "cpu"), ("multiprocessing", 2, "cpu"),
    pytest.param("serial", 2, "cuda", marks=CUDA)])
def test_recurrent_replay_matches_the_rollout(backend, envs_per_batch, device):
    # With a frozen policy (lr ~ 0) every update's recomputed log-probabilities must equal the ones
    # taken while acting: the replay resets the LSTM state exactly where the rollout did (episode
    # starts mid-rollout, state carried across rollouts, batches arriving in any order).
    config = PPOConfig(num_envs=4, num_steps=24, total_timesteps=4 * 24 * 6, learning_rate=1e-30, lstm=True,
                       update_epochs=1, num_minibatches=2, backend=backend, envs_per_batch=envs_per_batch,
                       num_workers=2 if backend != "serial" else 0, dashboard=False, tensorboard=False, device=device)
    result = train(config, make_binding("cartpole"))
    assert result.episodes, "episodes must end inside rollouts for this test to mean anything"
    # float32 rounding alone gives 0 to ~1e-9 on the CPU (batches of other sizes round differently). On a GPU
    # the replay's cuDNN LSTM may use TF32 (PyTorch's default) while acting uses the fp32 cell: log-probabilities
    # then differ by ~1e-4, a KL of ~1e-8. A state reset in the wrong place costs far more.
    assert max(abs(row["loss/approx_kl"]) for row in result.history) < (1e-8 if device == "cpu" else 1e-6)
    assert all(row["loss/clipfrac"] == 0 for row in result.history)


def test_lstm_state_resets_where_an_episode_starts():
    torch.manual_seed(0)
    policy = LSTMPolicy(MLPPolicy(make_binding("cartpole"), hidden_size=8))
    obs = torch.randn(6, 3, 4)
    starts = torch.zeros(6, 3, dtype=torch.bool)
    starts[3, 1] = True
    state = tuple(torch.randn(3, 16) for _ in range(2))
    params, values, _ = policy(obs, state, starts)
    # Slot 1 from step 3 on must equal a fresh run from a zero state.
    fresh_params, fresh_values, _ = policy(obs[3:, 1:2], None, None)
    np.testing.assert_allclose(params.view(6, 3, -1)[3:, 1].detach(), fresh_params.detach(), rtol=1e-5, atol=1e-6)
    # ... and before step 3 it depended on the given state.
    stateless, _, _ = policy(obs[:3, 1:2], None, None)
    assert not torch.allclose(params.view(6, 3, -1)[:3, 1], stateless)


# ---------------------------------------------------------------- batching


@pytest.mark.parametrize("env", ["cartpole", "nested"])  # nested: action dimensions of 2 to 5 choices
def test_double_buffered_serial_rollout_trains_exactly_like_the_synchronous_one(env):
    binding = make_binding("cartpole") if env == "cartpole" else Binding(env_cls=envs.NestedSingleAgentEnv)
    # On the CPU: a GPU draws random numbers per kernel launch, so two half batches get other numbers than one whole.
    sync = train(PPOConfig(**QUICK, seed=5, device="cpu"), binding)
    halves = train(PPOConfig(**QUICK, seed=5, envs_per_batch=2, device="cpu"), binding)
    # Same envs, same random numbers in the same order; only float rounding of smaller matmuls differs.
    np.testing.assert_allclose(np.array(_history(halves), float), np.array(_history(sync), float), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["serial", "multiprocessing", "ray"])
def test_a_full_batch_run_is_reproducible_on_every_backend(backend, request):
    """The same seed trains the same policy bit for bit, in process or in workers."""
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    binding = make_binding("cartpole")
    reference = train(PPOConfig(**QUICK, seed=3), binding)
    again = train(PPOConfig(**QUICK, seed=3, backend=backend, num_workers=2), binding)
    np.testing.assert_array_equal(np.array(_history(again), float), np.array(_history(reference), float))


def test_multiprocessing_double_buffering_trains():
    config = PPOConfig(**{**QUICK, "total_timesteps": 2000}, backend="multiprocessing", num_workers=2,
                       envs_per_batch=2, seed=1)
    result = train(config, make_binding("cartpole"))
    assert result.global_step >= 2000
    steps = [0] + [row["global_step"] for row in result.history]  # each update stores num_envs x num_steps
    assert {after - before for before, after in zip(steps, steps[1:])} == {4 * 16}  # not the dropped run-aheads
    assert all(np.isfinite(row["loss/value"]) for row in result.history)


def test_box_actions_are_clipped_before_the_env_sees_them():
    result = train(PPOConfig(**{**QUICK, "total_timesteps": 500}), make_binding("gym:Pendulum-v1"))
    assert type(result.policy.action_head).__name__ == "GaussianHead"
    assert result.global_step >= 500


class BatchNormPolicy(Policy):
    def __init__(self, binding, frozen_decode: bool = False):
        super().__init__(binding, feature_size=16)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU())
        self.frozen_decode = frozen_decode
        self.minibatch_rows: list[int] = []

    def encode(self, obs):
        if self.training:
            self.minibatch_rows.append(len(obs))
        return self.net(obs.float())

    def decode(self, features):
        with torch.no_grad() if self.frozen_decode else contextlib.nullcontext():
            return super().decode(features)


def test_minibatches_split_evenly_and_never_hold_one_row_where_there_are_more():
    """13 transitions in 4 minibatches: 3, 3, 3 and 4 (ceil would leave a last one of 1, which batch norm refuses
    in train mode); 5 transitions in 4: 2 minibatches, of 2 and 3."""
    for steps, expected in ((13, [3, 3, 3, 4]), (5, [2, 3])):
        policy = BatchNormPolicy(make_binding("cartpole"))
        train(PPOConfig(total_timesteps=steps, num_envs=1, num_steps=steps, num_minibatches=4, update_epochs=1,
                        dashboard=False, tensorboard=False), make_binding("cartpole"), policy=policy)
        assert sorted(policy.minibatch_rows) == expected


def test_an_update_of_one_transition_makes_no_gradient_step_for_a_batch_norm_policy():
    """Batch norm refuses one row in train mode: such an update is skipped (said once), MLP and LSTM alike."""
    binding = make_binding("cartpole")
    for policy in (BatchNormPolicy(binding), LSTMPolicy(BatchNormPolicy(binding))):
        messages = []
        logger = Logger(run_dir=None, dashboard=False, tensorboard=False)
        logger.message = messages.append
        before = [parameter.clone() for parameter in policy.parameters()]
        result = train(PPOConfig(num_envs=1, num_steps=1, total_timesteps=3, dashboard=False, tensorboard=False),
                       binding, policy=policy, logger=logger)
        assert result.updates == 3 and all(math.isnan(row["loss/policy"]) for row in result.history)
        assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
        assert len(messages) == 1 and "batch norm cannot train" in messages[0]
    plain = MLPPolicy(binding)  # without batch norm, one transition is a gradient step as any other
    result = train(PPOConfig(num_envs=1, num_steps=1, total_timesteps=3, dashboard=False, tensorboard=False),
                   binding, policy=plain)
    assert all(math.isfinite(row["loss/policy"]) for row in result.history)


class GRUPolicy(Policy):
    """A recurrent policy of one's own whose state is one tensor (a GRU's), not an LSTM's (h, c)."""

    is_recurrent = True

    def __init__(self, binding):
        super().__init__(binding, feature_size=8)
        self.cell = torch.nn.GRUCell(4, 8)
        self.initial_states: list[torch.Tensor] = []  # the state of each acting call, as it came

    def initial_state(self, batch_size, device="cpu"):
        return torch.zeros(batch_size, 8, device=device)

    def forward(self, obs, state, starts):
        steps = obs[None] if obs.dim() == 2 else obs
        begins = (starts[None] if obs.dim() == 2 else starts).bool()
        if obs.dim() == 2 and not self.training:
            self.initial_states.append(state.clone())
        hidden = []
        for step, begin in zip(steps, begins):
            state = self.cell(step.float(), torch.where(begin[:, None], 0.0, state))
            hidden.append(state)
        params, value = self.decode(torch.cat(hidden))
        return params, value, state


def test_a_recurrent_policy_of_ones_own_may_keep_its_state_in_one_tensor():
    binding = make_binding("cartpole")
    policy = GRUPolicy(binding)
    result = train(PPOConfig(**QUICK), binding, policy=policy)
    assert result.global_step == 320
    assert all(isinstance(state, torch.Tensor) and state.shape[1:] == (8,) for state in policy.initial_states)
    assert any(state.abs().sum() > 0 for state in policy.initial_states)  # the state carries over between steps
    assert np.isfinite(evaluate(policy, binding, episodes=1, max_steps=50)).all()


def test_a_recurrent_state_made_of_one_shared_zero_tensor_still_keeps_a_state_per_slot_and_part():
    """h, c = z, z, or zeros expanded over the rows: the rollout must not write one slot's state into another's."""
    binding = make_binding("cartpole")

    class Shared(LSTMPolicy):
        def initial_state(self, batch_size, device="cpu"):
            zeros = torch.zeros(1, self.feature_size, device=device).expand(batch_size, -1)
            return zeros, zeros

    seen = []
    policy = Shared(MLPPolicy(binding))
    forward = policy.forward

    def recording(obs, state=None, starts=None, *rest):
        if obs.dim() == 2 and len(obs) == 4:
            seen.append(tuple(part.clone() for part in state))
        return forward(obs, state, starts, *rest)
    policy.forward = recording
    train(PPOConfig(**QUICK), binding, policy=policy)
    h, c = seen[5]
    assert not torch.equal(h, c) and not torch.equal(h[0], h[1])


def test_a_recurrent_state_that_is_no_tensor_or_has_no_batch_rows_is_refused():
    binding = make_binding("cartpole")

    class NoState(GRUPolicy):
        def initial_state(self, batch_size, device="cpu"):
            return [1, 2]

    class Unbatched(GRUPolicy):
        def forward(self, obs, state, starts):
            params, value, state = super().forward(obs, state, starts)
            return params, value, state[0]

    with pytest.raises(APIUsageError, match=r"NoState.initial_state\(3, 'cpu'\) returns a list holding a value of "
                                            r"type int, a value of type int: a recurrent state must be a torch "
                                            r"tensor or a tuple of them, each with the batch \(3 rows\)"):
        train(PPOConfig(**QUICK), binding, policy=NoState(binding))
    with pytest.raises(APIUsageError, match=r"Unbatched returns, for 2 observations, a tensor of shape \(8,\)"):
        train(PPOConfig(**QUICK), binding, policy=Unbatched(binding))

    class LayersFirst(GRUPolicy):  # nn.GRU's (num_layers, B, hidden), with 2 layers: 2 rows, by chance
        def initial_state(self, batch_size, device="cpu"):
            return torch.zeros(2, batch_size, 8, device=device)

    class LastStepOnly(GRUPolicy):  # a sequence's outputs not flattened to (T * B, ...)
        def forward(self, obs, state, starts):
            params, value, state = super().forward(obs, state, starts)
            return params[-len(state):], value[-len(state):], state

    class Float64State(GRUPolicy):
        def forward(self, obs, state, starts):
            params, value, state = super().forward(obs, state, starts)
            return params, value, state.double()

    for policy, message in ((LayersFirst, r"LayersFirst.initial_state\(3, 'cpu'\) returns a tensor of shape "
                                          r"\(2, 3, 8\)"),
                            (LastStepOnly, r"LastStepOnly returns, for a sequence of 3 steps of 2 observations .* "
                                           r"expected 6 rows each"),
                            (Float64State, r"Float64State returns, for 2 observations, a state of \(shape, dtype\) "
                                           r"\[\(\(2, 8\), torch.float64\)\]: expected those of initial_state")):
        with pytest.raises(APIUsageError, match=message):
            train(PPOConfig(**QUICK), binding, policy=policy(binding))


def test_an_lstm_policy_subclass_with_a_forward_of_its_own_trains():
    class Tempered(LSTMPolicy):  # its forward takes (obs, state, starts): the update calls it so
        def forward(self, obs, state=None, starts=None):
            params, value, state = super().forward(obs, state, starts)
            return params * 0.5, value, state

    binding = make_binding("cartpole")
    assert train(PPOConfig(**QUICK), binding, policy=Tempered(MLPPolicy(binding))).global_step == 320


class NormedEncoder(Policy):
    """Batch norm in encode, for a nested env's byte observations; records what the update encodes."""

    def __init__(self, binding):
        super().__init__(binding, feature_size=16)
        self.net = torch.nn.Sequential(torch.nn.Linear(self.obs_size, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh())
        self.encoded: list[torch.Tensor] = []

    def encode(self, obs):
        if self.training:
            self.encoded.append(obs.detach().clone())
        return self.net(obs.float())


def test_an_lstm_update_encodes_only_the_rows_that_count():
    """Agents die and appear within a rollout, so a slot's sequence holds rows of dead agents (zeros): batch norm
    must not take its statistics from them. A live agent's observation is never all zeros in this env. 64
    minibatches: as many as slots with data, which would leave a slot with one transition alone in one."""
    binding = Binding(env_cls=envs.NestedMultiAgentEnv)
    policy = LSTMPolicy(NormedEncoder(binding))
    result = train(PPOConfig(num_envs=2, num_steps=16, total_timesteps=300, num_minibatches=64, update_epochs=2,
                             dashboard=False, tensorboard=False), binding, policy=policy)
    rows = torch.cat(policy.policy.encoded)
    assert result.updates >= 2 and len(policy.policy.encoded) >= 4
    assert (rows != 0).any(1).all()  # no dead agent's row among them
    assert min(len(batch) for batch in policy.policy.encoded) >= 2

    # Uncounted rows reach no counted output: slot 1 is dead at steps 1 and 2 and back with a start at step 3
    lstm = LSTMPolicy(MLPPolicy(make_binding("cartpole")))
    obs, starts = torch.randn(5, 3, 4), torch.zeros(5, 3, dtype=torch.bool)
    starts[3, 1] = True
    counted = torch.ones(5, 3, dtype=torch.bool)
    counted[1:3, 1] = counted[4, 2] = False
    params, values, _ = lstm(obs, None, starts)
    garbage = obs.clone()
    garbage[~counted] = 1e6
    counted_params, counted_values, _ = lstm(garbage, None, starts, counted)
    keep = counted.reshape(-1)
    assert torch.allclose(params[keep], counted_params[keep]) and torch.allclose(values[keep], counted_values[keep])
    with pytest.raises(APIUsageError, match=r"LSTMPolicy: counted must be a bool torch tensor of shape \(5, 3\), one "
                                            r"per observation, got one of shape \(5, 3\) and dtype torch.float32"):
        lstm(obs, None, starts, counted.float())


def test_a_policy_with_nothing_to_train_is_refused():
    binding = make_binding("cartpole")
    frozen = BatchNormPolicy(binding).requires_grad_(False)
    with pytest.raises(APIUsageError, match="BatchNormPolicy has no parameter that requires grad"):
        train(PPOConfig(**QUICK), binding, policy=frozen)
    with pytest.raises(APIUsageError, match="BatchNormPolicy: the loss carries no gradient"):
        train(PPOConfig(**QUICK), binding, policy=BatchNormPolicy(binding, frozen_decode=True))


# ---------------------------------------------------------------- checkpoints and resume


def test_checkpoints_are_written_every_n_updates_and_at_the_end(tmp_path):
    config = PPOConfig(**QUICK, run_dir=str(tmp_path), checkpoint_interval=2, keep_checkpoints=0)
    train(config, make_binding("cartpole"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["update_000002.pt", "update_000004.pt", "update_000005.pt"]
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["update"] == 5 and checkpoint["global_step"] == 320
    assert set(checkpoint) >= {"model", "optimizer", "config", "rng", "global_step", "update", "env", "spaces"}
    assert checkpoint["config"]["num_steps"] == 16


_SLOW_WRITER = textwrap.dedent("""
    import sys, torch
    from shoal.checkpoint import save_checkpoint
    payload = {"model": {"w": torch.full((64, 1024, 1024), 2.0)}, "update": 2}  # 256 MB: a slow write
    print("writing", flush=True)
    save_checkpoint(sys.argv[1], 2, payload, keep=0)
    save_checkpoint(sys.argv[1], 1, payload, keep=0)  # overwrite the good one, if it gets that far
""")


def test_a_run_killed_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(3)}, "update": 1}, keep=0)
    writer = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE)
    assert writer.stdout.readline().strip() == b"writing"
    directory = tmp_path / "checkpoints"
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in directory.iterdir()):
        assert time.monotonic() < deadline and writer.poll() is None, "the writer never started writing"
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()

    assert [p.name for p in list_checkpoints(tmp_path)] == ["update_000001.pt"]  # half files are not checkpoints
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["update"] == 1 and torch.equal(checkpoint["model"]["w"], torch.ones(3))


def test_save_atomic_replaces_the_old_file_in_one_step(tmp_path):
    path = tmp_path / "x.pt"
    save_atomic({"a": 1}, path)
    save_atomic({"a": 2}, path)
    assert torch.load(path)["a"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as other files, not the temporary file's 0600


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_checkpoint_write_that_fails_raises_its_own_error_and_keeps_the_old_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "x.pt"
    save_atomic({"a": 1}, path)

    class FailingFile(io.FileIO):  # a disk that fills up, or a Ctrl-C, in the middle of the write
        def write(self, data):
            raise failure

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FailingFile(fd, mode))
    # torch's zip writer used to replace either by "RuntimeError: [enforce fail ...] unexpected pos"
    expected = (OSError, re.escape(f"No space left on device: '{path}'")) if isinstance(failure, OSError) else (
        KeyboardInterrupt, None)
    with pytest.raises(expected[0], match=expected[1]):
        save_atomic({"a": torch.zeros(100_000)}, path)
    monkeypatch.undo()
    assert torch.load(path)["a"] == 1 and [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_load_checkpoint_errors_say_what_was_expected(tmp_path):
    with pytest.raises(APIUsageError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(APIUsageError, match="no checkpoint in"):
        latest_checkpoint(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(APIUsageError, match=r"junk.pt' cannot be read \(UnpicklingError: Unsupported operand 110\): "
                                            r"expected a file torch.save wrote, as shoal's checkpoints are$"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(APIUsageError, match="not a shoal checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format": "shoal-checkpoint-1", "model": _Planted()}, tmp_path / "planted.pt")
    with pytest.raises(APIUsageError, match=r"planted.pt' refers to test_ppo._plant: shoal reads only tensors, "
                                            r"numbers, text and numpy arrays from a checkpoint, so that reading a "
                                            r"file runs no code; if you trust it, load it yourself with "
                                            r"torch.load\(path, weights_only=False\)$"):
        load_checkpoint(tmp_path / "planted.pt")
    assert not _PLANTED  # its code never ran
    with open(tmp_path / "pickled.pt", "wb") as file:  # pickle.dump's, not torch.save's: torch warns, shoal says
        pickle.dump({"format": "shoal-checkpoint-1"}, file, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(APIUsageError, match=r"pickled.pt' cannot be read \(.*\): expected a file torch.save wrote"):
            load_checkpoint(tmp_path / "pickled.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(APIUsageError, match=r"module.pt' refers to torch.nn.modules.linear.Linear: shoal reads only"):
        load_checkpoint(tmp_path / "module.pt")


_PLANTED = []


def _plant():
    _PLANTED.append(1)


class _Planted:
    """A pickle that calls code of its choosing when loaded, as a foreign .pt file may."""

    def __reduce__(self):
        return _plant, ()


def test_save_checkpoint_checks_its_update_and_payload(tmp_path):
    with pytest.raises(APIUsageError, match="update must be an int >= 0, got -1"):
        save_checkpoint(tmp_path, -1, {})
    with pytest.raises(APIUsageError, match="payload must be a dict, got list"):
        save_checkpoint(tmp_path, 1, [1])


def test_a_run_directory_deleted_under_a_run_is_not_made_again(tmp_path):
    with pytest.raises(TrainingError, match=r"run directory '.*gone' is gone \(deleted while the run went on\?\)"):
        save_checkpoint(tmp_path / "gone", 1, {})
    assert not (tmp_path / "gone").exists()


def test_a_checkpoint_this_user_may_not_read_is_neither_passed_over_nor_renamed(tmp_path, monkeypatch):
    for update in (1, 2):
        save_checkpoint(tmp_path, update, {"update": update})
    real_load = torch.load

    def load(path, *args, **kwargs):  # as chmod 000 would, for a user who is not root
        if str(path).endswith("update_000002.pt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(PermissionError, match="update_000002.pt"):
        load_checkpoint(tmp_path)
    with pytest.raises(PermissionError):
        check_run_dir(tmp_path, {"path": str(list_checkpoints(tmp_path)[0]), "update": 1})
    assert [path.name for path in list_checkpoints(tmp_path)] == ["update_000001.pt", "update_000002.pt"]


def test_a_new_run_removes_what_a_killed_run_left_half_written(tmp_path):
    stale = tmp_path / "checkpoints" / ".update_000002.pt.x1y2.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    check_run_dir(tmp_path, None)
    assert not stale.exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_with_a_warning(tmp_path):
    for update in (1, 2):
        save_checkpoint(tmp_path, update, {"update": update})
    newest = list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # as a disk fault would leave it
    with pytest.warns(UserWarning, match="update_000002.pt' cannot be read .*: loaded the newest one that can be"):
        assert load_checkpoint(tmp_path)["update"] == 1
    list_checkpoints(tmp_path)[0].write_bytes(b"")
    with pytest.raises(APIUsageError, match="update_000002.pt' cannot be read .*; nor can the 1 older one"):
        load_checkpoint(tmp_path)


def test_resume_continues_step_count_schedule_optimizer_and_csv(tmp_path):
    binding = make_binding("cartpole")
    straight = PPOConfig(**{**QUICK, "total_timesteps": 4 * 16 * 6}, run_dir=str(tmp_path / "a"),
                         checkpoint_interval=3, keep_checkpoints=0)
    full = train(straight, binding)
    first_half = tmp_path / "a" / "checkpoints" / "update_000003.pt"
    checkpoint = load_checkpoint(first_half)

    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    (resumed_dir / "checkpoints").mkdir()
    (resumed_dir / "checkpoints" / first_half.name).write_bytes(first_half.read_bytes())
    rows_before = read_progress(tmp_path / "a")[:3]
    (resumed_dir / "progress.csv").write_text((tmp_path / "a" / "progress.csv").read_text())  # incl. rows after 3
    resumed = train(dataclasses.replace(straight, run_dir=str(resumed_dir)), binding, resume_from=resumed_dir)

    assert resumed.start_step == checkpoint["global_step"] == 3 * 64
    assert resumed.global_step == full.global_step and resumed.updates == full.updates == 6
    assert [row["lr"] for row in resumed.history] == [row["lr"] for row in full.history[3:]]
    assert [row["update"] for row in resumed.history] == [4, 5, 6]
    rows = read_progress(resumed_dir)
    assert [row["update"] for row in rows] == [1, 2, 3, 4, 5, 6]  # old rows past the checkpoint were dropped
    assert rows[:3] == rows_before
    state = load_checkpoint(resumed_dir)["optimizer"]["state"][0]["step"]
    assert float(state) == 6 * 2 * 2  # Adam's step count went on from the checkpoint


class InterruptAt:
    """A vec env whose ``calls``-th recv raises KeyboardInterrupt, as Ctrl-C in the middle of a rollout would."""

    def __init__(self, vecenv, calls: int):
        self.vecenv, self.calls = vecenv, calls

    def __getattr__(self, name):
        return getattr(self.vecenv, name)

    def recv(self) -> Batch:
        self.calls -= 1
        if self.calls == 0:
            raise KeyboardInterrupt
        return self.vecenv.recv()


def test_ctrl_c_writes_a_final_checkpoint_of_the_last_completed_update_and_it_resumes(tmp_path):
    binding = make_binding("cartpole")
    config = PPOConfig(**QUICK, anneal_lr=False, run_dir=str(tmp_path), checkpoint_interval=0)
    with vector.make(binding, "serial", envs_per_worker=config.num_envs) as vecenv:
        with pytest.raises(KeyboardInterrupt):  # the first rollout takes 17 recvs (reset + 16 steps), then 16 each
            train(config, binding, vecenv=InterruptAt(vecenv, 17 + 16 + 15))  # late in it: episodes have ended

    [path] = list_checkpoints(tmp_path)
    checkpoint = load_checkpoint(path)
    assert path.name == "update_000002.pt" and checkpoint["global_step"] == 2 * 64  # the third rollout is dropped
    two_updates = train(dataclasses.replace(config, run_dir=None, total_timesteps=2 * 64), binding)
    for name, tensor in two_updates.policy.state_dict().items():
        assert torch.equal(checkpoint["model"][name], tensor.cpu()), name
    returns = [episode[2] for episode in two_updates.episodes]  # none of the dropped rollout's episodes
    assert checkpoint["recent_returns"] == returns[-20:] and checkpoint["episodes"] == len(returns)
    assert read_progress(tmp_path)[-1]["update"] == 2

    resumed = train(config, binding, resume_from=tmp_path)
    assert resumed.start_step == 128 and resumed.global_step == 320 and resumed.updates == 5


def test_ctrl_c_before_an_updates_progress_row_leaves_no_gap_in_the_resumed_progress(tmp_path, monkeypatch):
    binding = make_binding("cartpole")
    config = PPOConfig(**QUICK, run_dir=str(tmp_path), checkpoint_interval=0)
    log, calls = Logger.log, []

    def interrupted_log(self, step, metrics):
        calls.append(step)
        if len(calls) == 3:  # Ctrl-C after update 3, before its row is written
            raise KeyboardInterrupt
        return log(self, step, metrics)

    monkeypatch.setattr(Logger, "log", interrupted_log)
    with pytest.raises(KeyboardInterrupt):
        train(config, binding)
    monkeypatch.setattr(Logger, "log", log)
    assert load_checkpoint(tmp_path)["update"] == 2 and [row["update"] for row in read_progress(tmp_path)] == [1, 2]
    train(config, binding, resume_from=tmp_path)
    assert [row["update"] for row in read_progress(tmp_path)] == [1, 2, 3, 4, 5]


def test_evaluate_is_seeded_and_leaves_the_policy_and_the_global_rng_as_they_were():
    binding = make_binding("cartpole")
    policy = MLPPolicy(binding)
    before = torch.get_rng_state()
    first = evaluate(policy, binding, episodes=3, seed=7)
    assert policy.training and torch.equal(torch.get_rng_state(), before)
    assert evaluate(policy, binding, episodes=3, seed=7) == first


def test_evaluate_of_an_env_without_episode_statistics_stops_early_and_says_why():
    binding = Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",), record_episode_statistics=False)
    with pytest.raises(APIUsageError, match=r"^CartPole-v1: 1,000 agent episodes ended without episode statistics "
                                            r"\(infos\[agent\]\['episode'\]\) and none with: with "
                                            r"record_episode_statistics=False the env must give its own"):
        evaluate(MLPPolicy(binding), binding)  # not after max_steps, a million steps


def test_evaluate_starts_an_agents_lstm_state_where_it_appears_as_training_does():
    binding = Binding(env_cls=envs.NestedMultiAgentEnv, env_kwargs=dict(num_agents=3, max_steps=8, spawn_step=3))
    policy = LSTMPolicy(MixedPolicy(binding))
    seen, masks = [], []
    forward, make_env = policy.forward, binding.make_env

    def recording_forward(obs, state=None, starts=None):
        if len(obs) == binding.max_agents:  # not evaluate's check of the policy, which runs it on 2 rows first
            seen.append(starts.clone())
        return forward(obs, state, starts)

    def recording_env():
        env = make_env()
        step = env.step

        def recording_step(actions):
            masks.append(env.masks.copy())  # the mask that came with the observation acted on
            return step(actions)
        env.step = recording_step
        return env

    policy.forward, binding.make_env = recording_forward, recording_env
    evaluate(policy, binding, episodes=4)  # the first agents die before 'late' spawns
    late = binding.agent_slots["late"]
    first_live = next(t for t, mask in enumerate(masks) if mask[late])
    assert first_live > 0 and seen[first_live][late] and not seen[first_live + 1][late]


def test_the_rollout_acts_in_eval_mode_and_the_update_trains_in_train_mode():
    # batch norm on one env: a one-row batch in train mode has no batch statistics
    class Normed(Policy):
        def __init__(self, binding):
            super().__init__(binding, feature_size=16)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh())
            self.modes = []

        def encode(self, obs):
            self.modes.append(self.training)
            return self.net(obs.float())

    binding = make_binding("cartpole")
    policy = Normed(binding)
    train(PPOConfig(num_envs=1, num_steps=32, total_timesteps=64, dashboard=False, tensorboard=False), binding,
          policy=policy)
    assert policy.modes.count(False) >= 2 * 32 and policy.modes[-1] is True
    assert int(policy.net[1].num_batches_tracked) > 0  # the update's minibatches moved the running statistics


def test_evaluate_starts_the_state_of_an_agent_whose_slot_is_live_again_right_after_its_end(monkeypatch):
    # b ends at step 1; at step 2 the env resets and b's observation begins a new episode: its state starts over
    monkeypatch.setattr(ppo, "check_policy", lambda policy, binding: None)  # its probes pass starts too
    binding = Binding(env_cls=DiesBeforeTheEnd)
    policy = LSTMPolicy(MLPPolicy(binding))
    seen = []
    forward = policy.forward

    def recording_forward(obs, state=None, starts=None):
        if starts is not None:
            seen.append(starts.tolist())
        return forward(obs, state, starts)

    policy.forward = recording_forward
    evaluate(policy, binding, episodes=4)
    assert seen[:4] == [[True, True], [False, True], [True, True], [False, True]]


@CUDA
def test_a_run_trained_on_the_gpu_resumes_and_evaluates_on_the_cpu(tmp_path):
    binding = make_binding("cartpole")
    config = PPOConfig(**QUICK, lstm=True, device="cuda", run_dir=str(tmp_path), checkpoint_interval=2)
    on_gpu = train(config, binding)
    assert all(parameter.is_cuda for parameter in on_gpu.policy.parameters())
    checkpoint = load_checkpoint(list_checkpoints(tmp_path)[0])  # update 2, on the CPU
    assert all(tensor.device.type == "cpu" for tensor in checkpoint["model"].values())

    more = dataclasses.replace(config, device="cpu", total_timesteps=config.total_timesteps + 2 * 64)
    on_cpu = train(more, binding, resume_from=tmp_path)
    assert on_cpu.start_step == 320 and on_cpu.global_step == 448
    assert all(np.isfinite(row["loss/value"]) for row in on_cpu.history)
    assert len(evaluate(on_cpu.policy, binding, episodes=2)) == 2


def test_the_mean_return_of_the_last_20_episodes_goes_on_across_a_resume(tmp_path):
    first = train(PPOConfig(**QUICK, run_dir=str(tmp_path)), make_binding("cartpole"))
    earlier = [episode[2] for episode in first.episodes][-20:]
    assert load_checkpoint(tmp_path)["recent_returns"] == earlier
    resumed = train(PPOConfig(**{**QUICK, "total_timesteps": QUICK["total_timesteps"] + 64}, run_dir=str(tmp_path)),
                    make_binding("cartpole"), resume_from=tmp_path)
    row = resumed.history[0]
    new = [episode[2] for episode in resumed.episodes if episode[0] <= row["global_step"]]
    assert row["episode/return_mean20"] == pytest.approx(np.mean((earlier + new)[-20:]))


def test_a_given_logger_is_opened_before_the_first_rollout_and_closed_once(tmp_path, monkeypatch):
    train(PPOConfig(**QUICK, run_dir=str(tmp_path)), make_binding("cartpole"))
    (tmp_path / "progress.csv").write_bytes(b"global_step\n\xff\n")  # unreadable: the resume fails at once
    stepped = []
    logger = Logger(tmp_path, dashboard=False, start_step=320)
    with vector.Serial(make_binding("cartpole"), 1, 4) as vecenv:
        monkeypatch.setattr(vecenv, "recv", lambda original=vecenv.recv: stepped.append(1) or original())
        with pytest.raises(APIUsageError, match="progress.csv is not a CSV text file"):
            train(PPOConfig(**{**QUICK, "total_timesteps": 640}, run_dir=str(tmp_path)), make_binding("cartpole"),
                  logger=logger, vecenv=vecenv, resume_from=tmp_path)
    assert not stepped
    with pytest.raises(APIUsageError, match="Logger.log on a closed Logger"):  # not a logger that logs nowhere
        logger.log(400, {})

    class Counting:
        closes = 0

        def log(self, step, metrics): ...

        def message(self, text): ...

        def close(self):
            self.closes += 1

    for failing in (False, True):
        counting = Counting()
        with vector.Serial(make_binding("cartpole"), 1, 4) as vecenv:
            if failing:
                monkeypatch.setattr(vecenv, "recv", lambda: 1 / 0)
            with pytest.raises(ZeroDivisionError) if failing else contextlib.nullcontext():
                train(PPOConfig(**QUICK), make_binding("cartpole"), logger=counting, vecenv=vecenv)
        assert counting.closes == 1
    quiet = Logger(None, dashboard=False)  # writes no files: any start_step resumes
    (tmp_path / "progress.csv").write_text("global_step\n320\n")
    assert train(PPOConfig(**{**QUICK, "total_timesteps": 384}), make_binding("cartpole"), logger=quiet,
                 resume_from=tmp_path).global_step == 384


def test_a_logger_is_checked_and_closed_when_the_run_is_refused(tmp_path):
    class NoMessage:
        def log(self, step, metrics): ...

        def close(self): ...

    with pytest.raises(APIUsageError, match=r"logger must be a shoal.logging.Logger \(log, message and close\), got "
                                            r"NoMessage"):
        train(PPOConfig(**QUICK), make_binding("cartpole"), logger=NoMessage())
    train(PPOConfig(**QUICK, run_dir=str(tmp_path)), make_binding("cartpole"))
    logger = Logger(tmp_path, dashboard=False, tensorboard=False)  # start_step 0: would drop the run's rows
    with pytest.raises(APIUsageError, match=r"the logger starts at step 0, but the run resumes from step 320: make "
                                            r"it with start_step=320"):
        train(PPOConfig(**{**QUICK, "total_timesteps": 640}, run_dir=str(tmp_path)), make_binding("cartpole"),
              logger=logger, resume_from=tmp_path)
    with pytest.raises(APIUsageError, match="Logger.log on a closed Logger"):
        logger.log(1, {})
    assert [row["global_step"] for row in read_progress(tmp_path)][-1] == 320  # nothing rewritten
    with lock_run_dir(tmp_path), pytest.raises(APIUsageError, match="another run is using run_dir"):
        train(PPOConfig(**QUICK), make_binding("cartpole"), logger=Logger(tmp_path, dashboard=False))  # its own dir
    assert [row["global_step"] for row in read_progress(tmp_path)][-1] == 320


def test_resume_from_another_env_is_refused(tmp_path):
    train(PPOConfig(**QUICK, run_dir=str(tmp_path)), make_binding("cartpole"))
    assert load_checkpoint(tmp_path / "checkpoints")["path"] == str(latest_checkpoint(tmp_path))  # the folder: its run
    config = PPOConfig(**QUICK, env="gym:Acrobot-v1")
    with pytest.raises(APIUsageError, match="trained on env 'cartpole', not 'gym:Acrobot-v1'"):
        train(config, make_binding("gym:Acrobot-v1"), resume_from=tmp_path)


def test_resume_with_another_network_is_refused(tmp_path):
    train(PPOConfig(**QUICK, run_dir=str(tmp_path), lstm=True), make_binding("cartpole"))
    with pytest.raises(APIUsageError, match=r"holds LSTMPolicy\(MLPPolicy\) weights trained with policy='auto', "
                                            r"hidden_size=0, lstm=True, not this MLPPolicy's network: build the policy"
                                            r".* torch: Error\(s\) in loading state_dict for MLPPolicy: \w+"):
        train(PPOConfig(**{**QUICK, "total_timesteps": 4 * 16 * 6}), make_binding("cartpole"), resume_from=tmp_path)


def test_a_run_given_its_binding_or_policy_in_python_is_not_resumed_with_the_configs(tmp_path):
    binding = make_binding("cartpole")

    class Scaled(MLPPolicy):  # the default MLP's parameters: its weights would load into the default policy
        def encode(self, obs):
            return super().encode(obs * 100)

    train(PPOConfig(**QUICK, run_dir=str(tmp_path / "policy")), binding, policy=Scaled(binding))
    longer = PPOConfig(**{**QUICK, "total_timesteps": 4 * 16 * 6})
    with pytest.raises(APIUsageError, match=r"holds the weights of the Scaled that train\(\) was given: the shoal "
                                            r"command, and train\(\) without a policy, build only default policies"):
        train(longer, binding, resume_from=tmp_path / "policy")
    train(longer, binding, policy=Scaled(binding), resume_from=tmp_path / "policy")  # with its policy it goes on
    renamed = Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",), env_name="MyCartPole")
    train(PPOConfig(**QUICK, run_dir=str(tmp_path / "binding")), renamed)
    with pytest.raises(APIUsageError, match=r"was trained on 'MyCartPole', not on 'CartPole-v1': the shoal command "
                                            r"builds the env of the run's config.env \('cartpole'\). A run given a "
                                            r"binding of its own in Python goes on in Python with that binding"):
        train(longer, binding, resume_from=tmp_path / "binding")
    ppo.check_compatible(load_checkpoint(tmp_path / "binding"), binding, other_env=True)  # shoal eval --env
    spelled = Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",), env_name="classic/cartpole_v1")
    ppo.check_compatible(load_checkpoint(tmp_path / "policy"), spelled)  # a module's and a registry's name alike


def test_a_checkpoint_of_a_policy_train_was_given_is_not_said_to_come_from_the_config(tmp_path):
    binding = make_binding("cartpole")
    train(PPOConfig(**QUICK, run_dir=str(tmp_path)), binding, policy=LSTMPolicy(MLPPolicy(binding, 32)))
    with pytest.raises(APIUsageError, match=r"holds the weights of the LSTMPolicy\(MLPPolicy\) that train\(\) was given, "
                                            r"not this MLPPolicy's network: build that policy as the run did, in "
                                            r"Python .* torch: "):
        ppo.load_policy_state(ppo.make_policy(config_from_checkpoint(load_checkpoint(tmp_path)), binding),
                              load_checkpoint(tmp_path))


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("field,value,message", [
    ("num_envs", 0, "num_envs must be a positive integer, got 0"),
    ("num_steps", -5, "num_steps must be a positive integer, got -5"),
    ("envs_per_batch", 3, r"envs_per_batch \(3\) must divide num_envs \(4\)"),
    ("num_workers", 3, r"num_envs \(4\) must divide evenly among num_workers \(3\)"),
    ("learning_rate", 0.0, "learning_rate must be > 0"),
    ("gamma", 1.5, r"gamma and gae_lambda must lie in \[0, 1\]"),
    ("backend", "threads", "backend must be serial, multiprocessing or ray, got 'threads'"),
    ("clip_coef", -0.1, "clip_coef must be > 0, got -0.1"),
    ("max_grad_norm", 0, "max_grad_norm must be > 0, got 0"),
    ("target_kl", -1.0, "target_kl must be > 0, got -1.0"),
    ("vf_coef", -1.0, "vf_coef must be >= 0, got -1.0"),
    ("ent_coef", -0.01, "ent_coef must be >= 0, got -0.01"),
    ("ent_coef", float("nan"), "ent_coef must be a finite number, got nan"),
    ("stop_at_return", "high", "stop_at_return must be a finite number, got 'high'"),
    ("hidden_size", 1.5, "hidden_size must be an integer >= 0, got 1.5"),
    ("torch_threads", 100_000, r"torch_threads must be at most 1024 \(this machine has \d+ cores"),
    ("policy", "transformer", "policy must be auto, mlp, cnn or mixed, got 'transformer'"),
    ("anneal_lr", "no", "anneal_lr must be True or False, got 'no'"),
    ("env", 5, "env must be a non-empty string, got 5"),
    ("run_dir", 5, "run_dir must be a non-empty string, got 5"),
    ("env_timeout", -1, "env_timeout must be a positive number of seconds or None, got -1"),
    ("seed", -5, r"seed must be an integer from 0 to 2\*\*32 - 1"),
    ("envs_per_batch", 2, r"envs_per_batch \(2\) must be a multiple of each worker's envs, num_envs / num_workers = 4"),
    ("device", "mps", "device 'mps' is not available in this torch build: expected auto, cpu, cuda or cuda:N"),
    ("device", "meta", "device 'meta' holds no data"),
])
def test_bad_config_values_are_named(field, value, message):
    layout = {"num_workers": 1} if (field, value) == ("envs_per_batch", 2) else {}
    with pytest.raises(APIUsageError, match=message):
        train(PPOConfig(**{**QUICK, **layout, field: value}), make_binding("cartpole"))


def test_numpy_numbers_in_the_config_are_saved_as_python_numbers(tmp_path):
    config = PPOConfig(**{**QUICK, "total_timesteps": 64}, learning_rate=np.float32(1e-3), ent_coef=np.int64(0),
                       run_dir=str(tmp_path))
    train(config, make_binding("cartpole"))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["learning_rate"] == pytest.approx(1e-3) and saved["ent_coef"] == 0


def test_a_refused_new_run_leaves_the_directory_as_it_was(tmp_path):
    config = PPOConfig(**{**QUICK, "total_timesteps": 64}, run_dir=str(tmp_path))
    train(config, make_binding("cartpole"))
    writing = tmp_path / "checkpoints" / ".update_000002.pt.x1y2.tmp"  # maybe a run that is writing right now
    writing.write_bytes(b"half a checkpoint")
    with pytest.raises(APIUsageError, match="already holds checkpoints of an earlier run"):
        train(config, make_binding("cartpole"))
    assert writing.exists()


def test_train_result_and_checkpoint_helpers_check_their_arguments(tmp_path):
    result = train(PPOConfig(**QUICK), make_binding("cartpole"))
    with pytest.raises(APIUsageError, match="mean_return: last must be a positive int, got 0"):
        result.mean_return(0)
    with pytest.raises(APIUsageError, match="first_reached: window must be a positive int, got -1"):
        result.first_reached(475, window=-1)
    with pytest.raises(APIUsageError, match="first_reached: target must be a number, got None"):
        result.first_reached(None)
    with pytest.raises(APIUsageError, match=r"set_rng_states takes what rng_states\(\) returned, .*, got \[\]"):
        set_rng_states({})
    with pytest.raises(APIUsageError, match=r"keep \(0 keeps every checkpoint\) must be an int >= 0, got -1"):
        save_checkpoint(tmp_path, 1, {}, keep=-1)
    with pytest.raises(APIUsageError, match="expected a checkpoint dict .*, got NoneType"):
        ppo.check_compatible(None, make_binding("cartpole"))
    with pytest.raises(APIUsageError, match=r"takes a checkpoint dict with the model's state dict under 'model' .*, "
                                            r"got a dict with keys \[\]"):
        ppo.load_policy_state(result.policy, {})
    import shoal
    assert shoal.TrainingError is TrainingError


# ---------------------------------------------------------------- learning


def test_default_cartpole_preset_solves_cartpole():
    # The config `shoal train` runs: a 20-episode mean return of 475 well within its step budget.
    config = PPOConfig(**{**preset("cartpole"), "dashboard": False, "tensorboard": False})
    result = train(config, make_binding("cartpole"))
    reached = result.first_reached(475)
    assert reached is not None, f"mean return of the last 20 episodes: {result.mean_return():.1f}"
    assert reached[0] <= config.total_timesteps


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cartpole_reaches_475_within_500k_steps(seed):
    config = PPOConfig(**{**preset("cartpole"), "seed": seed, "total_timesteps": 500_000, "dashboard": False,
                          "tensorboard": False})
    result = train(config, make_binding("cartpole"))
    assert result.first_reached(475) is not None, f"seed {seed}: {result.mean_return():.1f}"


# ---------------------------------------------------------------- custom policies


class LazyPolicy(Policy):
    """A user policy whose first layer learns its input size on the first call (as the README's MapPolicy)."""

    def __init__(self, binding):
        super().__init__(binding, feature_size=16)
        self.net = torch.nn.Sequential(torch.nn.LazyLinear(16), torch.nn.Tanh())

    def encode(self, obs):
        return self.net(obs.float())


@pytest.mark.parametrize("lstm", [False, True], ids=["plain", "lstm"])
def test_a_policy_with_lazy_modules_trains_them(lstm):
    binding = make_binding("cartpole")
    policy = LSTMPolicy(LazyPolicy(binding)) if lstm else LazyPolicy(binding)
    result = train(PPOConfig(**QUICK), binding, policy=policy)
    lazy = (policy.policy if lstm else policy).net[0]
    assert lazy.weight.shape == (16, 4) and not lazy.weight.is_inference() and lazy.weight.grad is not None
    assert all(np.isfinite(row["loss/value"]) for row in result.history)


def test_the_configs_policy_settings_are_refused_with_a_policy_of_ones_own(tmp_path):
    binding = make_binding("cartpole")
    config = PPOConfig(**QUICK, lstm=True, hidden_size=7, policy="cnn", run_dir=str(tmp_path / "run"))
    with pytest.raises(APIUsageError, match=r"the config sets policy='cnn', hidden_size=7, lstm=True, which only shape "
                                            r"the default policy, but train got policy=MLPPolicy: leave them at their "
                                            r"defaults \(policy='auto', hidden_size=0, lstm=False\) or drop policy=$"):
        train(config, binding, policy=MLPPolicy(binding))
    assert not (tmp_path / "run").exists()  # refused before config.json could describe the wrong network
    train(dataclasses.replace(config, lstm=False, hidden_size=0, policy="auto"), binding, policy=MLPPolicy(binding))


class IntegerValuePolicy(LazyPolicy):
    def forward(self, obs, state=None, starts=None):
        params, value = self.decode(self.encode(obs))
        return params, value.round().long(), None


def test_a_policy_whose_values_are_integers_is_refused_before_training():
    binding = make_binding("cartpole")
    with pytest.raises(APIUsageError, match=r"IntegerValuePolicy returns values of dtype torch.int64: expected a "
                                            r"floating-point torch tensor"):
        train(PPOConfig(**QUICK), binding, policy=IntegerValuePolicy(binding))


class MaskedPolicy(MLPPolicy):
    """Masks CartPole's action 0 with a -inf logit, as a policy masking invalid actions does."""

    def forward(self, obs, state=None, starts=None):
        params, value, _ = super().forward(obs)
        return params.masked_fill(torch.tensor([True, False], device=params.device), -math.inf), value, None

    def acting_forward(self):
        return lambda obs: self(obs)[:2]


def test_actions_masked_by_minus_inf_logits_train_with_a_finite_entropy():
    result = train(PPOConfig(**QUICK), make_binding("cartpole"), policy=MaskedPolicy(make_binding("cartpole")))
    assert all(row["loss/entropy"] == 0 and math.isfinite(row["loss/policy"]) for row in result.history)


def test_a_network_too_big_for_memory_is_one_error(monkeypatch):
    binding = make_binding("cartpole")
    with pytest.raises(APIUsageError, match=r"the mlp policy of hidden_size 1000000 does not fit in memory"):
        train(PPOConfig(**QUICK, hidden_size=10**6), binding)

    def out_of_memory(module, *args, **kwargs):  # as moving a network too big for the GPU fails
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setattr(torch.nn.Module, "to", out_of_memory)
    with pytest.raises(APIUsageError, match=r"the MLPPolicy network, 0.0 GiB of parameters, does not fit in the memory "
                                            r"of cpu: choose a smaller network \(hidden_size\) or another device$"):
        train(PPOConfig(**QUICK, device="cpu"), binding)


def test_env_timeout_bounds_the_workers_start_too():
    home = os.getpid()

    def slow_to_build():  # builds here (the Binding probes it), hangs in a worker
        if os.getpid() != home:
            time.sleep(3600)
        return gymnasium.make("CartPole-v1")

    with pytest.raises(WorkerError, match=r"did not answer startup \(building its envs\) within 1(\.0)? s: an env's "
                                          r"constructor hangs or is too slow \(raise startup_timeout if it is only "
                                          r"slow; in training, env_timeout\)"):
        train(PPOConfig(**QUICK, backend="multiprocessing", num_workers=2, env_timeout=1.0),
              Binding(env_creator=slow_to_build))


def test_rollout_storage_too_big_for_memory_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(ppo, "available_memory", lambda: 2**20)
    with pytest.raises(APIUsageError, match=r"^the rollout storage does not fit in memory: 8,193 rows \(num_steps \+ 1\) "
                                            r"x 16 agent slots \(16 envs x max_agents 1\) x 41 bytes \(the observation, "
                                            r"float32 \(4,\), and the action\), and the update's two copies of the "
                                            r"observations, is 0.0 GiB, 0.0 GiB available: lower "
                                            r"num_steps or num_envs, or make observations smaller with a feature_parser$"):
        train(PPOConfig(num_envs=16, num_steps=8192, dashboard=False, run_dir=str(tmp_path / "run")),
              make_binding("cartpole"))
    assert not (tmp_path / "run").exists()


def test_a_logger_that_fails_to_close_leaves_the_runs_vec_env_closed(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(ppo, "make_vecenv", lambda config, binding, make=ppo.make_vecenv: made.append(
        make(config, binding)) or made[-1])
    close = Logger.close

    def full_disk(logger):
        close(logger)
        raise OSError(28, "No space left on device", "progress.csv")

    monkeypatch.setattr(Logger, "close", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        train(PPOConfig(**QUICK, run_dir=str(tmp_path)), make_binding("cartpole"))
    assert len(made) == 1 and "CLOSED" in repr(made[0])


def test_a_failure_before_the_first_rollout_closes_the_runs_vec_env(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(ppo, "make_vecenv", lambda config, binding, make=ppo.make_vecenv: made.append(
        make(config, binding)) or made[-1])

    def out_of_memory(max_agents):
        raise MemoryError("Unable to allocate")

    monkeypatch.setattr(ppo, "_SlotRows", out_of_memory)
    with pytest.raises(MemoryError):
        train(PPOConfig(**QUICK, run_dir=str(tmp_path)), make_binding("cartpole"))
    assert len(made) == 1 and "CLOSED" in repr(made[0])


@pytest.mark.parametrize("option", ["emulate_flat_obs", "emulate_const_num_agents"])
def test_training_needs_the_flat_data_contract(option):
    binding = Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",), **{option: False})
    with pytest.raises(APIUsageError, match=f"the trainer reads the flat data contract: build the Binding with "
                                            f"{option}=True"):
        train(PPOConfig(**QUICK), binding)
    with pytest.raises(APIUsageError, match="the trainer reads the flat data contract"):
        evaluate(MLPPolicy(make_binding("cartpole")), binding)


def test_train_and_evaluate_arguments_of_the_wrong_kind_are_named():
    cartpole = make_binding("cartpole")
    with pytest.raises(APIUsageError, match="train needs a PPOConfig, got dict"):
        train({"num_envs": 4}, cartpole)
    with pytest.raises(APIUsageError, match="expected a shoal.Binding, got TimeLimit"):
        train(PPOConfig(**QUICK), gymnasium.make("CartPole-v1"))
    with vector.make(make_binding("gym:Acrobot-v1"), "serial", envs_per_worker=4) as acrobot:
        with pytest.raises(APIUsageError, match="vecenv steps Acrobot-v1, whose flat spaces .* are not CartPole-v1's"):
            train(PPOConfig(**QUICK), cartpole, vecenv=acrobot)
    padded = Binding(env_cls=envs.PaddedCartPole)  # the same spaces per agent, another agent count
    with vector.make(padded, "serial", envs_per_worker=4) as padded_vecenv:
        with pytest.raises(APIUsageError, match=r"vecenv steps an env with agents \['a_ghost', 'cart', 'z_ghost'\], not "
                                                r"CartPole-v1's \[0\]"):
            train(PPOConfig(**QUICK), cartpole, vecenv=padded_vecenv)
    with pytest.raises(APIUsageError, match="logger must be a shoal.logging.Logger"):
        train(PPOConfig(**QUICK), cartpole, logger="x")
    policy = MLPPolicy(cartpole)
    with pytest.raises(APIUsageError, match="evaluate: episodes must be a positive int, got 0"):
        evaluate(policy, cartpole, episodes=0)
    with pytest.raises(APIUsageError, match="evaluate: deterministic must be True or False, got 'no'"):
        evaluate(policy, cartpole, deterministic="no")
    quiet = Binding(env_creator=gymnasium.make, env_args=("CartPole-v1",), record_episode_statistics=False)
    with pytest.raises(APIUsageError, match=r"no episode ended within max_steps=600 steps: raise max_steps .* \(its "
                                       r"returns come from the env's own infos\[agent\]\['episode'\]"):
        evaluate(MLPPolicy(quiet), quiet, max_steps=600)
    with pytest.raises(APIUsageError, match="policy must be a shoal.policy.Policy"):
        evaluate(None, cartpole)


class EpisodeInfo(gymnasium.Wrapper):
    """CartPole whose infos carry an "episode" of its own at every step: ``make(step, ended)`` gives it."""

    def __init__(self, make):
        super().__init__(gymnasium.make("CartPole-v1", max_episode_steps=20))
        self.make, self.steps = make, 0

    def step(self, action):
        obs, reward, terminal, truncation, info = self.env.step(action)
        self.steps += 1
        return obs, reward, terminal, truncation, {**info, "episode": self.make(self.steps, terminal or truncation)}


def test_episode_statistics_come_only_from_an_agents_end_in_shoals_or_gymnasiums_format():
    config = PPOConfig(num_envs=2, num_steps=32, total_timesteps=128, dashboard=False, tensorboard=False)
    running = Binding(env_creator=EpisodeInfo, env_args=(lambda steps, ended: {"return": steps, "length": steps},))
    result = train(config, running)  # the env's running totals pass through; only shoal's, at the ends, count
    assert 128 / 20 <= len(result.episodes) < 30 and all(ret == length <= 20 for *_, ret, length in result.episodes)
    assert all(ret <= 20 for ret in evaluate(MLPPolicy(running), running, episodes=3))
    counter = Binding(env_creator=EpisodeInfo, env_args=(lambda steps, ended: steps,))
    assert train(config, counter).global_step == 128
    gym_format = Binding(env_creator=lambda: gymnasium.wrappers.RecordEpisodeStatistics(
        gymnasium.make("CartPole-v1", max_episode_steps=20)), record_episode_statistics=False)
    result = train(config, gym_format)
    assert 128 / 20 <= len(result.episodes) < 30 and all(ret == length <= 20 for *_, ret, length in result.episodes)
    assert all(ret <= 20 for ret in evaluate(MLPPolicy(gym_format), gym_format, episodes=2))
    other = Binding(env_creator=EpisodeInfo, env_args=(lambda steps, ended: steps,), record_episode_statistics=False)
    with pytest.raises(APIUsageError, match=r"CartPole-v1, agent 0: infos\['episode'\] at the agent's end must hold "
                                            r"'return' and 'length' .* or 'r' and 'l' .*, got \d+\. With "):
        train(config, other)


class PositionEnv(gymnasium.Env):
    """A nested observation whose leaves differ between subclasses, but not its flat bytes."""

    pos_dtype = np.int64
    action_space = gymnasium.spaces.Discrete(2)

    def __init__(self):
        self.observation_space = gymnasium.spaces.Dict({"pos": gymnasium.spaces.Box(0, 7, (2,), self.pos_dtype),
                                                        "hp": gymnasium.spaces.Box(0, 1, (), np.float32)})

    def reset(self, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 1.0, False, True, {}


class FloatPositionEnv(PositionEnv):
    pos_dtype = np.float64  # 8 bytes, as int64: the same flat byte buffer


def test_a_policy_or_checkpoint_of_other_observation_leaves_with_the_same_bytes_is_refused(tmp_path):
    ints, floats = Binding(env_cls=PositionEnv), Binding(env_cls=FloatPositionEnv)
    assert ints.single_observation_space == floats.single_observation_space  # bytes alone do not tell
    differ = r"\(leaf 1: \['pos'\] Box\(2,\) int64, not \['pos'\] Box\(2,\) float64\)"  # leaf 0 is 'hp'
    with pytest.raises(APIUsageError, match=rf"MixedPolicy was built for PositionEnv, whose observation leaves are "
                                            rf"not FloatPositionEnv's {differ}: build it with this binding"):
        train(PPOConfig(**QUICK), floats, policy=MixedPolicy(ints))
    with vector.Serial(ints, 1, 4) as vecenv, pytest.raises(
            APIUsageError, match=rf"vecenv steps PositionEnv, whose observation leaves are not FloatPositionEnv's "
                                 rf"{differ}: make it from this binding"):
        train(PPOConfig(**QUICK), floats, vecenv=vecenv)
    train(PPOConfig(**{**QUICK, "total_timesteps": 64}, run_dir=str(tmp_path)), ints)
    checkpoint = load_checkpoint(tmp_path)
    with pytest.raises(APIUsageError, match=rf"does not fit env 'FloatPositionEnv': its observation leaves are not "
                                            rf"the env's {differ}$"):
        ppo.check_compatible(checkpoint, floats)
    ppo.check_compatible(checkpoint, ints)
    checkpoint["spaces"]["observation leaves"] = "; ".join(checkpoint["spaces"]["observation leaves"])
    ppo.check_compatible(checkpoint, floats, other_env=True)  # one string, a short-lived format: compared on the rest
    del checkpoint["spaces"]["observation leaves"]  # a checkpoint from before they were recorded
    ppo.check_compatible(checkpoint, floats, other_env=True)


def test_a_policy_that_does_not_fit_the_env_is_refused_before_training():
    cartpole, pendulum = make_binding("cartpole"), make_binding("gym:Pendulum-v1")
    with pytest.raises(APIUsageError, match="policy must be a shoal.policy.Policy .* got Linear"):
        train(PPOConfig(**QUICK), cartpole, policy=torch.nn.Linear(4, 2))
    with pytest.raises(APIUsageError, match="LSTMPolicy wraps a shoal.policy.Policy .* got Linear"):
        LSTMPolicy(torch.nn.Linear(4, 2))
    with pytest.raises(APIUsageError, match=r"MLPPolicy was built for Pendulum-v1, whose flat observation space "
                                            r"Box\(.*\(3,\), float32\) is not CartPole-v1's"):
        train(PPOConfig(**QUICK), cartpole, policy=MLPPolicy(pendulum))
    other = MLPPolicy(cartpole)
    other.action_head = DiscreteHead(64, np.array([3]))
    with pytest.raises(APIUsageError, match=r"MLPPolicy's action head chooses among \[3\]: CartPole-v1's flat "
                                            r"action space is MultiDiscrete\(\[2\]\)"):
        train(PPOConfig(**QUICK), cartpole, policy=other)


LIVES = {  # reset (shown, listed), then per step (shown, terminated, listed after it): see envs.ScriptedLives
    "one dies while the other is dark, and respawns": ((("a",), ("a", "b")), [
        (("a",), (), ("a", "b")), (("a",), ("a",), ("b",)), (("a",), (), ("a", "b")), (("a", "b"), ("a", "b"), ())]),
    "one appears in the step the other dies": ((("a",), ("a",)), [
        (("a",), (), ("a",)), (("a", "b"), ("a",), ("b",)), (("a", "b"), (), ("a", "b")), (("a", "b"), ("a", "b"), ())]),
    "every agent dark for a step": ((("a", "b"), ("a", "b")), [
        (("a", "b"), (), ("a", "b")), ((), (), ("a", "b")), (("a", "b"), ("a", "b"), ())]),
    "one absent at reset": ((("a",), ("a",)), [(("a", "b"), (), ("a", "b")), (("a", "b"), ("a", "b"), ())]),
}


def test_a_vecenv_passed_in_sets_the_runs_layout(tmp_path):
    binding = make_binding("cartpole")
    config = PPOConfig(**{**QUICK, "num_envs": 2, "total_timesteps": 128}, run_dir=str(tmp_path))
    with vector.make(binding, "serial", num_workers=2, envs_per_worker=2, batch_size=2) as vecenv:
        train(config, binding, vecenv=vecenv)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["num_envs"], saved["num_workers"], saved["envs_per_batch"], saved["backend"]) == (4, 2, 2, "serial")
    with vector.make(binding, "serial", num_workers=3, batch_size=2) as vecenv:  # batches of 2 out of 3 envs
        with pytest.raises(APIUsageError, match=r"vecenv: its layout \(3 envs, batches of 2\) is not one a PPOConfig "
                                                r"can describe, so a run_dir's run could not be resumed: envs_per_batch "
                                                r"\(2\) must divide num_envs \(3\)"):
            train(config, binding, vecenv=vecenv)
        assert train(dataclasses.replace(config, run_dir=None), binding, vecenv=vecenv).global_step >= 128  # no files


@pytest.mark.parametrize("lives", LIVES)
def test_global_step_counts_exactly_the_transitions_of_the_documented_rule(lives):
    reset, script = LIVES[lives]
    binding = Binding(env_cls=envs.ScriptedLives, env_kwargs=dict(reset=reset, script=script))
    config = PPOConfig(**{**QUICK, "num_envs": 2, "num_steps": 8, "total_timesteps": 160})
    with vector.make(binding, "serial", envs_per_worker=2) as vecenv:
        result = train(config, binding, vecenv=vecenv)
        logs = vecenv.get_attr("log")
    # Each env's last step answers the actions sent before the last update: no transition of the run's.
    expected = sum(len(before & acted & answered) for log in logs for before, acted, answered in log[:-1])
    assert result.global_step == expected


class NaNPolicy(MLPPolicy):
    """Its outputs turn NaN once ``poisoned`` is set, as a diverged network's do."""

    poisoned = False

    def forward(self, obs, state=None, starts=None):
        params, value, state = super().forward(obs, state, starts)
        return (params * math.nan, value, state) if self.poisoned else (params, value, state)

    def acting_forward(self):
        return lambda obs: self(obs)[:2]


def test_training_stops_when_the_losses_or_actions_stop_being_finite(tmp_path):
    for env, match in [("cartpole", r"update 1 \(step 320\): the losses are not finite \(policy nan"),
                       ("gym:Pendulum-v1", r"update 1 \(step 0\): the policy's actions are not finite \(\[nan, nan")]:
        binding = make_binding(env)
        policy = NaNPolicy(binding)
        policy.poisoned = True
        config = PPOConfig(**{**QUICK, "num_envs": 4, "num_steps": 80}, run_dir=str(tmp_path / env.replace(":", "_")))
        with pytest.raises(TrainingError, match=match + r".*stopped without writing a checkpoint of it$"):
            train(config, binding, policy=policy)  # and no word of a kept checkpoint: there is none
        assert list_checkpoints(config.run_dir) == []


def test_a_run_that_diverges_after_a_checkpoint_names_the_one_kept(tmp_path):
    binding = make_binding("cartpole")
    config = PPOConfig(**QUICK, run_dir=str(tmp_path))
    train(config, binding)
    policy = NaNPolicy(binding)
    policy.poisoned = True
    with pytest.raises(TrainingError, match=r"update 6 .*: the losses are not finite .*stopped without writing a "
                                            r"checkpoint of it; its last checkpoint, .*update_000005.pt, is kept$"):
        train(dataclasses.replace(config, total_timesteps=4 * 16 * 7), binding, policy=policy, resume_from=tmp_path)


def test_a_run_dir_holding_another_runs_checkpoints_is_refused(tmp_path):
    binding = make_binding("cartpole")
    config = PPOConfig(**QUICK, run_dir=str(tmp_path), checkpoint_interval=1, keep_checkpoints=0)
    train(config, binding)
    with pytest.raises(APIUsageError, match=r"already holds checkpoints of an earlier run \(newest update_000005.pt\): "
                                            r"resume it"):
        train(config, binding)
    with pytest.raises(APIUsageError, match=r"holds update_000003.pt, newer than the checkpoint resumed from \(update 2\)"):
        train(config, binding, resume_from=tmp_path / "checkpoints" / "update_000002.pt")
    assert len(list_checkpoints(tmp_path)) == 5  # nothing of the earlier run was touched


def test_a_run_dir_in_use_by_another_run_is_refused(tmp_path):
    binding = make_binding("cartpole")
    config = PPOConfig(**QUICK, run_dir=str(tmp_path))
    with lock_run_dir(tmp_path):  # as a run in another process holds it
        with pytest.raises(APIUsageError, match=r"another run is using run_dir '.*' \(it holds the directory's "
                                                r"lock\): wait until it ends, or choose another run_dir"):
            train(config, binding)
    assert os.listdir(tmp_path) == []  # the refused run wrote nothing
    with pytest.raises(APIUsageError, match="is not CartPole-v1's"):  # refused while it holds the lock
        train(config, binding, policy=MLPPolicy(make_binding("gym:Pendulum-v1")))
    train(config, binding)  # a run that ended, even with an error, holds the lock no longer
    with pytest.raises(APIUsageError, match="already holds checkpoints"):
        train(config, binding)
    train(dataclasses.replace(config, total_timesteps=4 * 16 * 6), binding, resume_from=config.run_dir)


def test_a_refused_run_leaves_no_directory_it_made(tmp_path):
    cartpole, pendulum = make_binding("cartpole"), make_binding("gym:Pendulum-v1")
    config = PPOConfig(**QUICK, run_dir=str(tmp_path / "new" / "sweep" / "seed1"))  # nor the folders above it
    (tmp_path / "new" / "other").mkdir(parents=True)  # but not one that was there, nor what holds something
    with pytest.raises(APIUsageError, match="is not CartPole-v1's"):
        train(config, cartpole, policy=MLPPolicy(pendulum))
    assert [path.name for path in tmp_path.rglob("*")] == ["new", "other"]


def test_resuming_into_a_run_dir_with_another_runs_checkpoints_is_refused(tmp_path):
    binding = make_binding("cartpole")
    first, other = (PPOConfig(**QUICK, run_dir=str(tmp_path / name), seed=seed) for name, seed in (("a", 1), ("b", 2)))
    train(first, binding)
    train(other, binding)
    before = {path.name: path.read_bytes() for path in list_checkpoints(other.run_dir)}
    longer = dataclasses.replace(other, total_timesteps=4 * 16 * 6)
    with pytest.raises(APIUsageError, match=r"run_dir '.*b' holds checkpoints of another run \(newest "
                                            r"update_000005.pt\), and the checkpoint resumed from, "
                                            r".*a/checkpoints/update_000005.pt, is not one of them: continue into"):
        train(longer, binding, resume_from=first.run_dir)
    assert {path.name: path.read_bytes() for path in list_checkpoints(other.run_dir)} == before
    branch = train(dataclasses.replace(longer, run_dir=str(tmp_path / "c")), binding, resume_from=first.run_dir)
    assert branch.start_step == 320 and [path.name for path in list_checkpoints(tmp_path / "c")] == ["update_000006.pt"]


def test_resuming_a_run_that_is_done_is_refused_before_anything_is_written(tmp_path):
    binding = make_binding("cartpole")
    config = PPOConfig(**QUICK, run_dir=str(tmp_path))
    train(config, binding)
    files = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    for total in (320, 100):
        with pytest.raises(APIUsageError, match=fr"update_000005.pt: the run is already at step 320 of total_timesteps "
                                                fr"{total}: pass a larger total_timesteps"):
            train(dataclasses.replace(config, total_timesteps=total, learning_rate=1.0), binding, resume_from=tmp_path)
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == files


def test_a_resumed_run_goes_on_counting_episodes_and_wall_time(tmp_path):
    binding = make_binding("cartpole")
    config = PPOConfig(**QUICK, run_dir=str(tmp_path))
    first = train(config, binding)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["episodes"] == len(first.episodes) == first.history[-1]["episode/total"] > 0
    assert checkpoint["wall_time"] == first.history[-1]["wall_time"] > 0

    longer = dataclasses.replace(config, total_timesteps=4 * 16 * 6)
    resumed = train(longer, binding, resume_from=tmp_path)
    assert resumed.history[-1]["episode/total"] == checkpoint["episodes"] + len(resumed.episodes)
    assert resumed.history[-1]["wall_time"] > checkpoint["wall_time"]
    wall_times = [row["wall_time"] for row in read_progress(tmp_path)]
    assert wall_times == sorted(wall_times) and len(wall_times) == 6

    path = list_checkpoints(tmp_path)[-1]  # a checkpoint written before the two counts were saved
    old = {key: value for key, value in torch.load(path, weights_only=False).items()
           if key not in ("episodes", "wall_time")}
    save_atomic(old, path)
    again = train(dataclasses.replace(config, total_timesteps=4 * 16 * 7), binding, resume_from=tmp_path)
    assert again.history[-1]["episode/total"] == len(again.episodes)


def test_resuming_past_a_damaged_newest_checkpoint_sets_it_aside(tmp_path):
    binding = make_binding("cartpole")
    config = PPOConfig(**QUICK, run_dir=str(tmp_path), checkpoint_interval=1, keep_checkpoints=2)
    train(config, binding)
    (tmp_path / "checkpoints" / "update_000005.pt").write_bytes(b"not a checkpoint")  # a disk fault
    unfinished = tmp_path / "checkpoints" / ".update_000006.pt.x1y2.tmp"  # a write cut short by a kill
    unfinished.write_bytes(b"half a checkpoint")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train(dataclasses.replace(config, total_timesteps=4 * 16 * 7), binding, resume_from=tmp_path)
    [warning] = caught  # loading past it said it is damaged; setting it aside does not say so again
    assert re.search(r"update_000005.pt' cannot be read .*: loaded the newest one that can be, .*update_000004.pt",
                     str(warning.message))
    assert resumed.start_step == 4 * 16 * 4 and resumed.updates == 7
    assert [path.name for path in list_checkpoints(tmp_path)] == ["update_000006.pt", "update_000007.pt"]
    assert (tmp_path / "checkpoints" / "update_000005.pt.damaged").exists() and not unfinished.exists()

    (tmp_path / "checkpoints" / "update_000007.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="update_000007.pt' cannot be read .*: renamed it update_000007.pt.damaged"):
        train(dataclasses.replace(config, total_timesteps=4 * 16 * 8), binding,  # a file: nothing said it yet
              resume_from=tmp_path / "checkpoints" / "update_000006.pt")


def test_parameters_broken_by_the_last_step_of_an_update_are_not_checkpointed(tmp_path, monkeypatch):
    def infinite_gradients(parameters, max_norm):
        for parameter in parameters:
            parameter.grad.fill_(math.inf)

    monkeypatch.setattr(ppo, "clip_grad_norm", infinite_gradients)  # its loss was finite, its step is not
    config = PPOConfig(**{**QUICK, "num_minibatches": 1, "update_epochs": 1}, run_dir=str(tmp_path), checkpoint_interval=1)
    with pytest.raises(TrainingError, match=r"update 1 \(step 64\): the policy's parameters are not finite: "
                                            r".*stopped without writing a checkpoint of it$"):
        train(config, make_binding("cartpole"))
    assert list_checkpoints(tmp_path) == []


def test_a_checkpoint_without_the_trainers_keys_is_refused(tmp_path):
    binding = make_binding("cartpole")
    save_checkpoint(tmp_path, 1, {"model": MLPPolicy(binding).state_dict(), "env": "cartpole"})
    with pytest.raises(APIUsageError, match="is not a checkpoint of shoal's trainer: it lacks optimizer, config, spaces"):
        train(PPOConfig(**QUICK), binding, resume_from=tmp_path)
    with pytest.raises(APIUsageError, match="is not a checkpoint of shoal's trainer"):
        config_from_checkpoint(load_checkpoint(tmp_path))


def test_a_checkpoint_with_a_step_that_is_no_count_or_weights_that_are_not_finite_is_refused(tmp_path):
    binding = make_binding("cartpole")
    train(PPOConfig(**QUICK, run_dir=str(tmp_path / "run")), binding)
    checkpoint = load_checkpoint(tmp_path / "run")
    for key, value in (("global_step", "320"), ("update", -1)):
        with pytest.raises(APIUsageError, match=f"it lacks an integer {key} >= 0 \\(it holds {value!r}\\)"):
            config_from_checkpoint({**checkpoint, key: value})
    damaged = {**checkpoint, "model": {**checkpoint["model"]}}
    name = next(name for name in damaged["model"] if name.endswith("weight"))
    damaged["model"][name] = torch.full_like(damaged["model"][name], math.nan)  # as a flipped bit in the file can
    with pytest.raises(APIUsageError, match=f"the policy's parameter '{name}' holds values that are not finite"):
        ppo.load_policy_state(MLPPolicy(binding), damaged)


class DiesBeforeTheEnd(ParallelEnv):
    """Agent "b" dies at step 1, agent "a" at step 2, which ends the episode (the env resets in that step).
    Counts the actions the env really receives."""

    metadata = {"name": "dies_before_the_end"}
    possible_agents = ["a", "b"]
    received = 0

    def observation_space(self, agent):
        return gymnasium.spaces.Box(-1, 1, (1,), np.float32)

    def action_space(self, agent):
        return gymnasium.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        self.t, self.agents = 0, ["a", "b"]
        return {agent: np.zeros(1, np.float32) for agent in self.agents}, {}

    def step(self, actions):
        type(self).received += len(actions)
        self.t += 1
        obs = {agent: np.full(1, 0.5, np.float32) for agent in self.agents}
        ending = {"a": self.t == 2, "b": self.t == 1}
        terminals = {agent: ending[agent] for agent in self.agents}
        self.agents = [agent for agent in self.agents if not ending[agent]]
        return obs, {agent: 1.0 for agent in obs}, terminals, {agent: False for agent in obs}, {}


class OneAgentShownLate(ParallelEnv):
    """A PettingZoo env of one agent, listed but not shown at reset, shown at step 1, ended at step 2 with an
    observation (the autoreset shows nothing): one transition per episode, step 1's. Logs each step's count."""

    metadata = {"name": "one_agent_shown_late"}
    possible_agents = ["a"]
    counted: list = []

    def observation_space(self, agent):
        return gymnasium.spaces.Box(-1, 1, (1,), np.float32)

    def action_space(self, agent):
        return gymnasium.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        self.t, self.agents = 0, ["a"]
        return {}, {}

    def step(self, actions):
        self.t += 1
        type(self).counted.append(int(self.t == 2))  # (step 1's obs, its action, step 2's reward)
        return {"a": np.full(1, 0.5, np.float32)}, {"a": 1.0}, {"a": self.t == 2}, {"a": False}, {}


@pytest.mark.parametrize("lstm", [False, True], ids=["mlp", "lstm"])
def test_a_one_agent_pettingzoo_env_follows_the_final_observation_rule(lstm):
    OneAgentShownLate.counted = []
    result = train(PPOConfig(num_envs=1, num_steps=12, total_timesteps=12 * 3, lstm=lstm, dashboard=False,
                             tensorboard=False), Binding(env_cls=OneAgentShownLate))
    # every other step's action starts no transition: twice as many env steps as transitions
    assert result.global_step == sum(OneAgentShownLate.counted[:result.updates * 12]) == result.updates * 12 // 2


@pytest.mark.parametrize("lstm", [False, True], ids=["mlp", "lstm"])
def test_an_agents_final_observation_starts_no_transition_even_when_its_slot_is_live_next_step(lstm):
    # b's last observation comes at step 1 (mask True, with its flag); at step 2 the env resets and b's slot
    # holds the next episode's first observation (mask True again). The action sent for b's last observation
    # never reached the env: that transition must not count.
    DiesBeforeTheEnd.received = 0
    result = train(PPOConfig(num_envs=2, num_steps=12, total_timesteps=2 * 12 * 4, lstm=lstm, dashboard=False,
                             tensorboard=False), Binding(env_cls=DiesBeforeTheEnd))
    assert result.global_step == DiesBeforeTheEnd.received - 2 * 2  # less the actions still in flight at the end


def test_an_env_that_never_shows_an_agent_is_an_error_not_an_endless_run():
    class Silent(ParallelEnv):
        metadata = {"name": "silent"}
        possible_agents = ["a", "b"]

        def observation_space(self, agent):
            return gymnasium.spaces.Box(-1, 1, (2,), np.float32)

        def action_space(self, agent):
            return gymnasium.spaces.Discrete(2)

        def reset(self, seed=None, options=None):
            self.agents = ["a", "b"]
            return {}, {}

        def step(self, actions):
            return {}, {}, {}, {}, {}

    with pytest.raises(TrainingError, match=r"update 1 \(step 0\): the rollout \(16 steps x 4 envs\) held no "
                                            r"transition.*Does silent return observations"):
        train(PPOConfig(**QUICK, run_dir=None), Binding(env_cls=Silent))
