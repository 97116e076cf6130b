"""Policies: defaults picked from raw spaces, unflattening inside forward, heads, the LSTM wrapper."""

from __future__ import annotations

import math

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces

import envs
from shoal import Binding
from shoal import policy as policy_module
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
    (spaces.Box(0, 255, (40, 3, 40), np.uint8), MixedPolicy),  # the Nature CNN would read 40 channels of 3x40
    (spaces.Discrete(5, dtype=np.uint64), MixedPolicy),
    (spaces.MultiDiscrete([3, 4], dtype=np.uint32), MixedPolicy),
    (spaces.MultiDiscrete([3, 4], dtype=">i4"), MixedPolicy),  # big-endian
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


def test_unflattening_observations_of_the_wrong_dtype_is_a_usage_error_naming_the_policy():
    policy = MixedPolicy(Binding(env_cls=envs.NestedMultiAgentEnv))
    with pytest.raises(APIUsageError, match=r"MixedPolicy: flat observation: expected dtype uint8, got torch.float32"):
        policy(torch.zeros(2, policy.obs_size))


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


@pytest.mark.parametrize("nvec", [[3, 3], [3, 2]], ids=["uniform", "mixed"])
def test_actions_masked_by_minus_inf_logits_are_never_taken_and_add_nothing_to_the_entropy(nvec):
    torch.manual_seed(0)
    head = DiscreteHead(4, np.array(nvec))
    logits = torch.randn(5, sum(nvec), requires_grad=True)
    masked = logits.masked_fill(torch.tensor([True, False, False] + [False, True] + [False] * (nvec[1] - 2)),
                                -float("inf"))
    actions, logprob = head.sample(masked)
    assert (actions[:, 0] != 0).all() and (actions[:, 1] != 1).all() and torch.isfinite(logprob).all()
    got_logprob, entropy = head.evaluate(masked, actions)
    parts = [torch.distributions.Categorical(logits=part) for part in masked.split(nvec, -1)]
    torch.testing.assert_close(entropy, sum(d.entropy() for d in parts))
    torch.testing.assert_close(got_logprob, sum(d.log_prob(actions[:, i]) for i, d in enumerate(parts)))
    (entropy.sum() + got_logprob.sum()).backward()
    assert torch.isfinite(logits.grad).all()


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


def test_gaussian_head_works_in_half_widths_of_finite_bounds():
    """Box(10, 20) learns as Box(-1, 1) does: the first policy spreads its actions over the range, not at 0."""
    torch.manual_seed(0)
    low, high = np.array([10.0, -np.inf, 0.0, -3e38]), np.array([20.0, np.inf, 1.0, 3e38])
    head = GaussianHead(4, 4, low, high)
    with torch.no_grad():
        head.log_std.copy_(torch.tensor([-0.5, 0.3, 0.0, 0.1]))
    params = torch.randn(7, 4)
    center, scale = torch.tensor([15.0, 0.0, 0.5, 0.0]), torch.tensor([5.0, 1.0, 0.5, 1.0])  # too wide: unscaled
    actions, logprob = head.sample(params)
    normal = torch.distributions.Normal(center + scale * params, scale * head.log_std.exp())
    torch.testing.assert_close(logprob, normal.log_prob(actions).sum(-1))
    got, entropy = head.evaluate(params, actions)
    torch.testing.assert_close(got, logprob)
    torch.testing.assert_close(entropy, normal.entropy().sum(-1))
    torch.testing.assert_close(head.sample(params, deterministic=True)[0], center + scale * params)
    policy = default_policy(_binding(spaces.Box(-1, 1, (3,)), spaces.Box(10, 20, (2,))))
    first = policy.sample_actions(policy(torch.zeros(4000, 3))[0])[0]
    assert abs(first.mean().item() - 15) < 0.3 and abs(first.std().item() - 5) < 0.3
    state = policy.state_dict()  # from before the head scaled: no center and scale, acts as it was trained
    old = {name: value for name, value in state.items() if not name.endswith(("center", "scale"))}
    policy.load_state_dict(old)
    assert policy.action_head.center.tolist() == [0, 0] and policy.action_head.scale.tolist() == [1, 1]
    far = GaussianHead(4, 1, np.array([1000.0]), np.array([1001.0]))  # float32 rounds the actions it samples:
    with torch.no_grad():
        far.log_std.fill_(-4.6)
    params = torch.randn(1000, 1)
    actions, logprob = far.sample(params)  # the log-prob is the stored action's, as PPO's first ratio needs
    assert torch.equal(far.evaluate(params, actions)[0], logprob)
    with pytest.raises(APIUsageError, match="GaussianHead needs at least one action value, got size 0"):
        GaussianHead(4, 0)  # an empty Box: nothing to learn


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


