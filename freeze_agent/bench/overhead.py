"""The cost of the signal machinery (``freeze-agent overhead``): repeated A/B pairs of training
with all signals (A) against a bare copy of the same seed (B).

Two copies of a task train from the same seed, every unit in TRAIN: A with all signals
(dynamics every step; reference snapshot, plasticity, attention score and the observation every
interval), B bare. The first ``warmup`` intervals are the warm-up, outside the pairs: the
reference worker's child starts up then (a fresh interpreter importing torch: a one-off cost
that grows with the machine's load, reported on its own and in no ratio), its first result is
waited for as in a user's loop, and then the job still in flight is, so that the pairs start
clean. From then on each interval is one *pair*: both copies train it, in ``blocks`` blocks
each, interleaved A B B A (B A A B in every other pair), so that drifts of the machine within
the pair and the order itself fall on both copies alike. Only the training is timed: no process
start-up, no data loading or model building.

A's time in a pair is its ``observe()``, its blocks, and after each block the wait for a
reference job still in flight: the child's work is charged to the copy that caused it, never to
B timed next (on two cores it would otherwise land on whichever copy happens to run). B's time
is its blocks. The pair's overhead is A / B - 1; a run reports the median over its pairs, their
quartiles and extremes, and the whole run's ratio (sum over sum). ``measure_overheads`` repeats
the whole A/B; the bound applies to the worst run's median.

What A pays is also broken down (``Overhead.parts``): each part of ``observe()`` and the per-step
dynamics, timed by wrapping those methods on the controller's own signal objects for the run
(about a microsecond a call), and the reference child's CPU time, which competes with training
for the cores. The rest of the difference is training itself running slower beside the signals,
or noise.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from freeze_agent.signals.observation import has_plasticity
from freeze_agent.tasks.spec import Task
from freeze_agent.tasks.trainer import Trainer

BOUND = 0.02
"""The signals may cost at most this fraction of the bare training time: the bound on the median
overhead of every repeat's pairs."""
WARMUP_INTERVALS = 2
"""Intervals trained untimed before the pairs: the first observation requests a reference
snapshot, the second waits for the child's start-up to answer it."""
BLOCKS = 2
"""Blocks each copy trains a pair's interval in (A B B A)."""
SETTLE_TIMEOUT_S = 120.0  # most time to wait for a reference job in flight
BUSY_FACTOR = 1.25
"""A run whose median bare block is this much slower than its fastest was disturbed (by other
jobs on the machine) and says so."""

PARTS = (
    "dynamics per step",
    "dynamics per interval",
    "plasticity: probe forward and SP loss",
    "reference snapshot: quantize and hand off",
    "waits for a late reference result",
    "attention score",
    "observation: the rest",
    "reference job in flight at a block's end",
)
"""The parts of A's time in ``Overhead.parts`` (seconds over the pairs), all in A's process."""
CHILD_CPU = "reference child: CPU time"
"""``Overhead.parts`` entry: the child's CPU seconds over the pairs (Linux; in the background)."""


@dataclass
class Pair:
    """One interval trained by both copies, interleaved."""

    interval: int
    signals_first: bool
    seconds_with_signals: float  # observe(), the blocks and the waits for a job in flight
    seconds_without: float
    observe_seconds: float
    drain_seconds: float  # the waits for a reference job in flight at the end of A's blocks
    step_seconds_without: list[float]  # B's seconds per step in each of its blocks
    parts: dict[str, float] = field(default_factory=dict)  # as Overhead.parts, this pair's

    @property
    def overhead(self) -> float:
        return self.seconds_with_signals / self.seconds_without - 1


