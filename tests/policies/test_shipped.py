"""The policies that ship in ``policies/``: they load against this version's observation spec and
decide on a real run, and the SmartFRZ predictor scores it (a feature change that breaks them
must fail here, not in a user's ``scripts/run``)."""

from __future__ import annotations

import numpy as np
import pytest
from sb3_contrib import MaskablePPO

from freeze_agent import Mode, NoFreeze, Trainer, make_policy
from freeze_agent.core.resources import POLICIES_DIR
from freeze_agent.policies.artifact import MODEL_FILE
from freeze_agent.policies.learned import LearnedPolicy
from freeze_agent.policies.network import UnitAttentionPolicy
from freeze_agent.signals.observation import GLOBAL_FEATURES, UNIT_FEATURES
from freeze_agent.signals.predictor import load_predictor


@pytest.fixture
def observed_run(tiny_task):
    """A tiny run two intervals in, with every signal on, and its latest observation."""
    trainer = Trainer(tiny_task, seed=0)
    policy = NoFreeze()
    for _ in range(2):
        trainer.run_interval(policy.decide(trainer.controller.observe()))
    yield trainer, trainer.controller.observe()
    trainer.close()


def test_the_shipped_policy_loads_and_decides_on_a_real_run(observed_run):
    trainer, observation = observed_run
    policy = make_policy("default")
    assert isinstance(policy, LearnedPolicy) and policy.directory == POLICIES_DIR / "default"
    modes = trainer.set_modes(policy.decide(observation))
    assert len(modes) == len(trainer.units) and modes[-1] is Mode.TRAIN
    assert all(isinstance(m, Mode) for m in modes)


def test_an_observation_of_a_real_run_carries_an_attention_score(observed_run):
    trainer, observation = observed_run
    real = observation["mask"].astype(bool)
    units = observation["units"][real]
    assert (units[:, UNIT_FEATURES.index("attention_missing")] == 0).all()
    scores = units[:, UNIT_FEATURES.index("attention_score")]
    assert ((scores >= 0) & (scores <= 1)).all() and np.ptp(scores) > 0
    assert observation["global"][GLOBAL_FEATURES.index("predictor_available")] == 1
    assert load_predictor().size == trainer.controller.attention.history.sampler.size


def test_the_shipped_policy_resumes_for_more_training():
    model = MaskablePPO.load(
        POLICIES_DIR / "default" / MODEL_FILE, custom_objects={"policy_class": UnitAttentionPolicy}
    )
    assert isinstance(model.policy, UnitAttentionPolicy)
