"""``freeze-agent bench``: policies side by side on the same tasks, seeds and data order.

Every (task, seed) is a *round*: ``none`` runs first and last and the other policies in between
in a shuffled order (fixed by the task and seed, so a rerun plays the same order). Measured
speedups are training-time ratios against the mean of the round's two ``none`` runs, so a
change of machine load during the round cancels. One warm-up run per process comes before
anything is timed. Each finished run is stored in ``OUT/runs/``; running the same command again
after an interruption skips them and does only the missing ones. The oracle's schedule is
searched once per task (``freeze_agent.bench.oracle``) before its runs and kept in
``OUT/oracle/``.

Each run measures only the signals its policy reads (``Policy.reads_signals``), as
``FreezeController.from_pretrained`` deploys it: ``none`` and the fixed schedules train bare,
so a measured speedup includes what the signals cost the policies that need them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freeze_agent.bench.oracle import oracle_policy, search_oracle
from freeze_agent.bench.runs import train_under
from freeze_agent.policies.base import Policy
from freeze_agent.policies.registry import make_policy
from freeze_agent.policies.schedules import NoFreeze
from freeze_agent.tasks.spec import Task, TaskSource, resolve_tasks
from freeze_agent.tasks.trainer import Trainer

REFERENCE = "none"
ORACLE = "oracle"


@dataclass(frozen=True)
class PlannedRun:
    """One run of a round: ``slot`` tells the round's first and last ``none`` apart."""

    task: Task
    seed: int
    policy: str
    slot: int = 0

    @property
    def key(self) -> str:
        safe = self.policy.replace("/", "_").replace(":", "~")
        return f"{self.task.name}-{self.task.fingerprint()}/seed{self.seed}/{safe}-{self.slot}"


@dataclass
class Bench:
    """What to bench and where the results go (see the module docstring).

    Args:
        tasks: task names, YAML paths, folders or split names.
        policies: policy specs (``make_policy``); ``none`` is always run, first and last.
        seeds: training seeds, one round per task and seed.
        out: the results folder (``runs/`` inside it holds one JSON file per finished run).
        epochs: override every task's budget (quick benches, tests).
        tolerance_pp: accuracy loss (percentage points) still counted as no loss.
    """

    tasks: Sequence[TaskSource]
    policies: Sequence[str]
    seeds: Sequence[int]
    out: Path
    epochs: int | None = None
    tolerance_pp: float = 0.5
    resolved: list[Task] = field(init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.resolved = resolve_tasks(list(self.tasks))
        self.policies = [p for p in dict.fromkeys(self.policies) if p != REFERENCE]
        for spec in self.policies:
            if spec != ORACLE:
                make_policy(spec)  # refuse a typo before hours of runs
        if not self.seeds or min(self.seeds) < 0:
            raise ValueError(f"seeds must be one or more integers >= 0, got {list(self.seeds)}")

    def plan(self) -> list[PlannedRun]:
        """Every run of the bench, round by round, in the order they are played."""
        runs = []
        for task in self.resolved:
            for seed in self.seeds:
                middle = list(self.policies)
                digest = hashlib.sha256(f"{task.fingerprint()}-{seed}".encode()).digest()
                random.Random(digest).shuffle(middle)
                runs.append(PlannedRun(task, seed, REFERENCE, 0))
                runs.extend(PlannedRun(task, seed, spec) for spec in middle)
                runs.append(PlannedRun(task, seed, REFERENCE, 1))
        return runs

    def path_of(self, run: PlannedRun) -> Path:
        return self.out / "runs" / f"{run.key}.json"

    def finished(self) -> list[dict[str, Any]]:
        """The records of the planned runs already stored."""
        return [
            json.loads(self.path_of(r).read_text())
            for r in self.plan()
            if self.path_of(r).is_file()
        ]

    def run(self, on_run: Callable[[PlannedRun, bool], None] | None = None) -> list[dict[str, Any]]:
        """Play every missing run and return every run's record; ``on_run(run, skipped)`` after
        each (a progress bar)."""
        missing = [r for r in self.plan() if not self.path_of(r).is_file()]
        if missing:
            _warm_up(missing[0].task, self.epochs)
        oracles: dict[str, Policy] = {}
        for planned in self.plan():
            path = self.path_of(planned)
            if path.is_file():
                if on_run is not None:
                    on_run(planned, True)
                continue
            policy = self._policy(planned, oracles)
            record = train_under(
                planned.task,
                planned.seed,
                policy,
                epochs=self.epochs,
                signals=policy.reads_signals,
            )
            record.update(policy_spec=planned.policy, slot=planned.slot, split=planned.task.split)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".partial")
            temporary.write_text(json.dumps(record, default=str))
            temporary.replace(path)  # a run is stored whole or not at all
            if on_run is not None:
                on_run(planned, False)
        return self.finished()

    def _policy(self, planned: PlannedRun, oracles: dict[str, Policy]) -> Policy:
        if planned.policy == REFERENCE:
            return NoFreeze()
        if planned.policy != ORACLE:
            return make_policy(planned.policy)
        if planned.task.name not in oracles:
            found = search_oracle(
                planned.task,
                tolerance_pp=self.tolerance_pp,
                epochs=self.epochs,
                cache=self.out / "oracle",  # with the runs: a resumed bench finds it there
            )
            oracles[planned.task.name] = oracle_policy(found)
        return oracles[planned.task.name]


def _warm_up(task: Task, epochs: int | None, intervals: int = 3) -> None:
    """A few untimed intervals of ``task``: imports, allocator, data and the reference worker's
    child warm up before the first timed run."""
    trainer = Trainer(task, 0, epochs=1 if epochs is None else min(epochs, 1))
    try:
        for _ in range(intervals):
            if trainer.done:
                break
            trainer.controller.observe()
            trainer.run_interval()
    finally:
        trainer.close()