def test_an_mlp_subclass_with_a_forward_of_its_own_acts_through_it():
    class NeverOne(MLPPolicy):  # masks action 1 in forward: acting must never sample it
        def forward(self, obs, state=None, starts=None):
            params, value, state = super().forward(obs, state, starts)
            return params.index_fill(1, torch.tensor([1]), -torch.inf), value, state

    policy = NeverOne(_binding(spaces.Box(-1, 1, (3,)), spaces.Discrete(3)))
    params, _ = policy.acting_forward()(torch.randn(64, 3))
    assert torch.isinf(params[:, 1]).all() and not policy.sample_actions(params)[0].eq(1).any()


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
    with pytest.raises(SpaceError, match=r"NatureCNN \(policy kind 'cnn'\) reads frames, a Box of 2 or 3 dimensions"):
        default_policy(cartpole, kind="cnn")
    nested = Binding(env_cls=envs.NestedSingleAgentEnv)
    with pytest.raises(SpaceError, match=r"MLPPolicy \(policy kind 'mlp'\) reads the flat observation as numbers; "
                                         r".* use MixedPolicy"):
        default_policy(nested, kind="mlp")


def test_lstm_state_and_head_sizes_are_checked():
    from shoal.errors import APIUsageError

    policy = LSTMPolicy(MLPPolicy(make_binding("cartpole"), hidden_size=8))
    with pytest.raises(APIUsageError, match=r"state must be a tuple \(h, c\) as initial_state returns, each a "
                                            r"torch.float32 tensor of shape \(B, feature_size\) = \(2, 16\) for 2 "
                                            r"observations, got Tensor"):
        policy(torch.zeros(2, 4), torch.zeros(2, 16))
    state = torch.zeros(2, 16, dtype=torch.float64)
    with pytest.raises(APIUsageError, match=r"each a torch.float32 tensor of shape \(B, feature_size\) = \(2, 16\) "
                                            r"for 2 observations, got h of shape \(2, 16\) and dtype torch.float64 and "
                                            r"c of shape \(2, 16\) and dtype torch.float64$"):
        policy(torch.zeros(2, 4), (state, state.clone()))
    with pytest.raises(APIUsageError, match="DiscreteHead needs at least one dimension, each with >= 1 choice"):
        DiscreteHead(4, [0])


def test_an_lstm_policy_is_not_wrapped_in_another():
    with pytest.raises(APIUsageError, match=r"LSTMPolicy wraps a policy without recurrence, got LSTMPolicy, which is "
                                            r"recurrent already: use it as it is"):
        LSTMPolicy(default_policy(make_binding("cartpole"), lstm=True))


def test_an_lstm_wraps_only_a_policy_made_of_encode_and_decode():
    class OwnForward(MLPPolicy):  # its forward would never run inside the LSTM
        def forward(self, obs, state=None, starts=None):
            return super().forward(obs * 2, state, starts)

    with pytest.raises(APIUsageError, match=r"LSTMPolicy runs the wrapped policy's encode\(obs\) -> features and "
                                            r"decode\(features\) .* never its forward: OwnForward must define encode "
                                            r"\(decode has a default\) and no forward of its own"):
        LSTMPolicy(OwnForward(make_binding("cartpole"), hidden_size=8))

    class MaskingForward(Policy):  # encode, decode and a forward that masks, all in one class
        def __init__(self, binding):
            super().__init__(binding, feature_size=8)
            self.net = torch.nn.Linear(binding.single_observation_space.shape[0], 8)

        def encode(self, obs):
            return self.net(obs)

        def forward(self, obs, state=None, starts=None):
            params, value, state = super().forward(obs, state, starts)
            return params.masked_fill(obs[:, :1] > 0, -math.inf), value, state

    with pytest.raises(APIUsageError, match=r"never its forward: MaskingForward must define encode"):
        LSTMPolicy(MaskingForward(make_binding("cartpole")))


