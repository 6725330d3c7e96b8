"""One benchmark run: a task trained from a seed under a policy, with its validation accuracy
after every interval against the training time spent so far (for time to accuracy)."""

from __future__ import annotations

from typing import Any

from freeze_agent.policies.base import Policy
from freeze_agent.tasks.spec import Task
from freeze_agent.tasks.trainer import Trainer


def train_under(
    task: Task,
    seed: int,
    policy: Policy,
    *,
    epochs: int | None = None,
    signals: bool = True,
    curve: bool = True,
) -> dict[str, Any]:
    """Train ``task`` from ``seed`` under ``policy`` and return the run's record: the
    ``RunResult`` fields, and with ``curve`` the validation accuracy after each interval beside
    the training seconds spent until then (evaluation is not timed)."""
    trainer = Trainer(task, seed, epochs=epochs, signals=signals)
    points: list[tuple[float, float]] = []

    def evaluate(_report) -> None:
        if curve:
            points.append((trainer.train_seconds, trainer.evaluate("val")[1]))

    result = trainer.run(policy, on_interval=evaluate).to_dict()
    result["curve"] = points
    result.pop("losses", None)  # per-step losses: large, and the curve says what matters here
    return result
