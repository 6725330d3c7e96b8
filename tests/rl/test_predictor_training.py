"""SmartFRZ predictor, offline training: CKA labels, recorded runs, the train-predictor command."""

from __future__ import annotations

import json

import pytest
import torch

from freeze_agent.rl.predictor_training import collect_examples, linear_cka, train_predictor
from freeze_agent.signals.predictor import (
    HISTORY,
    SNAPSHOT_SIZE,
    load_predictor,
)

TINY_TASK = """\
dataset: {name: digits, n_train: 256, n_val: 64, n_test: 64}
model: {family: cnn2d, depth: 3, channels: 8}
optimizer: {name: adamw, lr: 3.0e-3}
batch_size: 32
epochs: 2
decisions: 6
"""


@pytest.fixture(scope="module")
def tiny_examples(tmp_path_factory):
    """One recorded run of the tiny task (shared: recording trains the task)."""
    folder = tmp_path_factory.mktemp("tiny")
    path = folder / "tiny.yaml"
    path.write_text(TINY_TASK)
    return collect_examples(path, seed=0, decisions=6, cache=folder / "cache"), path


# --------------------------------------------------------------------------- CKA and labels


def test_linear_cka_properties():
    x = torch.randn(200, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, 3.5 * x) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(200, 16)) < 0.2
    assert linear_cka(x, x[:, :8]) == pytest.approx(linear_cka(x[:, :8], x))


def test_collected_labels_are_binary_and_monotone(tiny_examples):
    examples, _ = tiny_examples
    n_units = int(examples["unit"].max()) + 1
    n = examples["labels"].numel()
    assert examples["inputs"].shape == (n, HISTORY, SNAPSHOT_SIZE)
    assert set(examples["labels"].unique().tolist()) <= {0, 1}
    labels = examples["labels"].reshape(-1, n_units)  # (intervals, units)
    assert (labels[1:] >= labels[:-1]).all()  # once converged, stays converged
    # the history grows by one snapshot per interval, starting from the initialization
    lengths = examples["length"].reshape(-1, n_units)[:, 0]
    assert lengths.tolist() == list(range(1, labels.shape[0] + 1))
    assert examples["mask"].sum(-1).equal(examples["length"])


@pytest.mark.slow
def test_train_predictor_writes_a_card(tiny_examples, tmp_path):
    _, task = tiny_examples
    cache = task.parent / "cache"
    out = tmp_path / "smartfrz"
    card = train_predictor([task], [task], out, epochs=2, decisions=6, cache=cache)
    assert (out / "predictor.safetensors").is_file()
    assert json.loads((out / "card.json").read_text()) == card
    heldout = card["metrics"]["heldout"]
    assert heldout["examples"] > 0 and 0.0 <= heldout["balanced_accuracy"] <= 1.0
    assert load_predictor(out)(torch.randn(4, 3, SNAPSHOT_SIZE)).shape == (4, 2)


@pytest.mark.slow
def test_command_skips_tasks_without_data(tiny_examples, tmp_path, monkeypatch, capsys):
    from freeze_agent.cli import main
    from freeze_agent.rl import predictor_training as predictor
    from freeze_agent.tasks.data import DatasetUnavailableError

    _, task = tiny_examples
    missing = tmp_path / "missing.yaml"
    missing.write_text(TINY_TASK)
    collect = predictor.collect_examples

    def collect_or_fail(task, seed, **options):
        if task.name == "missing":
            raise DatasetUnavailableError("install the missing data")
        return collect(task, seed, **options)

    monkeypatch.setattr(predictor, "collect_examples", collect_or_fail)
    out = tmp_path / "smartfrz"
    argv = ["train-predictor", "--tasks", str(task), str(missing), "--val", str(task)]
    argv += ["--out", str(out)]
    argv += ["--epochs", "1", "--decisions", "6", "--cache", str(task.parent / "cache")]
    assert main(argv) == 0
    card = json.loads((out / "card.json").read_text())
    assert [s["task"] for s in card["training"]["skipped"]] == ["missing"]
    assert "skipping missing" in capsys.readouterr().out
