"""The record of a policy-training run: one JSON line per finished episode, and the learning
curve summarized from it.

``EpisodeRecorder`` appends every episode summary the environments report to
``<out>/checkpoints/episodes.jsonl``, with the timestep and the wall-clock time it ended. The file
lives next to the checkpoints because it belongs to the run: a resumed run first drops the lines
recorded after the checkpoint it resumes from (those decisions are taken again), then goes on
appending. It is the learning curve without Weights & Biases, and the source of the summary the
policy card keeps (``learning_curve``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

EPISODES_FILE = "episodes.jsonl"
# the per-episode fields the learning curve averages
CURVE_FIELDS = ("return", "modeled_speedup", "accuracy_delta_pp")


class EpisodeRecorder(BaseCallback):
    """Append each finished episode's summary (see ``FreezeTrainingEnv``) to ``path`` as one
    JSON line, with ``timesteps`` (decisions taken so far) and ``time`` (Unix seconds).

    Args:
        path: the JSONL file
        resumed_at: the timestep of the checkpoint a resumed run starts from; lines recorded
            after it are dropped. None for a new run, which starts the file afresh.
    """

    def __init__(self, path: str | Path, *, resumed_at: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        kept = []
        if resumed_at is not None:
            kept = [e for e in read_episodes(self.path) if e["timesteps"] <= resumed_at]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(e) + "\n" for e in kept))

    def _on_step(self) -> bool:
        for info in self.locals.get("infos") or ():
            summary = info.get("episode_summary") if isinstance(info, Mapping) else None
            if summary is not None:
                record = {"timesteps": int(self.num_timesteps), "time": time.time(), **summary}
                with self.path.open("a") as file:
                    file.write(json.dumps(record, default=_json_value) + "\n")
        return True


def read_episodes(path: str | Path) -> list[dict[str, Any]]:
    """The episode records of ``path`` (none if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def learning_curve(episodes: list[dict[str, Any]], blocks: int = 8) -> list[dict[str, Any]]:
    """Split the episodes, in the order they ended, into ``blocks`` consecutive groups of about
    the same size and average each group's return, modeled speedup and validation-accuracy
    change (percentage points). Diverged episodes count in the return and in ``diverged``."""
    if blocks < 1:
        raise ValueError(f"blocks must be at least 1, got {blocks}")
    curve: list[dict[str, Any]] = []
    if not episodes:
        return curve
    for group in np.array_split(np.arange(len(episodes)), min(blocks, len(episodes))):
        chosen = [episodes[i] for i in group]
        row: dict[str, Any] = {
            "timesteps": [chosen[0]["timesteps"], chosen[-1]["timesteps"]],
            "episodes": len(chosen),
        }
        for key in CURVE_FIELDS:
            values = [float(e[key]) for e in chosen if _finite(e.get(key))]
            row[key] = float(np.mean(values)) if values else None
        row["diverged"] = sum(bool(e.get("diverged")) for e in chosen)
        curve.append(row)
    return curve


def training_wall_seconds(episodes: list[dict[str, Any]], gap_s: float = 900.0) -> float:
    """Wall time the run spent training: the span of its episode end times, less any pause
    longer than ``gap_s`` (the run was stopped and resumed later)."""
    times = sorted(float(e["time"]) for e in episodes)
    steps = np.diff(times)
    return float(steps[steps <= gap_s].sum()) if len(times) > 1 else 0.0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and bool(np.isfinite(value))


def _json_value(value: Any) -> Any:
    """numpy scalars and other odd values an env may put in a summary."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
