"""The record of a training run: episodes appended, trimmed on resume, summarized."""

from __future__ import annotations

import math

import pytest

from freeze_agent.rl.learning_curve import (
    EpisodeRecorder,
    learning_curve,
    read_episodes,
    training_wall_seconds,
)


def episode(timesteps: int, ret: float, *, time: float = 0.0, **fields) -> dict:
    return {
        "timesteps": timesteps,
        "time": time,
        "return": ret,
        "modeled_speedup": 1.0 + ret,
        "accuracy_delta_pp": -ret,
        "diverged": False,
        **fields,
    }


def finish(recorder: EpisodeRecorder, timesteps: int, summary: dict) -> None:
    """What SB3 does for a callback at a step where one env's episode ended."""
    recorder.num_timesteps = timesteps
    recorder.locals = {"infos": [{}, {"episode_summary": summary}]}
    recorder._on_step()


def test_recorder_appends_episodes_and_a_resumed_run_drops_the_replayed_ones(tmp_path):
    path = tmp_path / "checkpoints" / "episodes.jsonl"
    recorder = EpisodeRecorder(path)
    for timesteps in (10, 20, 30):
        finish(recorder, timesteps, {"task": "t", "return": 0.1 * timesteps})
    assert [e["timesteps"] for e in read_episodes(path)] == [10, 20, 30]
    assert read_episodes(path)[1]["return"] == pytest.approx(2.0)

    resumed = EpisodeRecorder(path, resumed_at=20)  # the checkpoint was taken at step 20
    finish(resumed, 25, {"task": "t", "return": 9.0})
    assert [e["timesteps"] for e in read_episodes(path)] == [10, 20, 25]

    EpisodeRecorder(path)  # a new run starts the record afresh
    assert read_episodes(path) == []


def test_learning_curve_averages_consecutive_blocks():
    episodes = [episode(10 * i, float(i)) for i in range(1, 7)]
    episodes[5]["diverged"] = True
    episodes[4]["modeled_speedup"] = math.nan  # skipped in the mean, not poisoning it
    curve = learning_curve(episodes, blocks=3)
    assert [row["timesteps"] for row in curve] == [[10, 20], [30, 40], [50, 60]]
    assert [row["return"] for row in curve] == [1.5, 3.5, 5.5]
    assert curve[2]["modeled_speedup"] == 7.0 and curve[2]["diverged"] == 1
    assert curve[0]["accuracy_delta_pp"] == -1.5
    assert len(learning_curve(episodes[:2], blocks=8)) == 2
    assert learning_curve([], blocks=4) == []
    with pytest.raises(ValueError, match="blocks"):
        learning_curve(episodes, blocks=0)


def test_training_wall_time_leaves_out_the_pause_between_sessions():
    times = [0.0, 60.0, 120.0, 5000.0, 5030.0]
    episodes = [episode(i, 0.0, time=t) for i, t in enumerate(times)]
    assert training_wall_seconds(episodes) == 150.0
    assert training_wall_seconds(episodes[:1]) == 0.0
