"""Kick-starting PPO: the plateau teacher, behaviour cloning, and the kick-start in training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_config
from sb3_contrib import MaskablePPO
from stable_baselines3.common.vec_env import DummyVecEnv

from freeze_agent.core.modes import Mode
from freeze_agent.policies.artifact import load_card
from freeze_agent.policies.network import UnitAttentionPolicy, deterministic_actions
from freeze_agent.policies.teacher import PlateauTeacher
from freeze_agent.rl.env import FreezeTrainingEnv
from freeze_agent.rl.imitation import Demonstrations, clone
from freeze_agent.rl.training import KICKSTART_FILE, latest_checkpoint, train
from freeze_agent.rl.trajectories import ReferenceTrajectory
from freeze_agent.signals.observation import GLOBAL_FEATURES, UNIT_FEATURES, action_mask

F, T = Mode.FROZEN, Mode.TRAIN


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FREEZE_AGENT_CACHE", str(tmp_path / "cache"))


def trajectory(val_losses: list[float]) -> ReferenceTrajectory:
    n = len(val_losses)
    return ReferenceTrajectory(
        task="hand-made",
        fingerprint="0",
        seed=0,
        device="cpu",
        epochs=1,
        decisions=n,
        total_steps=10 * n,
        interval=10,
        val_losses=val_losses,
        val_accuracies=[0.5] * n,
        interval_seconds=[1.0] * n,
        test_accuracy=0.5,
    )


def decisions(teacher: PlateauTeacher, reference: ReferenceTrajectory, n_units: int) -> list:
    """The teacher's modes at every decision of one run of a model with ``n_units`` units."""
    teacher.reset(reference)
    observation = {
        "units": np.zeros((32, len(UNIT_FEATURES)), dtype=np.float32),
        "mask": np.array([1] * n_units + [0] * (32 - n_units), dtype=np.int8),
        "global": np.zeros(len(GLOBAL_FEATURES), dtype=np.float32),
    }
    return [teacher.decide(observation) for _ in reference.val_losses]


def test_the_teacher_freezes_a_growing_prefix_once_the_reference_has_plateaued():
    # improvement 1.9; interval 3 is within 0.02 / 1.9 of the best: freezing starts at 4/10
    reference = trajectory([2.0, 1.0, 0.5, 0.12, 0.11, 0.1, 0.1, 0.1, 0.1, 0.1])
    teacher = PlateauTeacher(tolerance=0.05)
    assert teacher.freeze_start(reference) == pytest.approx(0.4)
    modes = decisions(teacher, reference, 5)
    assert modes[4] == [T] * 5
    assert modes[7] == [F, F, T, T, T]  # (0.7 - 0.4) / 0.6 of 4 units
    assert modes[9] == [F, F, F, F, T]  # the head always trains
    # a stricter tolerance waits for interval 5, where the loss reaches its best
    assert PlateauTeacher(tolerance=0.001).freeze_start(reference) == pytest.approx(0.6)


def test_the_teacher_never_freezes_a_run_that_is_still_learning_or_never_learned():
    teacher = PlateauTeacher()
    still_learning = trajectory([2.0 - 0.1 * i for i in range(10)])
    assert teacher.freeze_start(still_learning) == pytest.approx(1.0)  # best at the last interval
    assert all(m == [T] * 4 for m in decisions(teacher, still_learning, 4))
    assert all(m == [T] * 4 for m in decisions(teacher, trajectory([1.0] * 10), 4))


def test_the_teacher_needs_the_reference_run():
    with pytest.raises(ValueError, match="privileged"):
        PlateauTeacher().reset()
    with pytest.raises(RuntimeError, match="reset"):
        PlateauTeacher().decide({"mask": np.ones(3, dtype=np.int8)})


@pytest.mark.parametrize("tolerance", [0.0, 1.0, -0.1])
def test_a_teacher_tolerance_outside_zero_one_is_refused(tolerance):
    with pytest.raises(ValueError, match="tolerance"):
        PlateauTeacher(tolerance)


