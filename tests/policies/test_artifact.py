"""The policy artifact: save, reload without pickles, same decisions, clear refusals."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from sb3_contrib import MaskablePPO
from synthetic_env import SyntheticFreezeEnv, random_observation

from freeze_agent.core.modes import Mode
from freeze_agent.policies.artifact import (
    CARD_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    PolicyArtifactError,
    load_card,
    save_policy,
    update_card,
)
from freeze_agent.policies.learned import LearnedPolicy
from freeze_agent.policies.network import UnitAttentionPolicy, deterministic_actions
from freeze_agent.signals.observation import OBSERVATION_VERSION, UNIT_FEATURES, action_mask

MAX_UNITS = 8
METADATA = {"training_tasks": ["synthetic"], "timesteps": 64, "seed": 0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained model and its artifact in ``.../policies/tiny``."""
    model = MaskablePPO(
        UnitAttentionPolicy,
        SyntheticFreezeEnv(MAX_UNITS),
        n_steps=64,
        batch_size=32,
        n_epochs=1,
        policy_kwargs={"embed_dim": 16, "n_heads": 2, "n_layers": 1, "value_dim": 16},
        seed=0,
        device="cpu",
    )
    model.learn(total_timesteps=64)
    folder = save_policy(model, tmp_path_factory.mktemp("policies") / "tiny", METADATA)
    return model, folder


@pytest.fixture
def artifact(trained, tmp_path):
    """A fresh copy of the artifact that a test may damage."""
    return shutil.copytree(trained[1], tmp_path / "tiny")


def test_loaded_policy_decides_like_the_model(trained):
    model, folder = trained
    policy = LearnedPolicy.load(folder)
    assert policy.name == "tiny"
    rng = np.random.default_rng(0)
    for _ in range(30):
        observation = random_observation(rng, MAX_UNITS)
        n_units = int(observation["mask"].sum())
        expected, _ = model.predict(
            observation, action_masks=action_mask(observation).reshape(-1), deterministic=True
        )
        modes = policy.decide(observation)
        assert len(modes) == n_units and all(isinstance(m, Mode) for m in modes)
        assert modes == [Mode(int(a)) for a in expected[:n_units]]
        np.testing.assert_array_equal(deterministic_actions(model.policy, observation), expected)


def test_load_executes_no_pickle(artifact, monkeypatch):
    (artifact / MODEL_FILE).unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("loading a policy unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    observation = random_observation(np.random.default_rng(1), MAX_UNITS, 5)
    assert len(LearnedPolicy.load(artifact).decide(observation)) == 5


def test_observation_with_other_slot_count_is_fitted(trained):
    policy = LearnedPolicy.load(trained[1])
    observation = random_observation(np.random.default_rng(2), MAX_UNITS, 3)
    narrow = {
        "units": observation["units"][:4],
        "mask": observation["mask"][:4],
        "global": observation["global"],
    }
    assert policy.decide(narrow) == policy.decide(observation)
    with pytest.raises(ValueError, match=f"at most {MAX_UNITS}"):
        policy.decide(random_observation(np.random.default_rng(3), MAX_UNITS + 2, MAX_UNITS + 1))


def test_resuming_from_the_zip_gives_the_same_actions(trained):
    model, folder = trained
    resumed = MaskablePPO.load(folder / MODEL_FILE, device="cpu")
    observation = random_observation(np.random.default_rng(4), MAX_UNITS)
    np.testing.assert_array_equal(
        deterministic_actions(resumed.policy, observation),
        deterministic_actions(model.policy, observation),
    )


def test_card_round_trips_metadata_and_versions(trained):
    card = load_card(trained[1])
    assert {key: card[key] for key in METADATA} == METADATA
    assert card["name"] == "tiny"
    assert card["observation_version"] == OBSERVATION_VERSION
    assert card["unit_features"] == list(UNIT_FEATURES)
    assert card["max_units"] == MAX_UNITS
    assert card["action_meanings"] == ["TRAIN", "LOCAL", "FROZEN"]
    assert card["architecture"] == {"embed_dim": 16, "n_heads": 2, "n_layers": 1, "value_dim": 16}
    versions = card["versions"]
    for package in ("torch", "stable-baselines3", "sb3-contrib", "gymnasium", "freeze-agent"):
        assert versions[package]


def test_update_card_merges_evaluation_results(artifact):
    update_card(artifact, evaluation={"val": {"speedup": 1.2}})
    card = update_card(artifact, evaluation={"heldout": {"speedup": 1.1}}, note="first run")
    assert card["evaluation"] == {"val": {"speedup": 1.2}, "heldout": {"speedup": 1.1}}
    assert load_card(artifact) == card
    assert card["timesteps"] == METADATA["timesteps"]
    with pytest.raises(ValueError, match="max_units"):
        update_card(artifact, max_units=3)


def test_metadata_may_not_override_the_spec(trained, tmp_path):
    with pytest.raises(ValueError, match="observation_version"):
        save_policy(trained[0], tmp_path / "bad", {"observation_version": "0.1"})


def _edit_card(folder, **fields):
    card = json.loads((folder / CARD_FILE).read_text())
    card.update(fields)
    (folder / CARD_FILE).write_text(json.dumps(card))


def test_other_observation_version_is_refused(artifact):
    _edit_card(artifact, observation_version="0.9")
    with pytest.raises(PolicyArtifactError) as error:
        LearnedPolicy.load(artifact)
    message = str(error.value)
    assert str(artifact / CARD_FILE) in message
    assert "'0.9'" in message and repr(OBSERVATION_VERSION) in message
    assert "retrain" in message


def test_other_feature_list_is_refused(artifact):
    _edit_card(artifact, unit_features=[*UNIT_FEATURES[:-1], "renamed"])
    with pytest.raises(PolicyArtifactError, match="renamed"):
        LearnedPolicy.load(artifact)


@pytest.mark.parametrize("missing", [CARD_FILE, WEIGHTS_FILE])
def test_missing_file_is_refused(artifact, missing):
    (artifact / missing).unlink()
    with pytest.raises(PolicyArtifactError, match=missing):
        LearnedPolicy.load(artifact)


def test_weights_that_do_not_fit_the_card_are_refused(artifact):
    _edit_card(artifact, architecture={"embed_dim": 32, "n_heads": 2, "n_layers": 1})
    with pytest.raises(PolicyArtifactError, match=WEIGHTS_FILE):
        LearnedPolicy.load(artifact)


def test_truncated_weights_are_named_as_damaged(artifact):
    weights = artifact / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PolicyArtifactError, match=rf"{weights}.* is damaged"):
        LearnedPolicy.load(artifact)
