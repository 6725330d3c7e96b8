"""The freeze environment: Gymnasium and SB3 conformance, masks, rewards, reference runs."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import freeze_agent  # noqa: F401 - registers the env id
from freeze_agent.core.modes import Mode
from freeze_agent.policies.registry import make_policy
from freeze_agent.policies.schedules import NoFreeze
from freeze_agent.rl.env import ENV_ID, FreezeTrainingEnv
from freeze_agent.rl.episodes import play_episode
from freeze_agent.rl.rewards import RewardConfig, accuracy_penalty, loss_penalty, saving
from freeze_agent.rl.trajectories import reference_trajectory
from freeze_agent.signals.observation import has_plasticity
from freeze_agent.signals.reference import ReferenceWorker
from freeze_agent.tasks.spec import resolve_tasks

# Without the asynchronous reference model and wall-time figures, episodes are reproducible.
TINY = {
    "tasks": "digits-cnn2d",
    "epochs": 1,
    "decisions": 3,
    "reference_model": False,
    "timing": False,
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FREEZE_AGENT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def env():
    environment = FreezeTrainingEnv(**TINY)
    yield environment
    environment.close()


def all_train(env: FreezeTrainingEnv) -> np.ndarray:
    return np.zeros(env.max_units, dtype=np.int64)


def test_passes_gymnasium_check_env(env):
    gymnasium_check_env(env, skip_render_check=True)


def test_passes_sb3_check_env(env):
    sb3_check_env(env, warn=True)


def test_registered_id_builds_the_env():
    environment = gymnasium.make(ENV_ID, **TINY)
    observation, info = environment.reset(seed=0)
    assert info["task"] == "digits-cnn2d"
    assert environment.observation_space.contains(observation)
    assert environment.unwrapped.action_masks().shape == (3 * 32,)
    environment.close()


def test_tasks_from_a_split_name_a_folder_and_a_list():
    val = resolve_tasks("val")
    assert {t.split for t in val} == {"val"} and len(val) >= 2
    assert [t.name for t in resolve_tasks([val[0].path, "digits-cnn2d"])] == [
        val[0].name,
        "digits-cnn2d",
    ]
    with pytest.raises(FileNotFoundError, match="no task named"):
        resolve_tasks("no-such-task")


def test_masks_allow_only_train_on_padding_and_head(env):
    env.reset(seed=0)
    masks = env.action_masks().reshape(env.max_units, 3)
    n = len(env.trainer.units)
    assert masks[n - 1].tolist() == [True, False, False]  # the head
    assert not masks[n:, 1:].any() and masks[n:, 0].all()  # padded slots
    assert masks[: n - 1, Mode.FROZEN].all()
    supports_local = [u.supports_local for u in env.trainer.units[:-1]]
    assert masks[: n - 1, Mode.LOCAL].tolist() == supports_local


def test_all_train_episode_matches_its_reference_and_pays_nothing(env):
    rewards = []
    env.reset(seed=0, options={"seed": 1})
    while True:
        _, reward, terminated, truncated, info = env.step(all_train(env))
        rewards.append(reward)
        assert info["loss_penalty"] == 0.0 and info["saved"] == pytest.approx(0.0, abs=1e-12)
        if terminated:
            break
    summary = info["episode_summary"]
    assert not truncated and info["accuracy_penalty"] == 0.0
    assert summary["accuracy_delta_pp"] == 0.0 and summary["test_delta_pp"] == 0.0
    assert summary["decisions"] == len(rewards) == 3
    assert summary["modeled_speedup"] == pytest.approx(1.0)
    assert summary["timeline"] == ["TTTTT"] * 3
    assert sum(rewards) == pytest.approx(summary["return"])


def test_freezing_earns_the_saved_cost_and_reports_speedup(env):
    env.reset(seed=0, options={"seed": 0})
    freeze = np.full(env.max_units, int(Mode.FROZEN))
    _, reward, _, _, info = env.step(freeze)
    share = env.trainer.interval / env.trainer.total_steps
    assert info["modes"][:-1] == ["FROZEN"] * (len(env.trainer.units) - 1)
    assert info["modes"][-1] == "TRAIN"  # the head trains whatever the action says
    assert info["saved"] == pytest.approx(saving(share, env.trainer.step_costs[-1]))
    assert reward == pytest.approx(info["saved"] - info["loss_penalty"])
    assert info["modeled_speedup"] > 1.5


def test_reference_trajectory_is_cached_on_disk(tmp_path):
    task = resolve_tasks("digits-cnn2d")[0]
    first = reference_trajectory(task, 0, epochs=1, decisions=3)
    files = list((tmp_path / "cache" / "trajectories").glob("*.json"))
    assert len(files) == 1
    files[0].write_text(files[0].read_text().replace(str(first.test_accuracy), "0.123456"))
    assert reference_trajectory(task, 0, epochs=1, decisions=3).test_accuracy == 0.123456
    assert len(first.val_losses) == len(first.interval_seconds) == 3


def test_a_diverging_run_ends_the_episode_with_a_reason(env):
    env.reset(seed=0)
    for group in env.trainer.optimizer.param_groups:
        group["lr"] = 1e30
    env.trainer.schedule.base_lrs = [1e30] * len(env.trainer.schedule.base_lrs)
    while True:
        _, reward, terminated, _, info = env.step(all_train(env))
        if terminated:
            break
    assert "non-finite" in info["reason"]
    assert reward == -RewardConfig().divergence_penalty
    assert info["episode_summary"]["diverged"]


def test_play_episode_returns_the_summary(env):
    summary = play_episode(env, NoFreeze(), seed=2)
    assert summary["seed"] == 2 and summary["task"] == "digits-cnn2d"
    assert set(summary["timeline"][0]) == {"T"}


def test_a_privileged_policy_plays_an_episode_with_its_reference_run(env):
    teacher = make_policy("teacher:0.5")
    summary = play_episode(env, teacher, seed=2)
    assert summary["decisions"] == len(env.reference.val_losses)
    with pytest.raises(ValueError, match="privileged"):
        teacher.reset()  # without the reference run, as a plain training loop would


def test_reward_components_on_a_hand_made_case():
    config = RewardConfig(loss_weight=2.0, accuracy_weight=0.5, tolerance_pp=0.5)
    # a quarter of the run at 40% of the all-TRAIN cost saves 15% of the run
    assert saving(0.25, 0.4) == pytest.approx(0.15)
    # 0.1 above the reference loss, which drops by 2.0 over its run, for a quarter of the run
    assert loss_penalty(config, 0.25, 1.1, 1.0, 2.0) == pytest.approx(0.025)
    assert loss_penalty(config, 0.25, 1.4, 1.0, 2.0) == pytest.approx(0.1)
    assert loss_penalty(config, 0.25, 0.9, 1.0, 2.0) == 0.0  # better than the reference is free
    assert loss_penalty(config, 0.25, float("nan"), 1.0, 2.0) == pytest.approx(0.5)  # saturates
    assert loss_penalty(config, 0.25, 1.4, 1.0, 0.0) == 0.0  # a reference that never learned
    # 1.5pp lost, 0.5pp tolerated, 0.5 per pp
    assert accuracy_penalty(config, 0.885, 0.900) == pytest.approx(0.5)
    assert accuracy_penalty(config, 0.897, 0.900) == 0.0
    assert accuracy_penalty(config, 0.10, 0.90) == config.max_accuracy_penalty


def test_bad_reward_settings_are_refused():
    with pytest.raises(ValueError, match="cost must be"):
        RewardConfig(cost="wall")
    with pytest.raises(ValueError, match="loss_weight must be >= 0"):
        RewardConfig(loss_weight=-1)


def test_reset_can_retrain_the_reference_run(env, tmp_path):
    env.reset(options={"task": "digits-cnn2d", "seed": 0})
    (cached,) = (tmp_path / "cache" / "trajectories").glob("*.json")
    cached.write_text(cached.read_text().replace(str(env.reference.test_accuracy), "0.123456"))
    env.reset(options={"task": "digits-cnn2d", "seed": 0})
    assert env.reference.test_accuracy == 0.123456  # read from the cache
    env.reset(options={"task": "digits-cnn2d", "seed": 0, "refresh_reference": True})
    assert env.reference.test_accuracy != 0.123456  # trained again, same settings
    assert len(env.reference.val_losses) == 3


def test_the_last_step_pays_for_final_accuracy_lost_beyond_the_tolerance():
    config = RewardConfig(accuracy_weight=1.0, tolerance_pp=0.0)
    environment = FreezeTrainingEnv(**TINY, reward=config)
    environment.reset(options={"seed": 0})
    frozen = np.full(environment.max_units, int(Mode.FROZEN), dtype=np.int64)  # the head trains
    terminated = False
    while not terminated:
        _, reward, terminated, _, info = environment.step(frozen)
    environment.close()
    summary = info["episode_summary"]
    lost_pp = -summary["accuracy_delta_pp"]
    assert lost_pp > 1.0  # training only the head of a random CNN loses accuracy
    expected = accuracy_penalty(config, summary["val_accuracy"], summary["reference_val_accuracy"])
    assert info["accuracy_penalty"] == pytest.approx(expected) == pytest.approx(min(lost_pp, 2.0))
    assert reward == pytest.approx(info["saved"] - info["loss_penalty"] - expected)


def test_check_env_passes_with_the_reference_model_on():
    environment = gymnasium.make(ENV_ID, **{**TINY, "reference_model": True}).unwrapped
    try:
        gymnasium_check_env(environment, skip_render_check=True)
    finally:
        environment.close()


def _episode(actions: int = 3, seed: int = 3) -> tuple[list[dict], list[float]]:
    environment = FreezeTrainingEnv(**{**TINY, "reference_model": True, "decisions": 6})
    observation, _ = environment.reset(options={"seed": seed})
    observations, rewards = [observation], []
    try:
        for step in range(6):
            action = np.zeros(environment.max_units, dtype=np.int64)
            action[: min(step // 2, actions)] = int(Mode.FROZEN)
            observation, reward, *_, info = environment.step(action)
            observations.append(observation)
            rewards.append(reward)
    finally:
        environment.close()
    assert info["episode_summary"]["plasticity_fraction"] == 6 / 7  # reported, and exact
    return observations, rewards


def test_observations_do_not_depend_on_when_reference_results_arrive(monkeypatch):
    prompt, prompt_rewards = _episode()
    # every result arrives late: nothing is in when first looked for, so each one is waited for
    poll, wait = ReferenceWorker.poll, ReferenceWorker.wait

    def late_poll(self):
        return poll(self) if getattr(self, "waiting", False) else None

    def waiting(self, timeout_s):
        self.waiting = True
        try:
            return wait(self, timeout_s)
        finally:
            self.waiting = False

    monkeypatch.setattr(ReferenceWorker, "poll", late_poll)
    monkeypatch.setattr(ReferenceWorker, "wait", waiting)
    late, late_rewards = _episode()
    assert sum(has_plasticity(o) for o in prompt) == len(prompt) - 1  # all but at reset
    assert late_rewards == prompt_rewards
    for a, b in zip(prompt, late, strict=True):
        assert all(np.array_equal(a[key], b[key]) for key in a)
