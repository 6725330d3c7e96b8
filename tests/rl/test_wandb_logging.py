"""wandb logging: mode and credential detection, the SB3 writer, the episode callback, the
and one real offline run whose files are read back."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from freeze_agent.core.modes import Mode
from freeze_agent.rl import wandb_logging as wl

UNITS = ["stem", "block0", "block1", "head"]


def make_summary(task: str = "mnist1d-mlp", decisions: int = 5, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    timeline = ["".join(rng.choice(list("TLF"), len(UNITS) - 1)) + "T" for _ in range(decisions)]
    return {
        "task": task,
        "seed": seed,
        "return": 0.25,
        "decisions": decisions,
        "modeled_speedup": 1.4,
        "measured_speedup": 1.3,
        "val_accuracy": 0.91,
        "reference_val_accuracy": 0.92,
        "accuracy_delta_pp": -1.0,
        "diverged": False,
        "reason": None,
        "unit_names": list(UNITS),
        "timeline": timeline,
    }


class FakeRun:
    """Records what would be logged."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return tmp_path


# --- mode and credentials ----------------------------------------------------------------------


def test_offline_without_credentials(no_credentials):
    assert not wl.has_credentials()
    assert wl.resolve_mode() == "offline"


def test_online_with_api_key_or_netrc(no_credentials, monkeypatch):
    netrc_file = no_credentials / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert wl.resolve_mode() == "online"
    # An entry for another server does not count.
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert wl.resolve_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wl.resolve_mode() == "online"


def test_wandb_mode_wins(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wl.resolve_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "Disabled")
    assert wl.resolve_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "off")
    with pytest.raises(ValueError, match="WANDB_MODE"):
        wl.resolve_mode()


def test_disabled_returns_none_and_callbacks_do_nothing(tmp_path):
    # conftest sets WANDB_MODE=disabled
    assert wl.start_run(project="p", config={}, directory=tmp_path) is None
    assert wl.start_run(project="p", config={}, enabled=False, directory=tmp_path) is None
    assert not any(tmp_path.iterdir())
    writer = wl.WandbOutputFormat(None)
    writer.write({"train/loss": 1.0}, {}, step=3)
    assert writer.dumps_logged == 0
    callback = wl.EpisodeLogger(None)
    callback.locals = {"infos": [{"episode_summary": make_summary()}, {}]}
    assert callback._on_step()
    assert (callback.episodes_seen, callback.episodes_logged, callback.media_logged) == (1, 0, 0)
    assert wl.sync_hint(None) is None
    assert wl.save_run_id(None, tmp_path) is None


def test_run_id_round_trip(tmp_path):
    class Run:
        id = "abc123"

    assert wl.load_run_id(tmp_path) is None
    wl.save_run_id(Run(), tmp_path / "ckpt")
    assert wl.load_run_id(tmp_path / "ckpt") == "abc123"


# --- SB3 writer and episode callback, against a fake run ----------------------------------------


def test_writer_logs_numbers_against_global_step():
    run = FakeRun()
    writer = wl.WandbOutputFormat(run)
    writer.write(
        {
            "train/loss": np.float32(0.5),
            "train/n_updates": np.int64(10),
            "train/explained_variance": np.array(0.25),
            "rollout/ep_rew_mean": 3,
            "note": "text",
            "time/fps": 100,
        },
        {"time/fps": ("stdout", "wandb"), "train/loss": ("tensorboard",)},
        step=640,
    )
    assert run.rows == [
        {
            "train/loss": 0.5,
            "train/n_updates": 10,
            "train/explained_variance": 0.25,
            "rollout/ep_rew_mean": 3,
            "global_step": 640,
        }
    ]
    writer.write({"note": "only text"}, {}, step=700)
    assert len(run.rows) == 1


def test_episode_logger_scalars_media_every():
    run = FakeRun()
    callback = wl.EpisodeLogger(run, media_every=2)
    callback.num_timesteps = 40
    for seed in range(3):
        callback.locals = {"infos": [{}, {"episode_summary": make_summary(seed=seed)}]}
        callback._on_step()
    assert (callback.episodes_logged, callback.media_logged) == (3, 2)
    first, second = run.rows[0], run.rows[1]
    assert first["global_step"] == 40
    assert first["episode/index"] == 1
    assert first["episode/return"] == 0.25
    assert first["episode/mnist1d-mlp/return"] == 0.25
    assert first["episode/accuracy_delta_pp"] == -1.0
    assert first["episode/diverged"] == 0
    fractions = [first[f"episode/frac_{m.name.lower()}"] for m in Mode]
    assert sum(fractions) == pytest.approx(1.0)
    assert "episode/mnist1d-mlp/timeline" in first
    assert "episode/mnist1d-mlp/timeline" not in second
    table = first["episode/mnist1d-mlp/timeline_table"]
    assert table.columns[:4] == ["decision", "n_train", "n_local", "n_frozen"]
    assert table.columns[4:] == ["0:stem", "1:block0", "2:block1", "3:head"]
    assert len(table.data) == 5 and table.data[0][-1] == "TRAIN"


