"""Measure a policy against training without freezing (``freeze-agent evaluate``).

Each (task, seed) is one episode of the freeze environment under the policy, compared with the
all-TRAIN reference run of the same seed: modeled speedup (cost model), measured speedup
(training wall time, evaluation excluded) and the change of validation and test accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from freeze_agent.policies.registry import make_policy
from freeze_agent.rl.env import FreezeTrainingEnv
from freeze_agent.rl.episodes import play_episode


@dataclass
class EvaluationReport:
    """Episode summaries of one policy over tasks × seeds."""

    policy: str
    policy_dir: Path | None
    seeds: list[int]
    splits: dict[str, str]
    episodes: list[dict[str, Any]] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """One row per task: means over seeds, and the worst seed's test-accuracy change."""
        rows = []
        for task, split in self.splits.items():
            runs = [e for e in self.episodes if e["task"] == task]
            rows.append(
                {
                    "task": task,
                    "split": split,
                    "seeds": [e["seed"] for e in runs],
                    "modeled_speedup": _mean(runs, "modeled_speedup"),
                    "measured_speedup": _mean(runs, "measured_speedup"),
                    "val_delta_pp": _mean(runs, "accuracy_delta_pp"),
                    "test_delta_pp": _mean(runs, "test_delta_pp"),
                    "worst_test_delta_pp": min(e["test_delta_pp"] for e in runs),
                    "diverged": sum(e["diverged"] for e in runs),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "seeds": self.seeds,
            "tasks": self.rows(),
            "episodes": self.episodes,
        }

    def record_in_card(self) -> None:
        """Store the per-task rows in the policy's card (``policy.json``)."""
        if self.policy_dir is None:
            raise ValueError(f"{self.policy} is a baseline, not a policy folder with a card")
        from freeze_agent.policies.artifact import update_card

        # update_card merges dicts: results for tasks not evaluated now stay in the card
        update_card(self.policy_dir, evaluation={row["task"]: row for row in self.rows()})


def evaluate_policy(
    policy_spec: str,
    tasks: Sequence[str],
    seeds: Sequence[int],
    *,
    remeasure: bool = False,
    console: Console | None = None,
) -> EvaluationReport:
    """Play ``policy_spec`` on every task once per seed (see the module docstring)."""
    console = console or Console()
    policy = make_policy(policy_spec)
    policy_dir = getattr(policy, "directory", None)  # learned policies have a card
    env = FreezeTrainingEnv(list(tasks), seeds=list(seeds))
    report = EvaluationReport(
        policy=policy.name,
        policy_dir=policy_dir,
        seeds=list(seeds),
        splits={t.name: t.split for t in env.tasks},
    )
    try:
        for task in env.tasks:
            for seed in seeds:
                with console.status(f"{task.name}, seed {seed}"):
                    summary = play_episode(
                        env, policy, task.name, seed, refresh_reference=remeasure
                    )
                report.episodes.append(summary)
                console.print(
                    f"{task.name} seed {seed}: modeled {summary['modeled_speedup']:.2f}x, "
                    f"measured {summary['measured_speedup']:.2f}x, "
                    f"test {summary['test_delta_pp']:+.2f}pp"
                )
    finally:
        env.close()
    return report


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in runs])) if runs else float("nan")