@dataclass
class Overhead:
    """Time of training with every unit in TRAIN, with and without the signal machinery, over
    the pairs after the warm-up."""

    task: str
    device: str
    intervals: int  # intervals trained by each copy, warm-up included
    warmup_intervals: int
    blocks: int  # blocks each copy trains an interval in, interleaved A B B A
    seconds_with_signals: float  # over the pairs
    seconds_without: float  # over the pairs
    observe_seconds: float  # part of seconds_with_signals spent in observe()
    # observations (every interval, warm-up included) that held plasticity: a starved
    # reference worker would make the overhead look small while delivering nothing
    intervals_with_plasticity: int
    reference_waits: int  # observations that waited for a late reference result (in the pairs)
    reference_wait_seconds: float  # part of observe_seconds spent in those waits
    warmup_seconds_with_signals: float  # the one-off start-up, not in any ratio
    warmup_settle_seconds: float  # then the wait for the job in flight, before the pairs
    warmup_seconds_without: float
    warmup_reference_waits: int
    warmup_reference_wait_seconds: float
    pairs: list[Pair] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)  # seconds over the pairs

    @property
    def ratio(self) -> float:
        """The whole run's ratio: all of A's time over all of B's, pairs only."""
        return self.seconds_with_signals / self.seconds_without

    @property
    def overheads(self) -> list[float]:
        return [pair.overhead for pair in self.pairs]

    @property
    def median(self) -> float:
        """The median overhead of the pairs (a fraction: 0.01 is 1%)."""
        return statistics.median(self.overheads)

    @property
    def quartiles(self) -> tuple[float, float]:
        q1, q3 = np.percentile(self.overheads, [25, 75])
        return float(q1), float(q3)

    @property
    def extremes(self) -> tuple[float, float]:
        return min(self.overheads), max(self.overheads)

    @property
    def busy(self) -> float:
        """How much slower B's median block ran than its fastest, per step (1.0: steady)."""
        blocks = [seconds for pair in self.pairs for seconds in pair.step_seconds_without]
        return statistics.median(blocks) / min(blocks)

    def to_dict(self) -> dict[str, Any]:
        q1, q3 = self.quartiles
        low, high = self.extremes
        return {
            **asdict(self),
            "pairs": [{**asdict(p), "overhead": p.overhead} for p in self.pairs],
            "n_pairs": len(self.pairs),
            "ratio": self.ratio,
            "overhead_percent": 100 * (self.ratio - 1),
            "median_percent": 100 * self.median,
            "q1_percent": 100 * q1,
            "q3_percent": 100 * q3,
            "min_percent": 100 * low,
            "max_percent": 100 * high,
            "busy": self.busy,
        }


@dataclass
class Overheads:
    """``repeats`` runs of the whole A/B; the bound applies to the worst run's median."""

    runs: list[Overhead]
    bound: float = BOUND

    @property
    def medians(self) -> list[float]:
        return [run.median for run in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.medians)

    @property
    def worst(self) -> float:
        return max(self.medians)

    @property
    def meets_bound(self) -> bool:
        return self.worst <= self.bound

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.runs[0].task,
            "repeats": len(self.runs),
            "bound_percent": 100 * self.bound,
            "median_percent": 100 * self.median,
            "worst_percent": 100 * self.worst,
            "meets_bound": self.meets_bound,
            "runs": [run.to_dict() for run in self.runs],
        }


def measure_overheads(
    task: Task,
    *,
    repeats: int = 1,
    on_run: Callable[[Overhead], None] | None = None,
    **options: Any,
) -> Overheads:
    """The whole A/B of ``measure_overhead`` (same ``options``, same seed) ``repeats`` times."""
    runs = []
    for _ in range(repeats):
        runs.append(measure_overhead(task, **options))
        if on_run is not None:
            on_run(runs[-1])
    return Overheads(runs)


def measure_overhead(
    task: Task,
    *,
    seed: int = 0,
    intervals: int | None = None,
    warmup: int = WARMUP_INTERVALS,
    blocks: int = BLOCKS,
    device: str | None = None,
    signals: bool = True,
) -> Overhead:
    """Train two copies of ``task`` from the same seed, one with all signals and one bare, for
    ``intervals`` intervals (default: the whole run): ``warmup`` of them untimed, then one A/B
    pair per interval (see the module's docstring). Every unit stays in TRAIN. With
    ``signals=False`` both copies are bare: an A/A control, the noise floor of the machine."""
    if warmup < 0 or blocks < 1:
        raise ValueError(f"need warmup >= 0 and blocks >= 1, got {warmup} and {blocks}")
    if intervals is not None and intervals <= warmup:
        raise ValueError(_no_pair(intervals, warmup))
    with_signals = Trainer(task, seed, device=device, signals=signals)
    bare = Trainer(task, seed, device=device, signals=False)
    try:
        n = len(range(0, bare.total_steps, bare.interval))
        n = min(intervals or n, n)
        if n <= warmup:
            raise ValueError(_no_pair(n, warmup))
        return _measure(with_signals, bare, n, warmup, blocks)
    finally:
        with_signals.close()
        bare.close()


