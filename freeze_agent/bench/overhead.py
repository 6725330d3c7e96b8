"""The cost of the signal machinery: training time with all signals against a bare run of the same
seed, interval by interval in alternation (``freeze-agent overhead``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from freeze_agent.signals.observation import has_plasticity
from freeze_agent.tasks.spec import Task
from freeze_agent.tasks.trainer import Trainer


@dataclass
class Overhead:
    """Time of training with every unit in TRAIN, with and without the signal machinery."""

    task: str
    device: str
    intervals: int
    seconds_with_signals: float
    seconds_without: float
    observe_seconds: float  # part of seconds_with_signals spent in observe()
    # intervals whose observation held plasticity: a starved reference worker would make the
    # overhead look small while delivering nothing
    intervals_with_plasticity: int
    reference_waits: int  # observations that waited for a late reference result
    reference_wait_seconds: float  # part of observe_seconds spent in those waits

    @property
    def ratio(self) -> float:
        return self.seconds_with_signals / self.seconds_without

    def to_dict(self) -> dict:
        return {**self.__dict__, "ratio": self.ratio, "overhead_percent": 100 * (self.ratio - 1)}


def measure_overhead(
    task: Task, *, seed: int = 0, intervals: int | None = None, device: str | None = None
) -> Overhead:
    """Train two copies of ``task`` from the same seed, interval by interval in alternation: one
    with all signals (dynamics every step; reference snapshots, plasticity, attention score and
    the observation every interval), one bare. Every unit stays in TRAIN."""
    with_signals = Trainer(task, seed, device=device)
    bare = Trainer(task, seed, device=device, signals=False)
    n = min(intervals or len(range(0, bare.total_steps, bare.interval)), bare.total_steps)
    timed = {"with": 0.0, "without": 0.0, "observe": 0.0}
    with_plasticity = 0
    try:
        for _ in range(n):
            if bare.done:
                break
            started = time.perf_counter()
            observation = with_signals.controller.observe()
            timed["observe"] += time.perf_counter() - started
            with_plasticity += has_plasticity(observation)
            timed["with"] += with_signals.run_interval().seconds
            timed["without"] += bare.run_interval().seconds
        report = with_signals.controller.signal_report()
    finally:
        with_signals.close()
        bare.close()
    return Overhead(
        task=task.name,
        device=str(with_signals.device),
        intervals=n,
        seconds_with_signals=timed["with"] + timed["observe"],
        seconds_without=timed["without"],
        observe_seconds=timed["observe"],
        intervals_with_plasticity=with_plasticity,
        reference_waits=report["reference_waits"],
        reference_wait_seconds=report["reference_wait_seconds"],
    )
