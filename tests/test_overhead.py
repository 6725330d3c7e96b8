"""``freeze_agent.bench.overhead``: the A/B pairs (order, warm-up, what each side is charged),
their statistics and repeats, on fake trainers with a fake clock; the real thing runs in
tests/test_cli.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from freeze_agent.bench import overhead
from freeze_agent.bench.overhead import Overhead, Overheads, Pair, _block_order, _split


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    monotonic = perf_counter

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeController:
    plasticity = dynamics = attention = None

    def __init__(self, trainer: FakeTrainer) -> None:
        self.trainer = trainer

    def observe(self) -> dict:
        self.trainer.log.append(("observe", self.trainer.name))
        self.trainer.clock.now += self.trainer.observe_seconds
        return {"units": np.zeros((1, 40), np.float32), "mask": np.ones(1, np.int8)}

    def signal_report(self) -> dict:
        return {"reference_waits": 0, "reference_wait_seconds": 0.0}


class FakeTrainer:
    """``interval`` steps per interval, each costing ``step_seconds`` on the shared clock."""

    def __init__(
        self, name, log, clock, *, step_seconds, observe_seconds=0.0, total=40, interval=8
    ):
        self.name, self.log, self.clock = name, log, clock
        self.step_seconds, self.observe_seconds = step_seconds, observe_seconds
        self.total_steps, self.interval, self.step = total, interval, 0
        self.controller = FakeController(self)
        self.task = type("Task", (), {"name": "fake"})()
        self.device = "cpu"

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def run_interval(self) -> None:
        steps = min(self.interval, self.total_steps - self.step)
        self.log.append((self.name, steps))
        self.step += steps
        self.clock.now += steps * self.step_seconds


@pytest.fixture
def fakes(monkeypatch):
    clock, log = FakeClock(), []
    monkeypatch.setattr(overhead, "time", clock)
    signalled = FakeTrainer("A", log, clock, step_seconds=1.1, observe_seconds=0.4)
    bare = FakeTrainer("B", log, clock, step_seconds=1.0)
    return signalled, bare, log


def test_pairs_interleave_a_b_b_a_then_b_a_a_b_after_an_untimed_warm_up(fakes):
    signalled, bare, log = fakes
    result = overhead._measure(signalled, bare, n=5, warmup=1, blocks=2)
    assert [p.interval for p in result.pairs] == [1, 2, 3, 4]
    assert [p.signals_first for p in result.pairs] == [True, False, True, False]
    warmup, pairs = log[:3], log[3:]
    assert warmup == [("observe", "A"), ("A", 8), ("B", 8)]
    first, second = pairs[:5], pairs[5:10]
    assert first == [("observe", "A"), ("A", 4), ("B", 4), ("B", 4), ("A", 4)]
    assert second == [("B", 4), ("observe", "A"), ("A", 4), ("A", 4), ("B", 4)]
    assert signalled.step == bare.step == 40  # both trained every step, none twice


def test_each_pair_charges_observe_to_the_signalled_copy_and_keeps_warm_up_apart(fakes):
    signalled, bare, _ = fakes
    result = overhead._measure(signalled, bare, n=5, warmup=1, blocks=2)
    for pair in result.pairs:
        assert pair.seconds_without == pytest.approx(8.0)
        assert pair.seconds_with_signals == pytest.approx(8 * 1.1 + 0.4)
        assert pair.observe_seconds == pytest.approx(0.4)
        assert pair.step_seconds_without == pytest.approx([1.0, 1.0])
    assert result.median == pytest.approx(9.2 / 8 - 1)
    assert result.ratio == pytest.approx(9.2 / 8)
    assert result.seconds_without == pytest.approx(32.0)  # 4 pairs; the warm-up is apart
    assert result.warmup_seconds_with_signals == pytest.approx(9.2)
    assert result.warmup_seconds_without == pytest.approx(8.0)
    assert result.intervals == 5 and result.busy == pytest.approx(1.0)


def test_a_short_last_interval_is_split_too_and_a_block_never_has_zero_steps(fakes):
    signalled, bare, log = fakes
    signalled.total_steps = bare.total_steps = 35  # intervals of 8, 8, 8, 8, 3
    result = overhead._measure(signalled, bare, n=5, warmup=0, blocks=4)
    assert len(result.pairs) == 5
    assert [steps for who, steps in log if who == "B"][-3:] == [1, 1, 1]
    assert all(steps > 0 for who, steps in log if who in ("A", "B"))


@pytest.mark.parametrize(("steps", "parts"), [(32, 2), (33, 4), (3, 4), (1, 1), (7, 3)])
def test_split_is_even_and_covers_every_step(steps, parts):
    blocks = _split(steps, parts)
    assert sum(blocks) == steps and max(blocks) - min(blocks) <= 1
    assert len(blocks) == min(steps, parts)


def test_block_order_alternates_within_and_across_pairs():
    a_first = [_block_order(k, signals_first=True) for k in range(3)]
    assert a_first == [(True, False), (False, True), (True, False)]  # A B, B A, A B
    b_first = [_block_order(k, signals_first=False) for k in range(3)]
    assert b_first == [(False, True), (True, False), (False, True)]  # B A, A B, B A


def _run(overheads: list[float]) -> Overhead:
    pairs = [Pair(i, i % 2 == 0, 1.0 + x, 1.0, 0.0, 0.0, [1.0]) for i, x in enumerate(overheads)]
    values = {f.name: 0 for f in dataclasses.fields(Overhead) if f.name not in ("pairs", "parts")}
    values.update(task="fake", device="cpu", intervals=len(pairs), blocks=1)
    values.update(seconds_with_signals=sum(p.seconds_with_signals for p in pairs))
    return Overhead(**{**values, "seconds_without": float(len(pairs))}, pairs=pairs)


def test_repeats_take_the_worst_runs_median_against_the_bound():
    runs = Overheads([_run([0.01, 0.012, 0.013]), _run([0.019, 0.025, 0.015]), _run([0.0] * 3)])
    assert runs.medians == pytest.approx([0.012, 0.019, 0.0])
    assert runs.worst == pytest.approx(0.019) and runs.median == pytest.approx(0.012)
    assert runs.meets_bound
    assert not Overheads([_run([0.03, 0.021, 0.01])]).meets_bound
    payload = runs.to_dict()
    assert payload["worst_percent"] == pytest.approx(1.9) and payload["repeats"] == 3
    assert payload["runs"][1]["max_percent"] == pytest.approx(2.5)


def test_too_few_intervals_for_a_pair_is_refused(tiny_task):
    with pytest.raises(ValueError, match="no A/B pair"):
        overhead.measure_overhead(tiny_task, intervals=2, warmup=2)
