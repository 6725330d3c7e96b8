"""Policy training end to end on a tiny task: PPO updates, checkpoints, resume, the artifact."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import conv_chain, tiny_config, train_steps

from freeze_agent.cli import _config_from_args, _parser
from freeze_agent.controller import FreezeController
from freeze_agent.core.modes import Mode
from freeze_agent.policies.artifact import load_card
from freeze_agent.policies.learned import LearnedPolicy
from freeze_agent.rl.learning_curve import read_episodes
from freeze_agent.rl.training import TrainConfig, latest_checkpoint, train
from freeze_agent.rl.validation import ValidationCallback


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FREEZE_AGENT_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_a_few_ppo_updates_write_a_loadable_policy(tmp_path):
    out = train(tiny_config(), tmp_path / "policy", use_wandb=False, progress_bar=False)
    card = load_card(out)
    assert card["timesteps"] == 16 and card["training_tasks"] == ["digits-cnn2d"]
    assert card["validation"]["episodes"][0]["task"] == "digits-cnn2d"
    assert latest_checkpoint(out / "checkpoints").name == "ppo_16_steps.zip"
    policy = LearnedPolicy.load(out)
    assert policy.max_units == 32
    episodes = read_episodes(out / "checkpoints" / "episodes.jsonl")
    assert len(episodes) == 8  # 16 decisions, 2 per episode
    assert {e["task"] for e in episodes} == {"digits-cnn2d"}
    run = card["training_run"]
    assert run["timesteps"] == 16 and run["episodes"] == 8
    assert sum(row["episodes"] for row in run["learning_curve"]) == 8


@pytest.mark.slow
def test_resume_after_interruption_continues_the_step_count(tmp_path, monkeypatch):
    out = tmp_path / "policy"
    original = ValidationCallback._on_step

    def interrupted(self):
        if self.model.num_timesteps >= 16:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(ValidationCallback, "_on_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(timesteps=24), out, use_wandb=False, progress_bar=False)
    assert latest_checkpoint(out / "checkpoints").name == "ppo_16_steps.zip"
    monkeypatch.setattr(ValidationCallback, "_on_step", original)

    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(timesteps=24), out, use_wandb=False, progress_bar=False)
    train(tiny_config(timesteps=999), out, resume=True, use_wandb=False, progress_bar=False)
    assert latest_checkpoint(out / "checkpoints").name == "ppo_24_steps.zip"  # saved settings win
    assert json.loads((out / "policy.json").read_text())["timesteps"] == 24

    # the saved settings, edited, take over from the checkpoint's: a longer rollout, more steps
    saved = out / "checkpoints" / "train_config.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "n_steps": 24, "timesteps": 40}))
    train(tiny_config(), out, resume=True, use_wandb=False, progress_bar=False)
    assert latest_checkpoint(out / "checkpoints").name == "ppo_48_steps.zip"  # one rollout of 24


def test_a_new_run_replaces_an_earlier_runs_policy_whatever_its_recorded_return(tmp_path):
    out = tmp_path / "policy"
    out.mkdir()
    (out / "policy.json").write_text(json.dumps({"validation": {"means": {"return": 1e9}}}))
    train(tiny_config(timesteps=8), out, use_wandb=False, progress_bar=False)
    assert load_card(out)["timesteps"] == 8


def _train_config(*options: str) -> TrainConfig:
    return _config_from_args(_parser().parse_args(["train", "--out", "x", *options]))


def test_train_options_are_the_config_fields_with_their_defaults():
    assert _train_config() == TrainConfig()
    config = _train_config(
        "--reward", "accuracy_weight=1.5", "cost=measured", "--n-envs", "4", "--no-reference-model"
    )
    assert config.reward == {"accuracy_weight": 1.5, "cost": "measured"}
    assert config.n_envs == 4 and config.reference_model is False
    assert _train_config("--tasks", "envs/train", "--epochs", "2").tasks == ["envs/train"]


def test_bad_reward_settings_from_the_command_line_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown settings accuracy; known: loss_weight"):
        _train_config("--reward", "accuracy=1")
    with pytest.raises(ValueError, match="tolerance_pp must be a number"):
        _train_config("--reward", "tolerance_pp=half")


def test_resume_without_a_run_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="without --resume"):
        train(tiny_config(), tmp_path / "nothing", resume=True, use_wandb=False)


def test_batch_size_must_divide_the_rollout():
    with pytest.raises(ValueError, match="must divide"):
        tiny_config(n_steps=10, batch_size=4)


def test_one_learned_policy_decides_for_models_of_different_unit_counts(tmp_path):
    out = train(tiny_config(timesteps=8), tmp_path / "policy", use_wandb=False, progress_bar=False)
    policy = LearnedPolicy.load(out)
    for depth in (2, 7):
        model = conv_chain(depth=depth)
        controller = FreezeController(
            model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 1, 16), signals=False
        )
        train_steps(
            model, controller.optimizer, controller, (torch.randn(8, 1, 16), torch.zeros(8).long())
        )
        modes = controller.set_modes(policy.decide(controller.observe()))
        assert len(modes) == len(controller.units) == depth + 1
        assert modes[-1] is Mode.TRAIN
        controller.close()


@pytest.mark.slow
def test_periodic_validation_keeps_the_best_policy_it_saw(tmp_path, monkeypatch):
    seen = []
    original = ValidationCallback.evaluate_now

    def recording(self):
        keep_going = original(self)
        seen.append((self.evaluated_at, self.last_evaluation.mean_return))
        return keep_going

    monkeypatch.setattr(ValidationCallback, "evaluate_now", recording)
    config = tiny_config(timesteps=24, eval_every=8, learning_rate=3e-3)
    out = train(config, tmp_path / "policy", use_wandb=False, progress_bar=False)
    assert [timesteps for timesteps, _ in seen] == [8, 16, 24]
    best = max(value for _, value in seen)
    first_best = next(timesteps for timesteps, value in seen if value == best)
    card = load_card(out)
    assert card["validation"]["means"]["return"] == pytest.approx(best)
    assert card["timesteps"] == first_best


@pytest.mark.slow
def test_two_environment_processes_with_the_reference_worker_train_a_policy(tmp_path):
    config = tiny_config(timesteps=8, n_envs=2, n_steps=4, reference_model=True)
    out = train(config, tmp_path / "policy", use_wandb=False, progress_bar=False)
    assert load_card(out)["timesteps"] == 8
    episodes = read_episodes(out / "checkpoints" / "episodes.jsonl")
    assert len(episodes) == 4 and {e["task"] for e in episodes} == {"digits-cnn2d"}


@pytest.mark.slow
def test_resuming_a_finished_run_only_validates_it(tmp_path):
    out = train(tiny_config(timesteps=8), tmp_path / "policy", use_wandb=False, progress_bar=False)
    train(tiny_config(), out, resume=True, use_wandb=False, progress_bar=False)
    assert latest_checkpoint(out / "checkpoints").name == "ppo_8_steps.zip"
    assert load_card(out)["timesteps"] == 8
