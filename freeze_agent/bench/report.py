"""What ``freeze-agent bench`` writes: ``results.json`` (every run, with its mode timeline),
``results.csv`` (one row per run), ``summary.md`` (the tables) and three PNG plots: measured
speedup against accuracy change, validation accuracy against training time, and each policy's
mode timeline."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from freeze_agent.bench.summary import per_policy, per_run, per_task
from freeze_agent.core.mode_timeline import MODE_COLORS, draw_modes, timeline_matrix
from freeze_agent.core.modes import Mode

PLOTS = ("speedup_vs_accuracy.png", "time_to_accuracy.png", "timelines.png")


def write_report(
    records: Sequence[dict[str, Any]], out: Path, *, tolerance_pp: float, command: str = ""
) -> dict[str, Any]:
    """Write every output into ``out`` and return the tables."""
    out.mkdir(parents=True, exist_ok=True)
    runs = per_run(records, tolerance_pp)
    tasks = per_task(runs)
    policies = per_policy(tasks, tolerance_pp)
    tables = {"tolerance_pp": tolerance_pp, "runs": runs, "tasks": tasks, "policies": policies}
    (out / "results.json").write_text(
        json.dumps({**tables, "records": list(records), "command": command}, indent=1, default=str)
    )
    with (out / "results.csv").open("w", newline="") as handle:
        if runs:
            writer = csv.DictWriter(handle, fieldnames=list(runs[0]))
            writer.writeheader()
            writer.writerows(runs)
    (out / "summary.md").write_text(summary_markdown(tables, command))
    _plot_speedup_vs_accuracy(tasks, tolerance_pp, out / PLOTS[0])
    _plot_time_to_accuracy(records, out / PLOTS[1])
    _plot_timelines(records, out / PLOTS[2])
    return tables


def _number(value: float | None, form: str = "{:.2f}") -> str:
    return "never" if value is None or not math.isfinite(value) else form.format(value)


def summary_markdown(tables: dict[str, Any], command: str = "") -> str:
    tolerance = tables["tolerance_pp"]
    lines = [f"# Benchmark (tolerance {tolerance:g} pp)", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        "| policy | tasks | geomean measured | geomean modeled | worst Δpp | within tolerance "
        "| of oracle |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in tables["policies"]:
        lines.append(
            f"| {row['policy']} | {row['tasks']} | {row['geomean_measured_speedup']:.2f}x "
            f"| {row['geomean_modeled_speedup']:.2f}x | {row['worst_change_pp']:+.2f} "
            f"| {row['tasks_within_tolerance']} of {row['tasks']} "
            f"| {_number(row['of_oracle'], '{:.0%}')} |"
        )
    lines += [
        "",
        "| task | policy | seeds | measured (median, range) | modeled | test acc. | Δpp "
        "| worst Δpp | within tol. | time to acc. (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in tables["tasks"]:
        lines.append(
            f"| {row['task']} | {row['policy']} | {row['seeds']} "
            f"| {row['measured_speedup']:.2f}x ({row['measured_min']:.2f}-"
            f"{row['measured_max']:.2f}) | {row['modeled_speedup']:.2f}x "
            f"| {100 * row['test_accuracy_mean']:.2f} ± {100 * row['test_accuracy_std']:.2f} "
            f"| {row['accuracy_change_pp']:+.2f} | {row['worst_change_pp']:+.2f} "
            f"| {row['within_tolerance']:.0%} | {_number(row['time_to_accuracy_s'], '{:.1f}')} |"
        )
    return "\n".join(lines) + "\n"


def _figure(n_panels: int, width: float = 4.2, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(n_panels, 3)
    rows = max(1, math.ceil(n_panels / columns))
    fig = Figure(figsize=(width * columns, height * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, path: Path, handles: Sequence[Any], labels: Sequence[str]) -> None:
    """One legend for the whole figure, right of the panels, then the PNG."""
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    fig.savefig(path)


def _plot_speedup_vs_accuracy(tasks: Sequence[dict[str, Any]], tolerance_pp: float, path: Path):
    names = sorted({row["task"] for row in tasks})
    policies = sorted({row["policy"] for row in tasks})
    markers = "os^vD<>pPX*h"
    fig, axes = _figure(max(len(names), 1))
    for ax, task in zip(axes, names, strict=False):
        rows = [r for r in tasks if r["task"] == task]
        low = min([-2 * tolerance_pp, *[r["worst_change_pp"] for r in rows]]) - 0.5
        ax.axvspan(
            -tolerance_pp,
            max(1.0, *[r["accuracy_change_pp"] for r in rows]) + 0.5,
            color="0.92",
            zorder=0,
            label=f"within {tolerance_pp:g} pp",
        )
        for row in rows:
            marker = markers[policies.index(row["policy"]) % len(markers)]
            ax.errorbar(
                row["accuracy_change_pp"],
                row["measured_speedup"],
                yerr=[
                    [row["measured_speedup"] - row["measured_min"]],
                    [row["measured_max"] - row["measured_speedup"]],
                ],
                fmt=marker,
                capsize=3,
                label=row["policy"],
            )
        ax.axhline(1.0, color="0.5", lw=0.8)
        ax.set_xlim(left=low)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("test accuracy change vs none (pp)")
        ax.set_ylabel("measured speedup (median, range)")
    _save(fig, path, *axes[0].get_legend_handles_labels())


def _plot_time_to_accuracy(records: Sequence[dict[str, Any]], path: Path) -> None:
    names = sorted({r["task"] for r in records})
    fig, axes = _figure(max(len(names), 1))
    for ax, task in zip(axes, names, strict=False):
        runs = [r for r in records if r["task"] == task and r["slot"] == 0]
        seed = min(r["seed"] for r in runs)
        for run in sorted((r for r in runs if r["seed"] == seed), key=lambda r: r["policy_spec"]):
            if run["curve"]:
                seconds, accuracy = zip(*run["curve"], strict=True)
                ax.plot(seconds, 100 * np.asarray(accuracy), label=run["policy_spec"], lw=1.2)
        ax.set_title(f"{task} (seed {seed})", fontsize=10)
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("validation accuracy (%)")
    _save(fig, path, *axes[0].get_legend_handles_labels())


def _plot_timelines(records: Sequence[dict[str, Any]], path: Path) -> None:
    from matplotlib.patches import Patch

    shown = sorted(
        (r for r in records if r["slot"] == 0 and r["seed"] == min(x["seed"] for x in records)),
        key=lambda r: (r["task"], r["policy_spec"]),
    )
    fig, axes = _figure(max(len(shown), 1), width=3.6, height=2.4)
    for ax, run in zip(axes, shown, strict=False):
        names = [u["name"] for u in run["units"]]
        draw_modes(ax, timeline_matrix(names, [entry["modes"] for entry in run["timeline"]]))
        step = max(1, -(-len(names) // 12))  # at most ~12 unit labels
        ax.set_yticks(range(0, len(names), step), names[::step])
        ax.set_title(f"{run['task']}: {run['policy_spec']}", fontsize=8)
        ax.set_xlabel("decision", fontsize=7)
        ax.set_ylabel("unit", fontsize=7)
        ax.tick_params(labelsize=6)
    _save(fig, path, [Patch(facecolor=MODE_COLORS[m]) for m in Mode], [m.name for m in Mode])