@pytest.mark.parametrize("lstm", [False, True], ids=["mlp", "lstm"])
def test_a_network_too_big_for_memory_is_named_with_its_size(lstm):
    with pytest.raises(APIUsageError, match=rf"default_policy: the mlp policy{' with an LSTM' if lstm else ''} of "
                                            rf"hidden_size 1000000 does not fit in memory \(.* GiB of parameters, "
                                            rf".* GiB available\): choose a smaller hidden_size$"):
        default_policy(make_binding("cartpole"), hidden_size=10**6, lstm=lstm)
    with pytest.raises(APIUsageError, match=r"hidden_size 10000000000 does not fit in memory"):  # past int64 bytes
        default_policy(make_binding("cartpole"), hidden_size=10**10)


def test_a_one_hot_leaf_too_wide_for_memory_is_named_with_the_remedy():
    with pytest.raises(APIUsageError, match=r"its discrete observation leaf Discrete\(1099511627776\) is one-hot, "
                                            r"1,099,511,627,776 inputs wide, each with hidden_size weights: .*feature_parser"):
        default_policy(_binding(spaces.Dict({"id": spaces.Discrete(2**40), "x": spaces.Box(-1, 1, (2,))})),
                       hidden_size=1)


def test_a_network_the_os_would_let_us_allocate_but_not_fill_is_refused_before_allocating(monkeypatch):
    assert policy_module.available_memory() > 0  # Linux: MemAvailable
    # 2 GiB of weights with 1 GiB available: sized on the meta device, never allocated (under overcommit the
    # allocation succeeds, and initializing the weights gets the process killed)
    monkeypatch.setattr(policy_module, "available_memory", lambda: 2**30)
    with pytest.raises(APIUsageError, match=r"hidden_size 16000 does not fit in memory \(1.9 GiB of parameters, "
                                            r"1.0 GiB available\)"):
        default_policy(make_binding("cartpole"), hidden_size=16000)


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


class IntegerOutputPolicy(BatchNormPolicy):
    """Rounds what ``output`` names to integers: the losses would have no gradient through it."""

    output = "values"

    def forward(self, obs, state=None, starts=None):
        params, value = self.decode(self.encode(obs))
        if self.output == "values":
            return params, value.round().long(), None
        return params.round().int(), value, None


@pytest.mark.parametrize("action_space", [spaces.Discrete(2), spaces.Box(-1, 1, (2,))], ids=["discrete", "box"])
@pytest.mark.parametrize("output", ["values", "action parameters"])
def test_the_policy_check_refuses_outputs_that_are_not_floating_point(action_space, output):
    binding = _binding(spaces.Box(-1, 1, (4,), np.float32), action_space)
    policy = IntegerOutputPolicy(binding)
    policy.output = output
    dtype = "torch.int64" if output == "values" else "torch.int32"
    with pytest.raises(APIUsageError, match=rf"IntegerOutputPolicy returns {output} of dtype {dtype}: expected a "
                                            rf"floating-point torch tensor"):
        check_policy(policy, binding)


class TinyPolicy(Policy):
    def __init__(self, binding, mistake: str = ""):
        super().__init__(binding, feature_size=8)
        self.net, self.mistake = torch.nn.Linear(4, 8), mistake

    def encode(self, obs):
        return torch.tanh(self.net(obs.to(self.net.weight.dtype)))

    def acting_forward(self):
        wrong = {"forward's three": lambda obs: self(obs),
                 "a value column": lambda obs: (self(obs)[0], self(obs)[1][:, None]),
                 "one value": lambda obs: (self(obs)[0], self(obs)[1][:1])}
        return wrong.get(self.mistake, super().acting_forward())

    def sample_actions(self, params, deterministic=False):
        action, logprob = super().sample_actions(params, deterministic)
        return action, logprob[:, None] if self.mistake == "a log-probability column" else logprob


@pytest.mark.parametrize("mistake, message", [
    ("forward's three", r"TinyPolicy.acting_forward\(\) gives a function that returns a tuple of 3 for 2 observations"),
    ("a value column", r"TinyPolicy.acting_forward\(\) gives values of shape \(2, 1\) .*: expected floating-point ones "
                       r"of shape \(2,\), as forward gives"),
    ("one value", r"TinyPolicy.acting_forward\(\) gives values of shape \(1,\)"),
    ("a log-probability column", r"TinyPolicy.sample_actions\(\) gives log-probabilities of shape \(2, 1\) .*: "
                                 r"expected floating-point ones of shape \(2,\)")])
