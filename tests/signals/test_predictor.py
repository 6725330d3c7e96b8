"""SmartFRZ predictor, inference: weight snapshots, the attention model, the artifact round trip."""

from __future__ import annotations

import json

import pytest
import torch

from freeze_agent.core.units import partition
from freeze_agent.signals.predictor import (
    HISTORY,
    SNAPSHOT_SIZE,
    AttentionPredictor,
    PredictorArtifactError,
    WeightHistory,
    WeightSampler,
    load_predictor,
    save_predictor,
)

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


def test_sampler_handles_unit_without_parameters():
    class Unitless:  # a unit-like object: the sampler needs index and parameters() only
        index = 0

        def parameters(self):
            return iter(())

    sampler = WeightSampler([Unitless()], size=8)
    assert torch.equal(sampler.snapshot(), torch.zeros(1, 8))


@pytest.mark.parametrize("damaged", ["predictor.safetensors", "card.json"])
def test_a_damaged_predictor_is_named(tmp_path, damaged):
    save_predictor(AttentionPredictor().eval(), tmp_path, {"name": "test"})
    path = tmp_path / damaged
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PredictorArtifactError, match=rf"{path}.* is damaged"):
        load_predictor(tmp_path)