def _no_pair(intervals: int, warmup: int) -> str:
    return (
        f"{intervals} intervals leave no A/B pair after a warm-up of {warmup}: "
        "ask for more intervals or a shorter warm-up"
    )


def _measure(with_signals: Trainer, bare: Trainer, n: int, warmup: int, blocks: int) -> Overhead:
    controller = with_signals.controller
    with_plasticity = 0

    def observe() -> float:
        nonlocal with_plasticity
        started = time.perf_counter()
        with_plasticity += has_plasticity(controller.observe())
        return time.perf_counter() - started

    def signalled(steps: int) -> tuple[float, float]:
        """Train ``steps``, then wait for a reference job still in flight: (total, wait)."""
        started = time.perf_counter()
        _train(with_signals, steps)
        trained = time.perf_counter()
        _wait_until_idle(with_signals)
        ended = time.perf_counter()
        return ended - started, ended - trained

    warmup_with = warmup_without = 0.0
    for _ in range(warmup):  # as in a user's loop: a late first result is waited for, and counted
        steps = _steps_left_in_interval(bare)
        warmup_with += observe() + _train(with_signals, steps)
        warmup_without += _train(bare, steps)
    warmup_waits, warmup_wait_seconds = _waits(with_signals)
    started = time.perf_counter()
    _wait_until_idle(with_signals)  # the pairs start with no job in flight
    settle = time.perf_counter() - started
    pairs = []
    timer = _PartTimer(with_signals)
    try:
        for i in range(warmup, n):
            if bare.done:
                break
            signals_first = (i - warmup) % 2 == 0
            before = timer.read()
            observe_seconds = with_seconds = without = drain = 0.0
            per_step = []  # B's seconds per step in each block
            for k, steps in enumerate(_split(_steps_left_in_interval(bare), blocks)):
                for signalled_now in _block_order(k, signals_first):
                    if not signalled_now:
                        seconds = _train(bare, steps)
                        without += seconds
                        per_step.append(seconds / steps)
                        continue
                    if k == 0:  # the interval's observation precedes its first block
                        observe_seconds = observe()
                    seconds, waited = signalled(steps)
                    with_seconds, drain = with_seconds + seconds, drain + waited
            pairs.append(
                Pair(
                    interval=i,
                    signals_first=signals_first,
                    seconds_with_signals=observe_seconds + with_seconds,
                    seconds_without=without,
                    observe_seconds=observe_seconds,
                    drain_seconds=drain,
                    step_seconds_without=per_step,
                    parts=_minus(timer.read(), before) | {PARTS[-1]: drain},
                )
            )
        parts = timer.read()
    finally:
        timer.close()
    waits, wait_seconds = _waits(with_signals)
    return Overhead(
        task=with_signals.task.name,
        device=str(with_signals.device),
        intervals=warmup + len(pairs),
        warmup_intervals=warmup,
        blocks=blocks,
        seconds_with_signals=sum(p.seconds_with_signals for p in pairs),
        seconds_without=sum(p.seconds_without for p in pairs),
        observe_seconds=sum(p.observe_seconds for p in pairs),
        intervals_with_plasticity=with_plasticity,
        reference_waits=waits - warmup_waits,
        reference_wait_seconds=wait_seconds - warmup_wait_seconds,
        warmup_seconds_with_signals=warmup_with,
        warmup_settle_seconds=settle,
        warmup_seconds_without=warmup_without,
        warmup_reference_waits=warmup_waits,
        warmup_reference_wait_seconds=warmup_wait_seconds,
        pairs=pairs,
        parts={**parts, PARTS[-1]: sum(p.drain_seconds for p in pairs)},
    )


def _minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: seconds - before.get(name, 0.0) for name, seconds in after.items()}


