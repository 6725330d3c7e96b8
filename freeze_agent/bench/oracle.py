"""The oracle's search: the hindsight-best linear frozen-prefix schedule of one task.

Every (start, end) pair of a coarse grid is trained on seed 0, next to no freezing; the oracle
is the pair with the highest modeled speedup whose final validation accuracy stays within the
tolerance of no freezing's. It knows how the task's training turns out, so it is an upper
reference for what a static prefix schedule can save there, not a deployable policy. Results
are cached per task spec (its content, not its name), budget and tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from freeze_agent.bench.runs import train_under
from freeze_agent.policies.oracle import Oracle
from freeze_agent.policies.schedules import NoFreeze
from freeze_agent.tasks.data import cache_dir
from freeze_agent.tasks.spec import Task

STARTS = (0.1, 0.3, 0.5, 0.7)
ENDS = (0.5, 0.75, 1.0)
SEARCH_SEED = 0


def grid(
    starts: Sequence[float] = STARTS, ends: Sequence[float] = ENDS
) -> list[tuple[float, float]]:
    return [(s, e) for s in starts for e in ends if s < e]


def search_oracle(
    task: Task,
    *,
    tolerance_pp: float = 0.5,
    epochs: int | None = None,
    starts: Sequence[float] = STARTS,
    ends: Sequence[float] = ENDS,
    cache: Path | None = None,
) -> dict[str, Any]:
    """The oracle's (start, end) for ``task`` and the search behind it (cached: see the module
    docstring). ``start`` is None when no pair keeps the accuracy: then the oracle is no
    freezing."""
    pairs = grid(starts, ends)
    key = f"{task.name}-{task.fingerprint()}-e{epochs or task.epochs}-t{tolerance_pp:g}"
    path = (cache or cache_dir() / "oracle") / f"{key}-{len(pairs)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    reference = train_under(task, SEARCH_SEED, NoFreeze(), epochs=epochs, signals=False)
    floor = reference["val_accuracy"] - tolerance_pp / 100
    candidates = []
    for start, end in pairs:
        run = train_under(
            task, SEARCH_SEED, Oracle(start, end), epochs=epochs, signals=False, curve=False
        )
        candidates.append(
            {
                "start": start,
                "end": end,
                "modeled_speedup": run["modeled_speedup"],
                "val_accuracy": run["val_accuracy"],
                "within_tolerance": run["val_accuracy"] >= floor and not run["diverged"],
            }
        )
    allowed = [c for c in candidates if c["within_tolerance"]]
    best = max(allowed, key=lambda c: c["modeled_speedup"], default=None)
    found = {
        "task": task.name,
        "seed": SEARCH_SEED,
        "tolerance_pp": tolerance_pp,
        "reference_val_accuracy": reference["val_accuracy"],
        "start": None if best is None else best["start"],
        "end": None if best is None else best["end"],
        "candidates": candidates,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(found, indent=2))
    return found


def oracle_policy(found: dict[str, Any]) -> Oracle | NoFreeze:
    if found["start"] is None:
        return NoFreeze()
    return Oracle(found["start"], found["end"])
