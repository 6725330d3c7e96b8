"""All-TRAIN reference trajectories: what training does when nothing freezes.

The environment's reward compares an episode with the same task trained from the same seed with
every unit in TRAIN: validation loss after every decision interval, final validation accuracy and
the measured wall time of each interval. A trajectory costs one full training run, so it is
trained once per (task spec, seed, budget, device kind) and cached on disk as JSON, keyed by the
spec's content: editing a task's YAML retrains it, renaming it does not.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from freeze_agent.tasks.data import cache_dir
from freeze_agent.tasks.spec import Task
from freeze_agent.tasks.trainer import Trainer, default_device

TRAJECTORY_FORMAT = 1


@dataclass(frozen=True)
class ReferenceTrajectory:
    """The all-TRAIN run of ``task`` from ``seed``, measured after every decision interval."""

    task: str
    fingerprint: str
    seed: int
    device: str
    epochs: int
    decisions: int
    total_steps: int
    interval: int
    val_losses: list[float]
    val_accuracies: list[float]
    interval_seconds: list[float]
    test_accuracy: float

    @property
    def final_val_accuracy(self) -> float:
        return self.val_accuracies[-1]

    @property
    def train_seconds(self) -> float:
        return sum(self.interval_seconds)

    def seconds_until(self, intervals: int) -> float:
        """Measured training time of the first ``intervals`` intervals."""
        return sum(self.interval_seconds[:intervals])


def trajectory_path(
    task: Task, seed: int, epochs: int, decisions: int, device: torch.device
) -> Path:
    name = f"{task.name}-{task.fingerprint()[:16]}-e{epochs}-d{decisions}-s{seed}-{device.type}"
    return cache_dir() / "trajectories" / f"{name}.json"


def reference_trajectory(
    task: Task,
    seed: int,
    *,
    device: str | torch.device | None = None,
    epochs: int | None = None,
    decisions: int | None = None,
    max_units: int = 32,
    refresh: bool = False,
) -> ReferenceTrajectory:
    """The cached reference trajectory of ``task`` from ``seed``; trained now if missing."""
    device = torch.device(device) if device is not None else default_device()
    epochs, decisions = epochs or task.epochs, decisions or task.decisions
    path = trajectory_path(task, seed, epochs, decisions, device)
    if path.is_file() and not refresh:
        cached = json.loads(path.read_text())
        if cached.pop("format", None) == TRAJECTORY_FORMAT:
            return ReferenceTrajectory(**cached)
    trainer = Trainer(
        task,
        seed,
        device=device,
        epochs=epochs,
        decisions=decisions,
        max_units=max_units,
        signals=False,
    )
    trajectory = _train(trainer, decisions)
    _write_atomically(path, {"format": TRAJECTORY_FORMAT, **asdict(trajectory)})
    return trajectory


def _train(trainer: Trainer, decisions: int) -> ReferenceTrajectory:
    val_losses, val_accuracies, seconds = [], [], []
    try:
        while not trainer.done:
            report = trainer.run_interval()
            val_loss, val_accuracy = trainer.evaluate("val")
            val_losses.append(val_loss)
            val_accuracies.append(val_accuracy)
            seconds.append(report.seconds)
        if trainer.diverged:
            raise RuntimeError(
                f"task {trainer.task.name} diverges without any freezing (seed {trainer.seed}): "
                "lower its learning rate in the task spec"
            )
        _, test_accuracy = trainer.evaluate("test")
    finally:
        trainer.close()
    return ReferenceTrajectory(
        task=trainer.task.name,
        fingerprint=trainer.task.fingerprint(),
        seed=trainer.seed,
        device=trainer.device.type,
        epochs=trainer.epochs,
        decisions=decisions,
        total_steps=trainer.total_steps,
        interval=trainer.interval,
        val_losses=val_losses,
        val_accuracies=val_accuracies,
        interval_seconds=seconds,
        test_accuracy=test_accuracy,
    )


def _write_atomically(path: Path, payload: dict) -> None:
    # Parallel environments may train the same trajectory; the last complete file wins.
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        json.dump(payload, file, indent=1)
    os.replace(temporary, path)
