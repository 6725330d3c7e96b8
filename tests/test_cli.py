"""The freeze-agent command line: every command once on a tiny task, complete tables when piped
or 80 columns wide, and bad input refused with a message."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from rich.console import Console

from freeze_agent import cli, list_tasks
from freeze_agent.cli import main


@pytest.fixture
def narrow(monkeypatch):
    """The CLI's console at 80 columns, writing to a pipe (not a terminal)."""
    monkeypatch.setenv("COLUMNS", "80")
    console = Console(width=80, force_terminal=False, record=True, file=io.StringIO())
    monkeypatch.setattr(cli, "console", console)
    return console


def test_cli_run_writes_json(tiny_task, tmp_path, capsys):
    out = tmp_path / "run.json"
    code = main(["run", str(tiny_task.path), "--policy", "linear-prefix:0.2", "--json", str(out)])
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["task"] == "tiny-digits" and payload["policy"] == "linear:0.2"
    assert {"wall_time", "modeled_cost_ratio", "val_accuracy", "test_accuracy", "timeline"} <= set(
        payload
    )
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "mode timeline" in printed


def test_cli_profile_reports_every_depth(tiny_task, tmp_path):
    out = tmp_path / "profile.json"
    code = main(["profile", str(tiny_task.path), "--repetitions", "2", "--json", str(out)])
    assert code == 0
    payload = json.loads(out.read_text())
    depths = payload["depths"]
    assert [d["frozen_units"] for d in depths] == list(range(len(payload["units"])))
    assert depths[0]["measured_ratio"] == 1.0 and depths[0]["modeled_ratio"] == 1.0
    assert all(0 < d["modeled_ratio"] <= 1 for d in depths)


def test_cli_bad_input_is_a_clear_error(capsys):
    assert main(["run", "no-such-task"]) == 2
    assert "no task named 'no-such-task'" in capsys.readouterr().out


def test_envs_piped_at_80_columns_keeps_every_column_of_every_row(narrow):
    assert main(["envs"]) == 0
    lines = narrow.export_text().splitlines()
    for task in list_tasks():
        row = [line for line in lines if f" {task.name} " in line]
        assert len(row) == 1, f"{task.name} is not on one whole line"
        cells = [cell.strip() for cell in row[0].strip("│ ").split("│")]
        assert cells[:4] == [task.name, task.split, task.family, task.dataset.name]
        assert cells[5] == str(task.epochs)
    assert sum(" heldout " in line for line in lines) == len(list_tasks("heldout"))


def test_tables_in_an_80_column_terminal_fold_instead_of_cutting(monkeypatch):
    console = Console(width=80, force_terminal=True, record=True, file=io.StringIO())
    monkeypatch.setattr(cli, "console", console)
    assert main(["envs"]) == 0
    lines = console.export_text().splitlines()
    assert "…" not in "".join(lines) and max(len(line) for line in lines) <= 80
    body = [line.split("│") for line in lines if line.startswith("│")]
    tasks = list_tasks()
    # a folded cell continues on the next lines: its column, read down, spells every value whole
    for column, values in ((1, [t.name for t in tasks]), (2, [t.split for t in tasks])):
        assert "".join(cells[column].strip() for cells in body) == "".join(values)