def test_the_policy_check_holds_acting_forward_and_sampling_to_forward(mistake, message):
    """Overrides the trainer calls in the rollout must agree with forward: numpy would broadcast their mistakes."""
    binding = make_binding("cartpole")
    check_policy(TinyPolicy(binding), binding)
    with pytest.raises(APIUsageError, match=message):
        check_policy(TinyPolicy(binding, mistake), binding)


def test_the_policy_check_names_an_observation_dtype_torch_lacks():
    binding = _binding(spaces.Box(-1, 1, (2,), np.longdouble))
    with pytest.raises(APIUsageError, match=r"cannot read .* observations: torch has no tensors of dtype float128"):
        check_policy(MLPPolicy(binding, hidden_size=8), binding)


class BlindMLP(MLPPolicy):
    def encode(self, obs):  # an ablation: the policy must not see the observation
        return super().encode(torch.zeros_like(obs, dtype=torch.float32))


def test_a_subclass_that_overrides_encode_gets_it_in_every_forward():
    """MLPPolicy's fast forwards copy its own encode and decode; a subclass's overrides must not be skipped."""
    torch.manual_seed(0)
    policy = BlindMLP(make_binding("cartpole"), hidden_size=8)
    obs = torch.randn(3, 4)
    expected_params, expected_value = policy.decode(policy.encode(obs))
    for params, value in (policy(obs)[:2], policy.acting_forward()(obs)):
        torch.testing.assert_close(params, expected_params)
        torch.testing.assert_close(value, expected_value)
    assert (params == params[0]).all()  # blind: every row alike


def test_the_lstm_state_has_the_lstm_dtype():
    binding = make_binding("cartpole")
    policy = LSTMPolicy(TinyPolicy(binding)).double()
    state = policy.initial_state(3)
    assert state[0].dtype == state[1].dtype == torch.float64
    params, value, (h, c) = policy(torch.zeros(3, 4, dtype=torch.float64), state)
    assert value.dtype == h.dtype == torch.float64


class DictEnv(gymnasium.Env):
    """A nested observation of mixed dtypes: its flat form is a byte buffer."""

    observation_space = spaces.Dict({"pos": spaces.Box(-1, 1, (3,), np.float32), "k": spaces.Discrete(4)})
    action_space = spaces.Discrete(2)


def test_policies_refuse_observation_spaces_they_cannot_read():
    cartpole, nested = make_binding("cartpole"), Binding(env_cls=DictEnv)
    for binding, space, instead in [(cartpole, r"Box\(.*\(4,\), float32\)", r"MLPPolicy or MixedPolicy"),
                                    (nested, r"Dict\(.*\)", r"MixedPolicy \(kind 'mixed'\), which reads each leaf")]:
        with pytest.raises(SpaceError, match=r"NatureCNN \(policy kind 'cnn'\) reads frames, a Box of 2 or 3 "
                                             rf"dimensions; \S+'s observation space is {space}: use {instead}"):
            NatureCNN(binding)
    frames = _binding(spaces.Box(0, 255, (84, 84), np.uint8))
    with pytest.raises(APIUsageError, match="channels_last must be True, False or None .*, got 'yes'"):
        NatureCNN(frames, channels_last="yes")
    with pytest.raises(APIUsageError, match=r"channels_last=True reads \(H, W, C\) frames; .* \(84, 84\), one channel"):
        NatureCNN(frames, channels_last=True)
    with pytest.raises(SpaceError, match=r"MLPPolicy \(policy kind 'mlp'\) reads the flat observation as numbers; "
                                         r"DictEnv's is a byte buffer of mixed-dtype leaves .*: use MixedPolicy"):
        MLPPolicy(nested)


@pytest.mark.parametrize("make", [lambda b: MLPPolicy(b, hidden_size=8), lambda b: MixedPolicy(b, hidden_size=8),
                                  lambda b: MLPPolicy(b, hidden_size=8).acting_forward()])
