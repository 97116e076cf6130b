"""Policies: defaults picked from raw spaces, unflattening inside forward, heads, the LSTM wrapper."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces

import envs
from shoal import Binding
from shoal.envs import make_binding
from shoal.errors import APIUsageError, SpaceError
from shoal.policy import (DiscreteHead, GaussianHead, LSTMPolicy, MixedPolicy, MLPPolicy, NatureCNN, Policy,
                          check_policy, default_policy, leaf_features)


class BoxEnv(gymnasium.Env):
    """Any observation and action space; for building bindings, never stepped."""

    def __init__(self, observation_space=spaces.Box(-1, 1, (3,)), action_space=spaces.Discrete(2)):
        self.observation_space = observation_space
        self.action_space = action_space

    def reset(self, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def _binding(obs_space, action_space=spaces.Discrete(2)) -> Binding:
    return Binding(env_creator=BoxEnv, env_kwargs=dict(observation_space=obs_space, action_space=action_space))


@pytest.mark.parametrize("obs_space,expected", [
    (spaces.Box(-1, 1, (4,)), MLPPolicy),
    (spaces.Box(0, 255, (4, 84, 84), np.uint8), NatureCNN),
    (spaces.Box(0, 255, (64, 64, 3), np.uint8), NatureCNN),
    (spaces.Box(0, 255, (64, 64, 6), np.uint8), NatureCNN),  # two stacked RGB frames, channels last
    (spaces.Box(0, 255, (8, 8), np.uint8), MixedPolicy),  # too small for the Nature CNN
    (spaces.Discrete(7), MixedPolicy),
    (envs.OBS_SPACE, MixedPolicy),
])
def test_default_policy_is_picked_from_the_raw_observation_space(obs_space, expected):
    policy = default_policy(_binding(obs_space))
    assert type(policy) is expected
    flat = torch.as_tensor(np.stack([policy.binding.flatten_observation(obs_space.sample()) for _ in range(5)]))
    params, value, state = policy(flat)
    assert params.shape == (5, 2) and value.shape == (5,) and state is None


def test_default_policy_options():
    binding = _binding(spaces.Box(-1, 1, (4,)))
    assert type(default_policy(binding, kind="mixed")) is MixedPolicy
    lstm = default_policy(binding, lstm=True, hidden_size=16)
    assert isinstance(lstm, LSTMPolicy) and lstm.feature_size == 32  # actor + critic towers
    with pytest.raises(SpaceError, match="unknown policy kind 'transformer'"):
        default_policy(binding, kind="transformer")


def test_cnn_reads_channels_last_frames_in_the_right_order():
    binding = _binding(spaces.Box(0, 255, (64, 64, 3), np.uint8))
    policy = default_policy(binding)
    assert policy.channels_last and policy.chw == (3, 64, 64)
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[..., 2] = 255  # only the last channel lit
    flat = torch.as_tensor(binding.flatten_observation(frame))[None]
    seen = {}
    policy.convs[0].register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    policy(flat)
    assert torch.equal(seen["x"][0, 2], torch.ones(64, 64)) and seen["x"][0, :2].abs().sum() == 0


def test_mixed_policy_turns_each_leaf_into_floats_without_reading_raw_bytes():
    binding = Binding(env_cls=envs.NestedMultiAgentEnv)
    assert binding.single_observation_space.dtype == np.uint8  # a byte buffer of mixed dtypes
    policy = MixedPolicy(binding)
    obs = {
        "self": {"pos": np.array([-50.5, 3.25], np.float32), "hp": 7},
        "map": np.full((3, 3), 255, np.uint8),
        "inventory": (np.array([1, 0, 1], np.int8), np.array([3, 4])),
    }
    flat = torch.as_tensor(binding.flatten_observation(obs))[None]
    features = []
    nested = policy.unflatten(flat)
    for leaf in policy.leaves:
        value = nested
        for key in leaf.path:
            value = value[key]
        features.append(leaf_features(leaf.space, value))
    by_path = {leaf.path: f[0] for leaf, f in zip(policy.leaves, features)}
    assert torch.equal(by_path[("self", "pos")], torch.tensor([-50.5, 3.25]))  # exact: no byte arithmetic
    assert torch.equal(by_path[("self", "hp")], torch.nn.functional.one_hot(torch.tensor(7), 11).float())
    assert torch.equal(by_path[("map",)], torch.ones(9))  # uint8 scaled to [0, 1]
    assert torch.equal(by_path[("inventory", 0)], torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(by_path[("inventory", 1)], torch.tensor([0, 0, 0, 1, 0, 0, 0, 0, 1.0]))  # one-hot 4 + 5
    assert policy(flat)[0].shape == (1, sum(binding.single_action_space.nvec))


def test_discrete_leaf_with_a_start_offset_is_one_hot_from_its_start():
    space = spaces.Discrete(3, start=-1)
    assert torch.equal(leaf_features(space, torch.tensor([-1, 1])), torch.tensor([[1.0, 0, 0], [0, 0, 1]]))
    multi = spaces.MultiDiscrete([2, 3], start=[5, -2])
    assert torch.equal(leaf_features(multi, torch.tensor([[6, -2]])), torch.tensor([[0.0, 1, 1, 0, 0]]))


def test_custom_policy_gets_the_nested_observation_in_forward():
    binding = Binding(env_cls=envs.NestedMultiAgentEnv)

    class MapPolicy(Policy):
        def __init__(self, binding):
            super().__init__(binding, feature_size=8)
            self.net = torch.nn.Linear(9, 8)

        def encode(self, obs):
            nested = self.unflatten(obs)  # the env's own structure, as tensor views
            return torch.relu(self.net(nested["map"].float().flatten(1) / 255))

    policy = MapPolicy(binding)
    obs = np.stack([binding.flatten_observation(envs.OBS_SPACE.sample()) for _ in range(4)])
    params, value, _ = policy(torch.as_tensor(obs))
    actions, logprob = policy.sample_actions(params)
    assert actions.shape == (4, 4) and (actions < torch.as_tensor(binding.single_action_space.nvec)).all()
    nested = binding.unflatten_action(actions.numpy())
    assert set(nested) == {"attack", "move"}


def test_discrete_head_matches_one_categorical_per_dimension():
    torch.manual_seed(0)
    head = DiscreteHead(5, np.array([3, 2, 4]))
    logits = torch.randn(6, 9)
    actions, logprob = head.sample(logits)
    assert actions.shape == (6, 3) and actions.dtype == torch.int64
    parts = [torch.distributions.Categorical(logits=part) for part in logits.split([3, 2, 4], -1)]
    expected = sum(d.log_prob(actions[:, i]) for i, d in enumerate(parts))
    torch.testing.assert_close(logprob, expected)
    got_logprob, entropy = head.evaluate(logits, actions)
    torch.testing.assert_close(got_logprob, expected)
    torch.testing.assert_close(entropy, sum(d.entropy() for d in parts))


def test_discrete_head_samples_from_the_right_distribution():
    torch.manual_seed(0)
    head = DiscreteHead(1, np.array([3, 3]))
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3, 0.7, 0.1, 0.2]])).expand(20000, 6)
    actions, _ = head.sample(logits)
    frequencies = [torch.bincount(actions[:, i], minlength=3).float() / 20000 for i in range(2)]
    torch.testing.assert_close(frequencies[0], torch.tensor([0.2, 0.5, 0.3]), atol=0.015, rtol=0)
    torch.testing.assert_close(frequencies[1], torch.tensor([0.7, 0.1, 0.2]), atol=0.015, rtol=0)
    deterministic, _ = head.sample(logits[:1], deterministic=True)
    assert deterministic.tolist() == [[1, 0]]


def test_gaussian_head_matches_a_diagonal_normal():
    torch.manual_seed(0)
    head = GaussianHead(4, 2)
    with torch.no_grad():
        head.log_std.copy_(torch.tensor([-0.5, 0.3]))
    mean = torch.randn(7, 2)
    actions, logprob = head.sample(mean)
    normal = torch.distributions.Normal(mean, head.log_std.exp())
    torch.testing.assert_close(logprob, normal.log_prob(actions).sum(-1))
    got, entropy = head.evaluate(mean, actions)
    torch.testing.assert_close(got, logprob)
    torch.testing.assert_close(entropy, normal.entropy().sum(-1))


def test_box_action_space_gets_a_gaussian_head():
    policy = default_policy(_binding(spaces.Box(-1, 1, (3,)), spaces.Box(-2, 2, (2,))))
    assert isinstance(policy.action_head, GaussianHead)
    params, _, _ = policy(torch.zeros(5, 3))
    actions, _ = policy.sample_actions(params)
    assert actions.shape == (5, 2) and actions.dtype == torch.float32


@pytest.mark.parametrize("action_space", [spaces.Discrete(2), spaces.MultiDiscrete([3, 2]), spaces.Box(-1, 1, (2,))])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_mlp_acting_forward_is_forward_with_the_towers_fused(action_space, num_layers):
    torch.manual_seed(0)
    policy = MLPPolicy(_binding(spaces.Box(-1, 1, (3,)), action_space), hidden_size=8, num_layers=num_layers)
    obs = torch.randn(5, 3)
    act = policy.acting_forward()
    params, value, _ = policy(obs)
    got_params, got_value = act(obs)
    torch.testing.assert_close(got_params, params)
    torch.testing.assert_close(got_value, value)
    assert not got_params.requires_grad

    with torch.no_grad():  # a snapshot: acting after an update needs a new one
        policy.value_head.bias += 1
    torch.testing.assert_close(act(obs)[1], value)
    torch.testing.assert_close(policy.acting_forward()(obs)[1], value + 1)


def test_acting_forward_of_other_policies_is_their_forward():
    binding = Binding(env_cls=envs.NestedMultiAgentEnv)
    policy = MixedPolicy(binding, hidden_size=16)
    obs = torch.as_tensor(np.stack([binding.flatten_observation(envs.OBS_SPACE.sample()) for _ in range(3)]))
    with torch.no_grad():
        params, value, _ = policy(obs)
        got_params, got_value = policy.acting_forward()(obs)
    torch.testing.assert_close(got_params, params)
    torch.testing.assert_close(got_value, value)


def test_lstm_wraps_any_policy_and_steps_like_its_sequence_form():
    torch.manual_seed(0)
    binding = Binding(env_cls=envs.NestedMultiAgentEnv)
    policy = LSTMPolicy(MixedPolicy(binding, hidden_size=16))
    obs = torch.as_tensor(np.stack([[binding.flatten_observation(envs.OBS_SPACE.sample()) for _ in range(3)]
                                    for _ in range(5)]))  # (T=5, B=3, obs_size)
    starts = torch.zeros(5, 3, dtype=torch.bool)
    starts[0] = True
    starts[2, 0] = True
    seq_params, seq_values, seq_state = policy(obs, None, starts)
    state, step_params = None, []
    for t in range(5):
        params, _, state = policy(obs[t], state, starts[t])
        step_params.append(params)
    torch.testing.assert_close(torch.cat(step_params), seq_params)
    torch.testing.assert_close(state[0], seq_state[0])
    assert policy.action_head is policy.policy.action_head


def test_policy_arguments_of_the_wrong_kind_are_named():
    from shoal.errors import APIUsageError

    cartpole = make_binding("cartpole")
    with pytest.raises(APIUsageError, match="default_policy needs the env's shoal.Binding, got TimeLimit"):
        default_policy(gymnasium.make("CartPole-v1"))
    with pytest.raises(APIUsageError, match="MLPPolicy needs the env's shoal.Binding .for its spaces., got NoneType"):
        MLPPolicy(None)
    with pytest.raises(APIUsageError, match="hidden_size must be a positive int, got -5"):
        default_policy(cartpole, hidden_size=-5)
    with pytest.raises(APIUsageError, match="num_layers must be a positive int, got 0"):
        MLPPolicy(cartpole, num_layers=0)
    with pytest.raises(SpaceError, match="policy kind 'cnn' reads frames"):
        default_policy(cartpole, kind="cnn")
    nested = Binding(env_cls=envs.NestedSingleAgentEnv)
    with pytest.raises(SpaceError, match="policy kind 'mlp' reads the flat observation as numbers; .* use 'mixed'"):
        default_policy(nested, kind="mlp")


def test_lstm_state_and_head_sizes_are_checked():
    from shoal.errors import APIUsageError

    policy = LSTMPolicy(MLPPolicy(make_binding("cartpole"), hidden_size=8))
    with pytest.raises(APIUsageError, match="state must be a tuple \\(h, c\\) as initial_state returns, got Tensor"):
        policy(torch.zeros(2, 4), torch.zeros(2, 16))
    with pytest.raises(APIUsageError, match="DiscreteHead needs at least one dimension, each with >= 1 choice"):
        DiscreteHead(4, [0])


def test_frames_with_any_channel_count_read_channels_last_and_small_frames_are_refused():
    cnn = NatureCNN(_binding(spaces.Box(0, 255, (64, 64, 6), np.uint8)))
    assert cnn.channels_last and cnn.chw == (6, 64, 64)
    assert not NatureCNN(_binding(spaces.Box(0, 255, (6, 64, 64), np.uint8))).channels_last
    with pytest.raises(SpaceError, match="NatureCNN needs frames of at least 36x36 pixels; .* read as 3 channels of 7x7"):
        default_policy(_binding(spaces.Box(0, 255, (7, 7, 3), np.uint8)), kind="cnn")
    with pytest.raises(APIUsageError, match="default_policy: lstm must be True or False, got 'no'"):
        default_policy(_binding(spaces.Box(-1, 1, (4,), np.float32)), lstm="no")


class BatchNormPolicy(Policy):
    def __init__(self, binding):
        super().__init__(binding, feature_size=8)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))

    def encode(self, obs):
        return self.net(obs.float())


class OneRowPolicy(BatchNormPolicy):
    def encode(self, obs):
        return super().encode(obs)[:1]  # a bug: one row whatever the batch


def test_the_policy_check_keeps_batch_statistics_and_sees_a_wrong_row_count():
    binding = _binding(spaces.Box(-1, 1, (4,), np.float32))
    policy = BatchNormPolicy(binding)
    policy.net[1].running_mean.fill_(5.0)
    check_policy(policy, binding)  # BatchNorm1d in train mode would refuse one row, and learn from the zeros
    assert policy.training and policy.net[1].running_mean.eq(5.0).all() and policy.net[1].num_batches_tracked == 0
    with pytest.raises(APIUsageError, match=r"OneRowPolicy returns action parameters of shape \(1, 2\) and values "
                                            r"of shape \(1,\) for 2 observations"):
        check_policy(OneRowPolicy(binding), binding)
