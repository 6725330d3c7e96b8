"""Trainer, policies and the CLI on a tiny real task."""

from __future__ import annotations

import pytest
import torch

from freeze_agent import LinearPrefix, Mode, NoFreeze, Trainer, list_tasks, load_task, make_policy
from freeze_agent.tasks.data import DatasetUnavailableError


def test_same_seed_same_decisions_same_losses(tiny_task):
    runs = [Trainer(tiny_task, seed=3).run(LinearPrefix(0.3)) for _ in range(2)]
    assert runs[0].losses == runs[1].losses
    other = Trainer(tiny_task, seed=4).run(LinearPrefix(0.3))
    assert other.losses != runs[0].losses


def test_run_reports_modes_cost_and_accuracy(tiny_task):
    trainer = Trainer(tiny_task, seed=0)
    result = trainer.run(LinearPrefix(0.0))
    n = len(trainer.units)
    assert result.steps == trainer.total_steps == 2 * (384 // 32)
    assert len(result.timeline) == 6
    assert result.timeline[0]["modes"] == "T" * n
    assert result.timeline[-1]["modes"].startswith("F") and result.timeline[-1]["modes"][-1] == "T"
    assert 0 < result.modeled_cost_ratio < 1
    assert 0 <= result.test_accuracy <= 1 and 0 <= result.val_accuracy <= 1
    full = Trainer(tiny_task, seed=0).run(NoFreeze())
    assert full.modeled_cost_ratio == 1.0 and full.val_accuracy > 0.3  # it learns (chance is 0.1)
    assert full.losses[:4] == result.losses[:4]  # identical until the first freeze (step 4)


def test_run_interval_applies_modes_and_stops_at_budget(tiny_task):
    trainer = Trainer(tiny_task, seed=0)
    n = len(trainer.units)
    report = trainer.run_interval([Mode.FROZEN] * n)
    assert report.modes == [Mode.FROZEN] * (n - 1) + [Mode.TRAIN]
    assert report.steps == trainer.interval and report.finite
    while not trainer.done:
        trainer.run_interval()
    with pytest.raises(RuntimeError, match="budget is spent"):
        trainer.run_interval()


def test_non_finite_loss_ends_the_run(tiny_task):
    trainer = Trainer(tiny_task, seed=0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.fill_(float("nan"))
    report = trainer.run_interval()
    assert not report.finite and trainer.diverged and trainer.done


def test_linear_prefix_schedule():
    policy = LinearPrefix(0.5)
    assert [policy.frozen_count(p, 5) for p in (0.0, 0.49, 0.5, 0.6, 0.75, 1.0)] == [
        0,
        0,
        0,
        1,
        2,
        4,
    ]
    assert make_policy("linear-prefix:0.2").start == 0.2
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("egeria-ish")
    with pytest.raises(ValueError, match="start must be"):
        LinearPrefix(1.5)


@pytest.mark.slow
@pytest.mark.parametrize("task", [t.name for t in list_tasks()])
def test_every_shipped_task_trains_under_each_mode(task):
    """Each task's data loads, its model partitions, and it trains in TRAIN, LOCAL and FROZEN."""
    try:
        trainer = Trainer(load_task(task), seed=0, epochs=1, decisions=40)
    except (ImportError, DatasetUnavailableError) as error:
        pytest.skip(f"optional data or model not installed: {error}")
    units = trainer.units
    local = [Mode.LOCAL if u.supports_local else Mode.FROZEN for u in units]
    for modes in ([Mode.TRAIN] * len(units), local, [Mode.FROZEN] * len(units)):
        report = trainer.run_interval(modes)
        assert report.finite and report.steps >= 1
    assert trainer.controller.modes[-1] is Mode.TRAIN
    assert 0 <= trainer.evaluate("val")[1] <= 1


def test_cache_hits_lower_the_modeled_cost_and_keep_the_losses(tiny_task):
    runs = {}
    for cache in (False, True):
        trainer = Trainer(tiny_task, seed=0, cache=cache, signals=False)
        n = len(trainer.units)
        modes = [Mode.FROZEN] * (n - 1) + [Mode.TRAIN]
        while not trainer.done:
            trainer.run_interval(modes)
        runs[cache] = trainer
    assert runs[True].cache.hits > 0 and runs[False].cache.hits == 0
    torch.testing.assert_close(runs[True].losses, runs[False].losses)
    assert sum(runs[True].step_costs) < sum(runs[False].step_costs)


@pytest.mark.parametrize(
    "options", [{"epochs": 0}, {"epochs": -1}, {"decisions": 0}, {"seed": -1}, {"max_units": 0}]
)
def test_zero_or_negative_budgets_and_seeds_are_refused(tiny_task, options):
    name = next(iter(options))
    with pytest.raises(ValueError, match=f"{name} must be an integer >= "):
        Trainer(tiny_task, **options)