def test_forward_names_the_observation_shape_it_expects(make):
    policy = make(make_binding("cartpole"))
    expected = r"obs must be a torch tensor of shape \(B, obs_size\) with obs_size=4 \(CartPole-v1's flat observations\)"
    with pytest.raises(APIUsageError, match=expected + r", got one of type numpy.ndarray: convert it with torch.as_tensor"):
        policy(np.zeros((2, 4), np.float32))
    with pytest.raises(APIUsageError, match=expected + r", got one of shape \(2, 5\) and dtype torch.float32$"):
        policy(torch.zeros(2, 5))
    with pytest.raises(APIUsageError, match=expected + r", got one of shape \(4,\) and dtype torch.float32: one observation needs a batch "
                                                       r"dimension, obs\[None\]"):
        policy(torch.zeros(4))


def test_heads_name_the_shapes_and_actions_they_expect():
    policy = MLPPolicy(make_binding("cartpole"), hidden_size=8)
    params = policy(torch.zeros(3, 4))[0]
    with pytest.raises(APIUsageError, match=r"actions must be integers from 0 to n - 1 in each dimension of nvec "
                                            r"\[2\], got 5 in row 0, dimension 0"):
        policy.evaluate_actions(params, torch.tensor([[5], [1], [0]]))
    with pytest.raises(APIUsageError, match=r"got -1 in row 2, dimension 0"):
        policy.evaluate_actions(params, torch.tensor([[0], [1], [-1]]))
    with pytest.raises(APIUsageError, match=r"DiscreteHead: expected torch tensors, float logits \(B, 2\) \(nvec \[2\]\) "
                                            r"and integer actions \(B, 1\), got logits of shape \(3, 2\) and dtype "
                                            r"torch.float32 and actions of shape \(3,\) and dtype torch.int64"):
        policy.evaluate_actions(params, torch.tensor([0, 1, 0]))
    with pytest.raises(APIUsageError, match=r"expected torch tensors, float logits \(B, 2\) \(nvec \[2\]\), got "
                                            r"logits of shape \(2,\)"):
        policy.sample_actions(params[0])
    mixed = DiscreteHead(4, np.array([3, 2]))  # dimensions of different sizes: the other path
    with pytest.raises(APIUsageError, match=r"nvec \[3, 2\], got 2 in row 1, dimension 1"):
        mixed.evaluate(torch.zeros(2, 5), torch.tensor([[2, 1], [0, 2]]))
    with pytest.raises(APIUsageError, match=r"integer actions \(B, 1\), got .* actions of shape \(3, 1\) and dtype "
                                            r"torch.float32"):  # NaN, or 0.7 truncated to 0, before
        policy.evaluate_actions(params, torch.tensor([[math.nan], [0.7], [1.0]]))
    with pytest.raises(APIUsageError, match=r"float logits \(B, 2\) .*, got logits of shape \(3, 2\) and dtype "
                                            r"torch.int64"):
        policy.sample_actions(torch.zeros(3, 2, dtype=torch.long))
    gaussian = GaussianHead(4, 2)
    with pytest.raises(APIUsageError, match=r"GaussianHead: expected torch tensors, float means \(B, 2\) and float "
                                            r"actions of that shape, got means of shape \(3, 2\) and dtype "
                                            r"torch.float32 and actions of shape \(3,\)"):
        gaussian.evaluate(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(APIUsageError, match=r"means \(B, 2\), got means of type list"):
        gaussian.sample([[0.0, 0.0]])


def test_lstm_inputs_are_checked_and_float_starts_count_where_nonzero():
    torch.manual_seed(0)
    policy = LSTMPolicy(MLPPolicy(make_binding("cartpole"), hidden_size=8))
    state = policy.initial_state(3)
    obs = torch.randn(3, 4)
    dones = torch.tensor([1.0, 0.0, 1.0])  # CleanRL's float dones
    for got, expected in zip(policy(obs, state, dones), policy(obs, state, dones.bool())):
        torch.testing.assert_close(got, expected)
    expected = (r"state must be a tuple \(h, c\) as initial_state returns, each a torch.float32 tensor of shape "
                r"\(B, feature_size\)")
    with pytest.raises(APIUsageError, match=expected + r" = \(3, 16\) for 3 observations, got h of shape \(1, 3, 16\) "
                                                       r"and dtype torch.float32 and c of shape \(1, 3, 16\) and dtype "
                                                       r"torch.float32: that is nn.LSTM's"):
        policy(torch.zeros(5, 3, 4), (state[0][None], state[1][None]))
    with pytest.raises(APIUsageError, match=expected + r" = \(2, 16\) for 2 observations, got h of shape \(3, 16\)"):
        policy(torch.zeros(2, 4), state)
    with pytest.raises(APIUsageError, match=r"starts must be a torch tensor of shape \(5, 3\), one per observation, "
                                            r"got one of shape \(15,\)"):
        policy(torch.zeros(5, 3, 4), state, torch.zeros(15, dtype=torch.bool))
    with pytest.raises(APIUsageError, match=r"LSTMPolicy: obs must be a torch tensor of shape \(B, obs_size\) or "
                                            r"\(T, B, obs_size\) with obs_size=4 .*, got one of shape \(3, 5\)"):
        policy(torch.zeros(3, 5))
    with pytest.raises(APIUsageError, match="LSTMPolicy.initial_state: batch_size must be a positive int, got -1"):
        policy.initial_state(-1)
    with pytest.raises(APIUsageError, match="LSTMPolicy.initial_state: device 'gpu' is not a torch device this "
                                            "process can use"):
        policy.initial_state(2, device="gpu")


def test_layer_init_needs_one_weight_and_initialises_a_bias_free_layer():
    from shoal.policy import layer_init

    layer = layer_init(torch.nn.Linear(4, 3, bias=False), std=1.0)
    torch.testing.assert_close(layer.weight @ layer.weight.T, torch.eye(3))
    with pytest.raises(APIUsageError, match="layer_init initialises a layer with one weight of 2 or more dimensions "
                                            r"\(nn.Linear, nn.Conv2d...\), got LSTM: initialise each of its weight_ih"):
        layer_init(torch.nn.LSTM(4, 4))
    with pytest.raises(APIUsageError, match="got LayerNorm$"):
        layer_init(torch.nn.LayerNorm(4))
    with pytest.raises(APIUsageError, match="layer_init: std must be a finite number, got nan"):
        layer_init(torch.nn.Linear(4, 3), std=math.nan)  # all-NaN weights, before
    with pytest.raises(APIUsageError, match="layer_init: bias must be a finite number, got None"):
        layer_init(torch.nn.Linear(4, 3), bias=None)


def test_adam_and_clipping_check_their_arguments():
    from shoal.optim import Adam, clip_grad_norm

    model = torch.nn.Linear(3, 2)
    with pytest.raises(APIUsageError, match=r"Adam takes an iterable of parameter tensors, got the module Linear "
                                            r"itself: pass model.parameters\(\)"):
        Adam(model, 1e-3)
    parameters = model.parameters()
    Adam(parameters, 1e-3)
    with pytest.raises(APIUsageError, match=r"got no parameters \(an iterator already used up\?\)"):
        Adam(parameters, 1e-3)
    for lr in [float("nan"), "1e-3", -1.0, True]:
        with pytest.raises(APIUsageError, match=f"Adam: lr must be a finite number >= 0, got {lr!r}"):
            Adam(model.parameters(), lr)
    with pytest.raises(APIUsageError, match="Adam: eps must be a finite number >= 0, got inf"):
        Adam(model.parameters(), 1e-3, eps=float("inf"))
    optimizer = Adam(model.parameters(), 1e-3)
    optimizer.lr = np.float32(5e-4)  # as the trainer anneals it, once per update
    assert optimizer.lr == pytest.approx(5e-4) and type(optimizer.lr) is float
    with pytest.raises(APIUsageError, match="Adam: lr must be a finite number >= 0, got nan"):
        optimizer.lr = float("nan")

    parameters = list(model.parameters())
    assert float(clip_grad_norm(parameters, 0.5)) == 0.0  # before backward: nothing to clip, as torch's
    assert all(p.grad is None for p in parameters)
    for max_norm in [-1.0, 0, float("nan"), "0.5"]:
        with pytest.raises(APIUsageError, match=f"clip_grad_norm: max_norm must be a finite number > 0, got {max_norm!r}"):
            clip_grad_norm(parameters, max_norm)
    with pytest.raises(APIUsageError, match=r"clip_grad_norm takes a list of parameter tensors, e.g. "
                                            r"list\(model.parameters\(\)\), got Linear"):
        clip_grad_norm(model, 0.5)
    model(torch.ones(1, 3)).sum().backward()
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in parameters]))
    torch.testing.assert_close(clip_grad_norm(parameters, 1e-3), norm)
    torch.testing.assert_close(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in parameters])),
                               torch.tensor(1e-3), rtol=1e-3, atol=0)
