"""The unit-attention policy: any unit count, padding-blind, legal under masks, trainable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from synthetic_env import SyntheticFreezeEnv, random_observation

from freeze_agent.core.modes import Mode
from freeze_agent.policies.network import UnitAttentionPolicy, deterministic_actions
from freeze_agent.signals.observation import action_mask, observation_space

MAX_UNITS = 10
SMALL = {"embed_dim": 16, "n_heads": 2, "n_layers": 1, "value_dim": 16}


def make_policy(max_units: int = MAX_UNITS, **architecture) -> UnitAttentionPolicy:
    return UnitAttentionPolicy(
        observation_space(max_units),
        spaces.MultiDiscrete([len(Mode)] * max_units),
        lambda _: 3e-4,
        **architecture,
    )


def logits_and_value(policy: UnitAttentionPolicy, observation) -> tuple[np.ndarray, float]:
    """(max_units, 3) logits, unmasked, and the value of one observation."""
    policy.set_training_mode(False)
    obs, _ = policy.obs_to_tensor(observation)
    with torch.no_grad():
        latent_pi, latent_vf = policy.mlp_extractor(policy.extract_features(obs))
        logits = policy.action_net(latent_pi).reshape(-1, len(Mode))
        return logits.numpy(), float(policy.value_net(latent_vf))


@pytest.mark.parametrize("n_units", [1, 4, 7, MAX_UNITS])
def test_one_policy_decides_for_any_unit_count(n_units):
    policy = make_policy()
    observation = random_observation(np.random.default_rng(n_units), MAX_UNITS, n_units)
    logits, value = logits_and_value(policy, observation)
    assert logits.shape == (MAX_UNITS, len(Mode))
    assert np.isfinite(logits).all() and np.isfinite(value)
    actions = deterministic_actions(policy, observation)
    assert actions.shape == (MAX_UNITS,)
    assert action_mask(observation)[np.arange(MAX_UNITS), actions].all()
    assert actions[n_units - 1] == Mode.TRAIN  # the head


def test_untrained_policy_starts_from_the_initial_mode_probabilities():
    probabilities = (0.7, 0.1, 0.2)
    policy = make_policy(initial_mode_probabilities=probabilities)
    observation = random_observation(np.random.default_rng(2), MAX_UNITS, 7)
    logits, _ = logits_and_value(policy, observation)
    per_unit = torch.softmax(torch.from_numpy(logits[:7]), dim=-1).numpy()
    np.testing.assert_allclose(per_unit, np.tile(probabilities, (7, 1)), atol=0.02)


@pytest.mark.parametrize("probabilities", [(0.5, 0.5), (0.9, 0.2, -0.1), (0.5, 0.3, 0.3)])
def test_bad_initial_mode_probabilities_are_refused(probabilities):
    with pytest.raises(ValueError, match="initial_mode_probabilities"):
        make_policy(initial_mode_probabilities=probabilities)


def test_padded_slots_do_not_influence_real_units():
    policy = make_policy()
    rng = np.random.default_rng(0)
    observation = random_observation(rng, MAX_UNITS, 4)
    noisy = {key: value.copy() for key, value in observation.items()}
    noisy["units"][4:] = rng.uniform(-1.0, 1.0, noisy["units"][4:].shape)
    logits, value = logits_and_value(policy, observation)
    noisy_logits, noisy_value = logits_and_value(policy, noisy)
    np.testing.assert_allclose(noisy_logits, logits, atol=1e-6)
    assert noisy_value == pytest.approx(value, abs=1e-6)


def test_same_weights_serve_any_number_of_slots():
    small, large = make_policy(6), make_policy(32)
    large.load_state_dict(small.state_dict())  # no weight depends on max_units
    observation = random_observation(np.random.default_rng(1), 6, 4)
    padded = random_observation(np.random.default_rng(1), 32, 4)
    padded["units"][:4], padded["global"] = observation["units"][:4], observation["global"]
    small_logits, small_value = logits_and_value(small, observation)
    large_logits, large_value = logits_and_value(large, padded)
    np.testing.assert_allclose(large_logits[:4], small_logits[:4], atol=1e-5)
    assert large_value == pytest.approx(small_value, abs=1e-5)


def test_observation_without_units_gives_finite_outputs():
    policy = make_policy()
    observation = random_observation(np.random.default_rng(0), MAX_UNITS, 3)
    observation["mask"][:] = 0
    logits, value = logits_and_value(policy, observation)
    assert np.isfinite(logits).all() and np.isfinite(value)
    policy.set_training_mode(True)  # the training path (no fused attention kernel)
    obs, _ = policy.obs_to_tensor(observation)
    _, values, log_prob = policy(obs, action_masks=action_mask(observation).reshape(-1))
    assert torch.isfinite(values).all() and torch.isfinite(log_prob).all()
    assert (deterministic_actions(policy, observation) == Mode.TRAIN).all()


def test_sampled_actions_respect_masks():
    model = MaskablePPO(UnitAttentionPolicy, SyntheticFreezeEnv(MAX_UNITS), seed=0, device="cpu")
    rng = np.random.default_rng(0)
    seen = np.zeros((MAX_UNITS, len(Mode)), dtype=bool)
    for _ in range(200):
        observation = random_observation(rng, MAX_UNITS)
        allowed = action_mask(observation)
        action, _ = model.predict(observation, action_masks=allowed.reshape(-1))
        assert allowed[np.arange(MAX_UNITS), action].all()
        seen[np.arange(MAX_UNITS), action] = True
    assert seen[:, Mode.LOCAL].any() and seen[:, Mode.FROZEN].any()  # sampling, not argmax


def test_a_few_ppo_updates_run_and_change_the_policy():
    env = SyntheticFreezeEnv(MAX_UNITS)
    model = MaskablePPO(
        UnitAttentionPolicy,
        env,
        n_steps=64,
        batch_size=32,
        n_epochs=2,
        policy_kwargs=SMALL,
        seed=0,
        device="cpu",
    )
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(total_timesteps=128)  # the env raises on any illegal action
    after = model.policy.state_dict()
    assert model.num_timesteps == 128
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_constructor_parameters_rebuild_the_policy(tmp_path):
    policy = make_policy(**SMALL)
    policy.save(tmp_path / "policy.pt")
    loaded = UnitAttentionPolicy.load(tmp_path / "policy.pt", device="cpu")
    assert loaded.architecture == policy.architecture
    observation = random_observation(np.random.default_rng(2), MAX_UNITS)
    np.testing.assert_array_equal(
        logits_and_value(loaded, observation)[0], logits_and_value(policy, observation)[0]
    )


def test_wrong_spaces_are_refused():
    with pytest.raises(ValueError, match="MultiDiscrete"):
        UnitAttentionPolicy(observation_space(4), spaces.MultiDiscrete([3] * 5), lambda _: 1e-3)
    with pytest.raises(ValueError, match="Dict space"):
        UnitAttentionPolicy(spaces.Box(-1, 1, (4,)), spaces.MultiDiscrete([3] * 4), lambda _: 1e-3)


def test_deterministic_actions_are_sb3_predict_on_the_shipped_policy():
    # the fast path must decide exactly as sb3-contrib's masked predict does
    from freeze_agent.policies.registry import make_policy as make_registered

    network = make_registered("default").network
    max_units = network.max_units
    rng = np.random.default_rng(0)
    for n_units in (2, 5, 9, max_units):
        for _ in range(10):
            observation = random_observation(rng, max_units, n_units)
            expected, _ = network.predict(
                observation, deterministic=True, action_masks=action_mask(observation).reshape(-1)
            )
            np.testing.assert_array_equal(deterministic_actions(network, observation), expected)
