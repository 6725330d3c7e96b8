"""The benchmark on a tiny task: interleaved rounds, stored runs that a rerun skips, the outputs,
and the oracle's search."""

from __future__ import annotations

import csv
import json

import pytest

from freeze_agent.bench import oracle as oracle_search
from freeze_agent.bench.benchmark import Bench
from freeze_agent.bench.report import PLOTS, write_report
from freeze_agent.bench.summary import time_to_accuracy
from freeze_agent.cli import main


def test_a_round_runs_none_first_and_last_with_the_others_shuffled_in_between(tiny_task, tmp_path):
    bench = Bench(
        [tiny_task.path], ["none", "linear:0.2", "freezeout", "autofreeze"], [0, 1], tmp_path
    )
    plan = bench.plan()
    assert len(plan) == 2 * 5
    for round_ in (plan[:5], plan[5:]):
        assert [r.policy for r in (round_[0], round_[-1])] == ["none", "none"]
        assert sorted(r.policy for r in round_[1:-1]) == ["autofreeze", "freezeout", "linear:0.2"]
    assert plan == bench.plan()  # the same order on every rerun


@pytest.mark.slow
def test_the_bench_writes_its_outputs_and_a_rerun_skips_finished_runs(tiny_task, tmp_path):
    out = tmp_path / "bench"
    argv = ["bench", "--tasks", str(tiny_task.path), "--policies", "linear:0.2,autofreeze"]
    assert main([*argv, "--seeds", "0", "--out", str(out)]) == 0
    stored = sorted((out / "runs").rglob("*.json"))
    assert len(stored) == 4  # none, two policies, none
    results = json.loads((out / "results.json").read_text())
    assert {r["policy_spec"] for r in results["records"]} == {"none", "linear:0.2", "autofreeze"}
    # each run pays for the signals its policy reads, and only those: the fixed schedules and
    # the reference train bare, AutoFreeze measures them (the reference worker included)
    plasticity = {r["policy_spec"]: r["signals"]["plasticity_fraction"] for r in results["records"]}
    assert plasticity["none"] == plasticity["linear:0.2"] == 0
    assert plasticity["autofreeze"] > 0
    assert all(r["timeline"] and r["curve"] for r in results["records"])
    linear = next(r for r in results["tasks"] if r["policy"] == "linear:0.2")
    assert linear["modeled_speedup"] > 1.0 and linear["seeds"] == 1
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert "| linear:0.2 |" in (out / "summary.md").read_text()
    assert all((out / plot).stat().st_size > 10_000 for plot in PLOTS)

    stamps = {path: path.stat().st_mtime_ns for path in stored}
    killed = stored[1]
    killed.unlink()  # as if the run had been cut off
    assert main([*argv, "--seeds", "0", "--out", str(out)]) == 0
    assert killed.is_file()
    assert all(path.stat().st_mtime_ns == stamps[path] for path in stored if path != killed)


def test_time_to_accuracy_is_the_first_time_the_target_is_reached():
    curve = [(1.0, 0.5), (2.0, 0.79), (3.0, 0.81), (4.0, 0.9)]
    assert time_to_accuracy(curve, 0.8) == 3.0
    assert time_to_accuracy(curve, 0.95) is None


def test_the_report_compares_each_run_with_its_rounds_none_runs(tmp_path):
    def record(policy, slot, seconds, test, val, curve):
        return {
            "task": "t",
            "seed": 0,
            "policy_spec": policy,
            "slot": slot,
            "wall_time": seconds,
            "modeled_speedup": 1.0 if policy == "none" else 2.0,
            "test_accuracy": test,
            "val_accuracy": val,
            "diverged": False,
            "curve": curve,
            "split": "custom",
            "timeline": [{"modes": "TT"}],
            "units": [{"name": "a"}, {"name": "head"}],
        }

    records = [
        record("none", 0, 10.0, 0.90, 0.90, [(5.0, 0.85), (10.0, 0.90)]),
        record("none", 1, 12.0, 0.90, 0.90, [(6.0, 0.86), (12.0, 0.90)]),
        record("fast", 0, 5.5, 0.88, 0.89, [(2.0, 0.80), (5.5, 0.89)]),
    ]
    tables = write_report(records, tmp_path, tolerance_pp=1.0)
    fast = next(r for r in tables["runs"] if r["policy"] == "fast")
    assert fast["measured_speedup"] == pytest.approx(11.0 / 5.5)
    assert fast["accuracy_change_pp"] == pytest.approx(-2.0)
    assert fast["within_tolerance"] is False
    assert fast["time_to_accuracy_s"] == 5.5  # first at >= 0.90 - 0.01
    (summary,) = [r for r in tables["policies"] if r["policy"] == "fast"]
    assert summary["geomean_measured_speedup"] == pytest.approx(2.0)


@pytest.mark.slow
def test_the_oracle_keeps_the_fastest_schedule_within_the_tolerance(tiny_task, tmp_path):
    found = oracle_search.search_oracle(
        tiny_task, tolerance_pp=50.0, starts=(0.2, 0.6), ends=(1.0,), cache=tmp_path
    )
    candidates = found["candidates"]
    assert [(c["start"], c["end"]) for c in candidates] == [(0.2, 1.0), (0.6, 1.0)]
    allowed = [c for c in candidates if c["within_tolerance"]]
    assert allowed, "with a 50 pp tolerance some schedule keeps the accuracy"
    chosen = next(c for c in candidates if (c["start"], c["end"]) == (found["start"], found["end"]))
    assert chosen["within_tolerance"]
    assert all(chosen["modeled_speedup"] >= c["modeled_speedup"] for c in allowed)
    again = oracle_search.search_oracle(
        tiny_task, tolerance_pp=50.0, starts=(0.2, 0.6), ends=(1.0,), cache=tmp_path
    )
    assert again == found  # from the cache
    strict = oracle_search.search_oracle(
        tiny_task, tolerance_pp=-100.0, starts=(0.2,), ends=(1.0,), cache=tmp_path
    )
    assert strict["start"] is None  # nothing keeps an impossible accuracy: the oracle is none
    assert oracle_search.oracle_policy(strict).name == "none"


def test_a_policy_typo_is_refused_before_any_run(tiny_task, tmp_path):
    with pytest.raises(ValueError, match=r"no parameter 'windw'.*window"):
        Bench([tiny_task.path], ["egeria:windw=3"], [0], tmp_path)