def _block_order(k: int, signals_first: bool) -> tuple[bool, bool]:
    """Who trains block ``k`` of a pair first (True: A): A B, B A, A B, ... when A starts the
    pair, B A, A B, ... when B does."""
    return (True, False) if (k % 2 == 0) == signals_first else (False, True)


def _steps_left_in_interval(trainer: Trainer) -> int:
    return min(trainer.interval, trainer.total_steps - trainer.step)


def _split(steps: int, parts: int) -> list[int]:
    """``steps`` in ``parts`` blocks as even as possible (fewer blocks when there are fewer
    steps)."""
    parts = max(1, min(parts, steps))
    return [steps // parts + (k < steps % parts) for k in range(parts)]


def _train(trainer: Trainer, steps: int) -> float:
    """Train the next ``steps`` optimizer steps (within one decision interval): seconds."""
    interval = trainer.interval
    trainer.interval = steps  # run_interval trains this many; the controller does not see it
    try:
        started = time.perf_counter()
        trainer.run_interval()
        return time.perf_counter() - started
    finally:
        trainer.interval = interval


def _waits(trainer: Trainer) -> tuple[int, float]:
    report = trainer.controller.signal_report()
    return int(report["reference_waits"]), float(report["reference_wait_seconds"])


def _wait_until_idle(trainer: Trainer, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Block while the reference worker has a job in flight. Its result stays for the next
    check to take, so the observations are the same as without the wait."""
    monitor = trainer.controller.plasticity
    if monitor is None:
        return
    deadline = time.monotonic() + timeout_s
    while monitor.worker.status == "busy" and time.monotonic() < deadline:
        time.sleep(0.0005)


class _PartTimer:
    """Seconds spent in each part of the signal machinery (``PARTS`` but the last), by wrapping
    the methods the controller calls on its own signal objects, until ``close``."""

    SUBMIT, WAIT = PARTS[3], PARTS[4]

    def __init__(self, trainer: Trainer) -> None:
        controller = trainer.controller
        self._seconds: dict[str, float] = {}
        self._wrapped: list[tuple[object, str]] = []
        monitor = controller.plasticity
        self.worker = monitor.worker if monitor is not None else None
        self._wrap("observe", controller, "observe")
        self._wrap(PARTS[0], controller.dynamics, "after_step")
        self._wrap(PARTS[1], controller.dynamics, "end_interval")
        self._wrap("plasticity check", monitor, "check")
        self._wrap(self.SUBMIT, self.worker, "submit")
        self._wrap(self.WAIT, self.worker, "wait")
        self._wrap(PARTS[5], controller.attention, "check")
        self.child = self.worker.pid if self.worker is not None else None
        self._child_cpu = _cpu_seconds(self.child)

    def _wrap(self, name: str, owner: object | None, method: str) -> None:
        if owner is None:
            return
        inner = getattr(owner, method)
        seconds = self._seconds
        seconds[name] = 0.0

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - started

        setattr(owner, method, timed)
        self._wrapped.append((owner, method))

    def read(self) -> dict[str, float]:
        """The parts so far: the ``PARTS`` measured (but the last) and, where the child can be
        read (Linux), ``CHILD_CPU``."""
        seconds = dict(self._seconds)
        observe, check = seconds.pop("observe", 0.0), seconds.pop("plasticity check", None)
        if check is not None:
            seconds[PARTS[2]] = check - seconds[self.SUBMIT] - seconds[self.WAIT]
        inside = sum(seconds.get(name, 0.0) for name in (PARTS[1], PARTS[5]))
        seconds[PARTS[6]] = observe - (check or 0.0) - inside
        out = {name: seconds[name] for name in PARTS if name in seconds}
        same_child = self.worker is not None and self.worker.pid == self.child  # no restart
        now = _cpu_seconds(self.child) if same_child else None
        if self._child_cpu is not None and now is not None:
            out[CHILD_CPU] = now - self._child_cpu
        return out

    def close(self) -> None:
        for owner, method in self._wrapped:
            delattr(owner, method)  # the class's method shows through again
        self._wrapped = []


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; None elsewhere)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