def test_episode_logger_survives_bad_timeline():
    run = FakeRun()
    callback = wl.EpisodeLogger(run)
    summary = make_summary()
    summary["timeline"] = ["TX", "TTTT"]
    callback.locals = {"infos": [{"episode_summary": summary}]}
    with pytest.warns(UserWarning, match="timeline not logged"):
        callback._on_step()
    assert (callback.episodes_logged, callback.media_logged) == (1, 0)
    assert run.rows[0]["episode/return"] == 0.25


# --- one real offline run ------------------------------------------------------------------------


class SummaryAtEnd(gym.Wrapper):
    """CartPole that reports an ``episode_summary`` at each episode end, like the freeze env."""

    def reset(self, **kwargs):
        self.decisions: list[str] = []
        self.total = 0.0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.total += float(reward)
        self.decisions.append("TLFT"[len(self.decisions) % 3] * 3 + "T")
        if terminated or truncated:
            info["episode_summary"] = {
                **make_summary(task="cartpole", decisions=len(self.decisions)),
                "return": self.total,
                "timeline": list(self.decisions),
            }
        return obs, reward, terminated, truncated, info


def read_wandb_records(path: Path) -> list[Any]:
    """The records of a ``.wandb`` file: a header, then LevelDB-log framed protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def history_rows(path: Path, *, expected: int = 0, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """The history rows of a ``.wandb`` file. wandb's service may still be writing the file when
    ``run.finish()`` returns on a busy machine: wait (up to ``timeout_s``) for ``expected``
    rows."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = _history_rows(path)
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _history_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def test_offline_run_holds_ppo_and_episode_logs(no_credentials, monkeypatch, capsys):
    from stable_baselines3 import PPO
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    tmp_path = no_credentials
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))

    run = wl.start_run(project="freeze-agent-test", config={"n_steps": 64}, name="t")
    assert run is not None
    try:
        assert str(tmp_path / "wandb_dir") in capsys.readouterr().err  # the sync hint
        env = DummyVecEnv([lambda: Monitor(SummaryAtEnd(gym.make("CartPole-v1")))])
        model = PPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu")
        callback = wl.EpisodeLogger(run, media_every=3)
        model.learn(total_timesteps=128, callback=callback)
        wl.save_run_id(run, tmp_path / "ckpt")
    finally:
        run.finish()

    assert callback.episodes_logged >= 2
    assert callback.media_logged == -(-callback.episodes_logged // 3)
    folders = list((tmp_path / "wandb_dir" / "wandb").glob(f"offline-run-*-{run.id}"))
    assert len(folders) == 1
    files = list(folders[0].glob("*.wandb"))
    assert len(files) == 1
    assert wl.load_run_id(tmp_path / "ckpt") == run.id

    rows = history_rows(files[0], expected=callback.episodes_logged + 2)  # + 2 PPO rows
    episodes = [r for r in rows if "episode/return" in r]
    assert len(episodes) == callback.episodes_logged
    assert all(r["episode/cartpole/return"] == r["episode/return"] > 0 for r in episodes)
    assert [r["global_step"] for r in episodes] == sorted(r["global_step"] for r in episodes)
    ppo = [r for r in rows if "time/fps" in r]
    assert [r["global_step"] for r in ppo] == [64, 128]
    assert "rollout/ep_rew_mean" in ppo[0]
    assert {"train/loss", "train/entropy_loss", "train/explained_variance"} <= set(ppo[1])

    media = folders[0] / "files" / "media"
    assert len(list(media.rglob("*.png"))) == callback.media_logged
    assert len(list(media.rglob("*.table.json"))) == callback.media_logged

    # Resuming offline: the same id in a new folder, which `wandb sync` appends in order.
    resumed = wl.start_run(project="freeze-agent-test", config={}, resume_id=run.id)
    assert resumed is not None and resumed.id == run.id
    resumed.finish()
    assert list(Path(resumed.settings.sync_dir).glob(f"run-{run.id}.wandb"))


@pytest.mark.slow
def test_freeze_agent_train_logs_episodes_and_validation_offline(
    no_credentials, monkeypatch, tiny_task
):
    from freeze_agent.cli import main

    tmp_path = no_credentials
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    out = tmp_path / "policy"
    argv = ["train", "--out", str(out), "--tasks", str(tiny_task.path)]
    argv += ["--val-tasks", str(tiny_task.path), "--timesteps", "8", "--n-envs", "1"]
    argv += ["--epochs", "1", "--decisions", "2", "--n-steps", "4", "--batch-size", "4"]
    argv += ["--eval-every", "4", "--no-reference-model"]
    assert main(argv) == 0

    run_id = json.loads((out / "checkpoints" / "train_config.json").read_text())["wandb_run_id"]
    (folder,) = (tmp_path / "wandb_dir" / "wandb").glob(f"offline-run-*-{run_id}")
    rows = history_rows(next(folder.glob("*.wandb")), expected=4)
    episodes = [r for r in rows if "episode/return" in r]
    assert len(episodes) == 4  # 8 decisions, 2 per episode
    assert all("episode/tiny-digits/return" in r for r in episodes)
    assert any("eval/return" in r for r in rows)
