"""The bench's numbers, from its run records: per round (a task and a seed), per task and
policy, and per policy over tasks.

* measured speedup: the round's mean ``none`` training time over the run's;
* modeled speedup: the cost model's, from the run's own modes;
* accuracy change: test accuracy against the mean of the round's ``none`` runs, in points;
* time to accuracy (MLPerf's measure): training seconds until validation accuracy first
  reaches the round's ``none`` final validation accuracy minus the tolerance (None: never).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

REFERENCE = "none"


def time_to_accuracy(curve: Sequence[Sequence[float]], target: float) -> float | None:
    """Training seconds at the first point of ``curve`` ((seconds, accuracy) pairs) that reaches
    ``target``; None if none does."""
    return next((seconds for seconds, accuracy in curve if accuracy >= target), None)


def per_run(records: Sequence[dict[str, Any]], tolerance_pp: float) -> list[dict[str, Any]]:
    """One row per run with its figures against its round's ``none`` runs (rounds whose two
    ``none`` runs are not both finished are left out)."""
    rounds: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        rounds[(record["task"], record["seed"])].append(record)
    rows = []
    for (task, seed), runs in sorted(rounds.items()):
        references = [r for r in runs if r["policy_spec"] == REFERENCE]
        if len(references) < 2:
            continue
        seconds = float(np.mean([r["wall_time"] for r in references]))
        test = float(np.mean([r["test_accuracy"] for r in references]))
        target = float(np.mean([r["val_accuracy"] for r in references])) - tolerance_pp / 100
        reference_tta = float(
            np.mean([time_to_accuracy(r["curve"], target) or math.inf for r in references])
        )
        for run in runs:
            tta = time_to_accuracy(run["curve"], target)
            change = 100 * (run["test_accuracy"] - test)
            rows.append(
                {
                    "task": task,
                    "split": run.get("split", ""),
                    "seed": seed,
                    "policy": run["policy_spec"],
                    "slot": run["slot"],
                    "measured_speedup": seconds / max(run["wall_time"], 1e-9),
                    "modeled_speedup": run["modeled_speedup"],
                    "test_accuracy": run["test_accuracy"],
                    "accuracy_change_pp": change,
                    "within_tolerance": change >= -tolerance_pp and not run["diverged"],
                    "time_to_accuracy_s": tta,
                    "time_to_accuracy_speedup": (
                        reference_tta / tta if tta and math.isfinite(reference_tta) else None
                    ),
                    "diverged": run["diverged"],
                }
            )
    return rows


def per_task(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task and policy: medians and ranges over seeds (``none`` counted once per
    round, from its first run)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["policy"] == REFERENCE and row["slot"] != 0:
            continue
        groups[(row["task"], row["policy"])].append(row)
    table = []
    for (task, policy), runs in sorted(groups.items()):
        measured = [r["measured_speedup"] for r in runs]
        accuracy = [r["test_accuracy"] for r in runs]
        ttas = [r["time_to_accuracy_s"] for r in runs]
        reached = [t for t in ttas if t is not None]
        table.append(
            {
                "task": task,
                "split": runs[0]["split"],
                "policy": policy,
                "seeds": len(runs),
                "measured_speedup": float(np.median(measured)),
                "measured_min": min(measured),
                "measured_max": max(measured),
                "modeled_speedup": float(np.mean([r["modeled_speedup"] for r in runs])),
                "test_accuracy_mean": float(np.mean(accuracy)),
                "test_accuracy_std": float(np.std(accuracy)),
                "accuracy_change_pp": float(np.mean([r["accuracy_change_pp"] for r in runs])),
                "worst_change_pp": min(r["accuracy_change_pp"] for r in runs),
                "within_tolerance": sum(r["within_tolerance"] for r in runs) / len(runs),
                "time_to_accuracy_s": float(np.median(reached))
                if len(reached) == len(ttas)
                else None,
                "never_reached": len(ttas) - len(reached),
            }
        )
    return table


def per_policy(task_rows: Sequence[dict[str, Any]], tolerance_pp: float) -> list[dict[str, Any]]:
    """One row per policy over tasks: geometric-mean measured speedup, worst accuracy change,
    tasks within tolerance, and its speedup as a fraction of the oracle's where there is one."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in task_rows:
        groups[row["policy"]].append(row)

    def geometric_mean(values: Sequence[float]) -> float:
        return float(np.exp(np.mean(np.log(np.maximum(values, 1e-9)))))

    oracle = groups.get("oracle")
    oracle_mean = geometric_mean([r["measured_speedup"] for r in oracle]) if oracle else None
    summary = []
    for policy, rows in sorted(groups.items()):
        speedup = geometric_mean([r["measured_speedup"] for r in rows])
        summary.append(
            {
                "policy": policy,
                "tasks": len(rows),
                "geomean_measured_speedup": speedup,
                "geomean_modeled_speedup": geometric_mean([r["modeled_speedup"] for r in rows]),
                "worst_change_pp": min(r["worst_change_pp"] for r in rows),
                "tasks_within_tolerance": sum(
                    r["accuracy_change_pp"] >= -tolerance_pp for r in rows
                ),
                "of_oracle": speedup / oracle_mean if oracle_mean else None,
            }
        )
    return sorted(summary, key=lambda r: -r["geomean_measured_speedup"])