def test_overhead_reports_pairs_parts_plasticity_and_a_verdict(tiny_task, tmp_path, narrow):
    out = tmp_path / "overhead.json"
    assert main(["overhead", str(tiny_task.path), "--intervals", "4", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    (run,) = payload["runs"]
    assert run["intervals"] == 4 and run["warmup_intervals"] == 2 and run["n_pairs"] == 2
    assert run["seconds_without"] > 0 and run["parts"]["dynamics per step"] > 0
    assert payload["worst_percent"] == run["median_percent"] and not payload["control"]
    text = narrow.export_text()
    for row in ("observations with plasticity", "waits for a late reference result", "ratio"):
        assert row in text
    assert "attention score" in text  # the breakdown
    assert ("PASS" in text) != ("FAIL" in text) and "2% bound" in text


def test_overhead_repeats_report_the_median_and_the_worst_run(tiny_task, tmp_path, narrow):
    out = tmp_path / "overhead.json"
    argv = ["overhead", str(tiny_task.path), "--intervals", "3", "--warmup", "1", "--repeats", "2"]
    assert main([*argv, "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["repeats"] == 2 and [r["n_pairs"] for r in payload["runs"]] == [2, 2]
    medians = [r["median_percent"] for r in payload["runs"]]
    assert payload["worst_percent"] == max(medians)
    assert "2 runs: median overhead" in narrow.export_text()


def test_overhead_control_times_two_bare_copies_without_a_verdict(tiny_task, tmp_path, narrow):
    out = tmp_path / "overhead.json"
    argv = ["overhead", str(tiny_task.path), "--intervals", "3", "--warmup", "1", "--control"]
    assert main([*argv, "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["control"] and payload["runs"][0]["intervals_with_plasticity"] == 0
    text = narrow.export_text()
    assert "A/A control" in text and "PASS" not in text and "FAIL" not in text


def test_evaluate_compares_a_policy_with_no_freezing(tiny_task, tmp_path, narrow):
    out = tmp_path / "evaluation.json"
    argv = ["evaluate", "linear-prefix:0.5", "--tasks", str(tiny_task.path), "--seeds", "0"]
    assert main([*argv, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["tasks"]
    assert row["task"] == "tiny-digits" and row["modeled_speedup"] > 1.0
    assert "tiny-digits" in narrow.export_text()


@pytest.mark.slow
def test_train_writes_a_policy_from_the_generated_options(tiny_task, tmp_path, narrow):
    out = tmp_path / "policy"
    argv = ["train", "--out", str(out), "--tasks", str(tiny_task.path)]
    argv += ["--val-tasks", str(tiny_task.path), "--timesteps", "4", "--n-envs", "1"]
    argv += ["--epochs", "1", "--decisions", "2", "--n-steps", "4", "--batch-size", "4"]
    argv += ["--eval-every", "0", "--no-reference-model", "--no-wandb"]
    assert main(argv) == 0
    assert json.loads((out / "policy.json").read_text())["timesteps"] == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--epochs", "0"], "must be at least 1"),
        (["run", "--epochs", "-3"], "must be at least 1"),
        (["run", "--seed", "-1"], "a seed must be at least 0"),
        (["profile", "mnist1d-mlp", "--repetitions", "0"], "must be at least 1"),
        (["overhead", "--intervals", "0"], "must be at least 1"),
        (["overhead", "--repeats", "0"], "must be at least 1"),
        (["overhead", "--blocks", "0"], "must be at least 1"),
        (["overhead", "--warmup", "-1"], "a warm-up must be at least 0"),
        (["evaluate", "none", "--seeds", "-2"], "a seed must be at least 0"),
    ],
)
def test_zero_and_negative_budgets_seeds_and_counts_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_train_refuses_a_zero_budget_with_a_message(tmp_path, narrow):
    assert main(["train", "--out", str(tmp_path / "p"), "--timesteps", "0", "--no-wandb"]) == 2
    assert "timesteps must be an integer >= 1" in narrow.export_text()


def test_a_privileged_policy_in_a_plain_run_says_where_it_can_play(tiny_task, narrow):
    assert main(["run", str(tiny_task.path), "--policy", "teacher"]) == 2
    assert "privileged" in narrow.export_text()


@pytest.mark.slow
def test_a_fresh_process_has_plasticity_in_most_decisions(tiny_task, tmp_path):
    """The reference worker starts with the controller: in a process that never ran one before
    (as every user's script), plasticity is there from the second decision on."""
    spec = tmp_path / "tiny-ten.yaml"
    spec.write_text(tiny_task.path.read_text().replace("decisions: 6", "decisions: 10"))
    out = tmp_path / "run.json"
    command = [sys.executable, "-m", "freeze_agent.cli", "run", str(spec), "--policy", "none"]
    subprocess.run([*command, "--json", str(out)], check=True, capture_output=True, timeout=600)
    signals = json.loads(out.read_text())["signals"]
    assert signals["observations"] == 8  # 24 steps in intervals of 3
    assert signals["plasticity_fraction"] == 7 / 8  # all but the first, whatever the load


def test_policies_lists_every_registered_policy_with_its_parameters(narrow):
    from freeze_agent.policies.base import registered_policies

    assert main(["policies"]) == 0
    lines = narrow.export_text().splitlines()
    for name in [*registered_policies(aliases=False), "default"]:
        assert any(line.startswith(f"│ {name} ") for line in lines), name
    assert any("window=20, tolerance=0.0001" in line for line in lines)