def _observation(rng: np.random.Generator, n_units: int, progress: float) -> dict[str, np.ndarray]:
    units = np.zeros((32, len(UNIT_FEATURES)), dtype=np.float32)
    units[:n_units] = rng.uniform(-1, 1, (n_units, len(UNIT_FEATURES)))
    for column in ("is_head", "supports_local"):
        units[:n_units, UNIT_FEATURES.index(column)] = 0.0
    units[n_units - 1, UNIT_FEATURES.index("is_head")] = 1.0
    units[:n_units, UNIT_FEATURES.index("relative_depth")] = np.linspace(0, 1, n_units)
    mask = np.zeros(32, dtype=np.int8)
    mask[:n_units] = 1
    global_ = rng.uniform(-1, 1, len(GLOBAL_FEATURES)).astype(np.float32)
    global_[GLOBAL_FEATURES.index("progress")] = progress
    return {"units": units, "mask": mask, "global": global_}


def _rule(n_units: int, progress: float) -> np.ndarray:
    """The behaviour to imitate: freeze the front half of the units in the second half of the
    run, whatever the other features say."""
    action = np.full(32, int(T))
    if progress > 0.5:
        action[: n_units // 2] = int(F)
    return action


def test_cloning_teaches_the_policy_the_teachers_decisions(tmp_path):
    env = FreezeTrainingEnv("digits-cnn2d", epochs=1, decisions=2, reference_model=False)
    model = MaskablePPO(UnitAttentionPolicy, DummyVecEnv([lambda: env]), n_steps=8, seed=0)
    rng = np.random.default_rng(0)
    demonstrations = Demonstrations()
    for _ in range(400):
        n_units, progress = int(rng.integers(4, 12)), float(rng.uniform(0, 1))
        observation = _observation(rng, n_units, progress)
        for key, value in observation.items():
            demonstrations.observations.setdefault(key, []).append(value)
        demonstrations.action_masks.append(action_mask(observation).reshape(-1))
        demonstrations.teacher_actions.append(_rule(n_units, progress))
        demonstrations.returns.append(progress)
    fit = clone(model, demonstrations, epochs=40)
    assert fit["agreement"] > 0.97 and fit["decisions"] == 400
    # on observations it never saw, including a unit count it never saw
    fresh = [(n, float(p)) for n in (5, 13) for p in rng.uniform(0.05, 0.95, 20)]
    agreed = [
        np.array_equal(
            deterministic_actions(model.policy, _observation(rng, n, p))[:n], _rule(n, p)[:n]
        )
        for n, p in fresh
        if abs(p - 0.5) > 0.1
    ]
    assert np.mean(agreed) > 0.8


def test_cloning_nothing_says_what_to_do(tmp_path):
    env = FreezeTrainingEnv("digits-cnn2d", epochs=1, decisions=2, reference_model=False)
    model = MaskablePPO(UnitAttentionPolicy, DummyVecEnv([lambda: env]), n_steps=8, seed=0)
    with pytest.raises(ValueError, match="collect at least one"):
        clone(model, Demonstrations())


@pytest.mark.slow
def test_a_kickstarted_run_imitates_then_runs_ppo_from_a_step_zero_checkpoint(tmp_path):
    config = tiny_config(imitation_rounds=2, imitation_episodes=1, decisions=3)
    out = train(config, tmp_path / "policy", use_wandb=False, progress_bar=False)
    checkpoints = out / "checkpoints"
    assert (checkpoints / "ppo_0_steps.zip").is_file()
    assert latest_checkpoint(checkpoints).name == "ppo_16_steps.zip"
    record = json.loads((checkpoints / KICKSTART_FILE).read_text())
    assert [r["actor"] for r in record["rounds"]] == ["teacher", "agent"]
    # DAgger aggregates: the second fit sees both rounds' decisions
    assert [r["fit"]["decisions"] for r in record["rounds"]] == [3, 6]
    assert [e["task"] for r in record["rounds"] for e in r["episodes"]] == ["digits-cnn2d"] * 2
    card = load_card(out)
    assert card["training_run"]["kickstart"] == record
    assert card["timesteps"] in (0, 16)  # the imitating policy was a candidate for the best
