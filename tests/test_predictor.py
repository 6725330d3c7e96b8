"""SmartFRZ predictor: snapshots, attention model, CKA labels, artifact round trip, training."""

from __future__ import annotations

import json

import pytest
import torch

from freeze_agent.core.units import partition
from freeze_agent.rl.predictor_training import collect_examples, linear_cka, train_predictor
from freeze_agent.signals.predictor import (
    HISTORY,
    SNAPSHOT_SIZE,
    AttentionPredictor,
    WeightHistory,
    WeightSampler,
    load_predictor,
    save_predictor,
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


# --------------------------------------------------------------------------- snapshots


def test_sampler_shape_determinism_and_small_units(chain):
    units = partition(chain, torch.randn(4, 1, 16))
    assert any(u.num_params < SNAPSHOT_SIZE for u in units)  # the first conv has 32 weights
    first = WeightSampler(units, seed=0).snapshot()
    assert first.shape == (len(units), SNAPSHOT_SIZE) and first.dtype == torch.float32
    assert torch.equal(first, WeightSampler(units, seed=0).snapshot())
    assert not torch.equal(first, WeightSampler(units, seed=1).snapshot())
    # every sampled value of a small unit is one of its weights
    small = next(u for u in units if u.num_params < SNAPSHOT_SIZE)
    weights = torch.cat([p.detach().reshape(-1) for p in small.parameters()])
    assert torch.isin(first[small.index], weights).all()


def test_sampler_follows_training_and_history_keeps_last(chain):
    units = partition(chain, torch.randn(4, 1, 16))
    history = WeightHistory(WeightSampler(units, size=64), history=3)
    for _ in range(5):
        history.record()
        with torch.no_grad():
            for p in chain.parameters():
                p.add_(1.0)
    assert len(history) == 3
    stacked = history.tensor()
    assert stacked.shape == (len(units), 3, 64)
    assert torch.allclose(stacked[:, 1] - stacked[:, 0], torch.ones(len(units), 64))


# --------------------------------------------------------------------------- predictor


@pytest.mark.parametrize("n_units", [1, 7, 32])
@pytest.mark.parametrize("length", [1, HISTORY])
def test_predictor_shapes_and_probabilities(n_units, length):
    model = AttentionPredictor()
    history = torch.randn(n_units, length, SNAPSHOT_SIZE)
    assert model(history).shape == (n_units, 2)
    probability = model.freeze_probability(history)
    assert probability.shape == (n_units,)
    assert ((probability >= 0) & (probability <= 1)).all()


def test_predictor_is_scale_free_and_ignores_padding():
    model = AttentionPredictor()
    history = torch.randn(3, 5, SNAPSHOT_SIZE)
    logits = model(history)
    assert torch.allclose(model(7.0 * history), logits, atol=1e-5)
    padded = torch.cat([torch.randn(3, 4, SNAPSHOT_SIZE), history], dim=1)
    mask = torch.arange(9).expand(3, 9) >= 4
    assert torch.allclose(model(padded, mask), logits, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    model = AttentionPredictor().eval()
    save_predictor(model, tmp_path, {"name": "test"})
    loaded = load_predictor(tmp_path)
    history = torch.randn(7, 12, SNAPSHOT_SIZE)
    assert torch.equal(loaded(history), model(history))
    assert json.loads((tmp_path / "card.json").read_text())["architecture"]["snapshot_size"] == (
        SNAPSHOT_SIZE
    )
    with pytest.raises(FileNotFoundError):
        load_predictor(tmp_path / "missing")


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


def test_sampler_handles_unit_without_parameters():
    class Unitless:  # a unit-like object: the sampler needs index and parameters() only
        index = 0

        def parameters(self):
            return iter(())

    sampler = WeightSampler([Unitless()], size=8)
    assert torch.equal(sampler.snapshot(), torch.zeros(1, 8))


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
