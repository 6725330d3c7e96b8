"""Gradient/weight dynamics, plasticity through the controller, and the observation spec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import train_steps
from torch import nn

import freeze_agent
from freeze_agent import FreezeController, Mode, partition
from freeze_agent.signals.dynamics import DynamicsTracker
from freeze_agent.signals.observation import (
    GLOBAL_FEATURES,
    UNIT_FEATURES,
    has_plasticity,
    log_scaled,
)
from freeze_agent.signals.similarity import sp_loss
from freeze_agent.signals.threads import one_thread_if
from freeze_agent.signals.unit_outputs import unit_outputs


def test_dynamics_on_a_hand_computed_case():
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0]]))  # norm 5
    units = partition(model, torch.ones(2, 2))
    tracker = DynamicsTracker(units)
    first = model[0].weight
    for grad in (torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0, 0.0]])):
        first.grad = grad
        tracker.after_step()
    with torch.no_grad():
        first.copy_(torch.tensor([[3.3, 4.4]]))  # ‖ΔW‖ = 0.5, ‖W‖ now 5.5
    d = tracker.end_interval()[0]
    assert d.grad_l1 == pytest.approx(2.0 + 2.0)  # ‖(2, -2)‖₁
    assert math.isnan(d.grad_change)  # no previous interval yet
    assert d.weight_change == pytest.approx(0.5 / 5.5)  # ‖ΔW‖ / ‖W_now‖
    assert d.grad_to_weight == pytest.approx(8**0.5 / 2 / 5.5)  # ‖mean gradient‖ / ‖W‖
    first.grad = torch.tensor([[1.0, 1.0]])
    tracker.after_step()
    d = tracker.end_interval()[0]
    assert d.grad_l1 == pytest.approx(2.0)
    assert d.grad_change == pytest.approx(abs(4.0 - 2.0) / 4.0)  # AutoFreeze's r_l
    assert tracker.end_interval()[1].age == 3  # the head unit never got a gradient here


def test_a_unit_without_gradient_keeps_its_signals_and_restarts_from_its_current_weights():
    """A LOCAL unit's weights move without a gradient: when it trains again, its weight change
    is the new interval's alone."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0]]))
    tracker = DynamicsTracker(partition(model, torch.ones(2, 2)))
    first, head = model[0].weight, model[1].weight
    first.grad, head.grad = torch.tensor([[1.0, 0.0]]), torch.ones(1, 1)
    tracker.after_step()
    measured = tracker.end_interval()[0]
    kept = (measured.grad_l1, measured.weight_change, measured.grad_to_weight)

    first.grad = None  # the first unit gets no gradient; its weights move anyway
    tracker.after_step()
    with torch.no_grad():
        first.add_(torch.tensor([[10.0, 0.0]]))
    d = tracker.end_interval()[0]
    assert (d.grad_l1, d.weight_change, d.grad_to_weight) == kept and d.age == 1

    first.grad = torch.tensor([[0.0, 2.0]])
    tracker.after_step()
    with torch.no_grad():
        first.add_(torch.tensor([[0.0, 3.0]]))  # now (13, 7)
    d = tracker.end_interval()[0]
    assert d.age == 0
    assert d.weight_change == pytest.approx(3.0 / math.hypot(13.0, 7.0))
    assert d.grad_l1 == pytest.approx(2.0)  # the skipped interval added nothing


def make_mlp(depth: int) -> nn.Module:
    layers = [nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(depth - 1)]
    return nn.Sequential(*layers, nn.Linear(8, 3))


@pytest.mark.parametrize("n_units", [1, 7, 32])
def test_observation_shapes_and_bounds(n_units):
    model = make_mlp(n_units)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # large steps: extreme signals
    controller = FreezeController(
        model, optimizer, torch.randn(8, 8), max_units=32, total_steps=20, reference=False
    )
    assert len(controller.units) == n_units
    x, y = torch.randn(16, 8) * 100, torch.randint(0, 3, (16,))
    for step in range(4):
        train_steps(model, optimizer, controller, (x, y), steps=1)
        if step == 1 and n_units > 1:
            controller.set_modes([Mode.FROZEN] + [Mode.TRAIN] * (n_units - 1))
        obs = controller.observe()
        assert obs["units"].shape == (32, len(UNIT_FEATURES)) and obs["units"].dtype == np.float32
        assert obs["global"].shape == (len(GLOBAL_FEATURES),)
        assert obs["mask"].tolist() == [1] * n_units + [0] * (32 - n_units)
        for key in ("units", "global"):
            assert np.isfinite(obs[key]).all() and np.abs(obs[key]).max() <= 1.0
        assert not obs["units"][n_units:].any()  # padded slots stay zero
    column = UNIT_FEATURES.index
    assert obs["units"][n_units - 1, column("is_head")] == 1.0
    assert obs["units"][0, column("plasticity_missing")] == 1.0  # no reference requested
    assert obs["units"][n_units - 1, column("dynamics_missing")] == 0.0


def test_spec_version_is_exposed():
    assert isinstance(freeze_agent.OBSERVATION_VERSION, str) and freeze_agent.OBSERVATION_VERSION
    assert len(set(UNIT_FEATURES)) == len(UNIT_FEATURES)


def test_log_scaling_is_bounded():
    assert log_scaled(1.0) == 1.0 and log_scaled(1e-6) == 0.0 and log_scaled(1e-9) == 0.0
    assert log_scaled(0.0) == 0.0 and log_scaled(float("nan")) == 0.0
    assert log_scaled(5.0, reference=10.0) == pytest.approx(1 + math.log10(0.5) / 6)


def test_plasticity_arrives_from_the_reference_worker(chain, signal_batch):
    optimizer = torch.optim.SGD(chain.parameters(), lr=0.1, momentum=0.9)
    controller = FreezeController(chain, optimizer, signal_batch[0], total_steps=50)
    x, y = signal_batch
    column = UNIT_FEATURES.index("plasticity_missing")
    try:
        obs = controller.observe()  # starts the worker, submits the first snapshot
        assert obs["units"][0, column] == 1.0 and not has_plasticity(obs)
        assert controller.plasticity.wait_for_reference(60)
        train_steps(chain, optimizer, controller, (x, y))
        obs = controller.observe()
        assert has_plasticity(obs)
        assert obs["global"][GLOBAL_FEATURES.index("reference_available")] == 1.0
        assert (obs["units"][:4, column] == 0.0).all()
        assert obs["units"][:4, UNIT_FEATURES.index("plasticity")].max() > 0

        # the values are the SP loss against the reference outputs, per step since the snapshot
        monitor = controller.plasticity
        values, _, _ = monitor.check(controller.steps)
        current = unit_outputs(chain, monitor.paths, monitor.probe)
        steps = controller.steps - monitor.reference.step
        pairs = zip(current, monitor.reference.outputs, strict=True)
        expected = [sp_loss(a, b) / steps for a, b in pairs]
        assert values == pytest.approx(expected, rel=1e-9)
    finally:
        controller.close()


def test_one_thread_if_restores_the_thread_count():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread_if(True):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with one_thread_if(False):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread_if(True):
            raise RuntimeError("restored on the way out")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_observing_a_run_leaves_its_random_stream_alone():
    """Dropout draws from the global RNG, so signals that consumed it (building the SmartFRZ
    predictor, say) would make an observed run differ from an unobserved one."""

    def losses(signals: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
        controller = FreezeController(
            model, optimizer, x, total_steps=8, signals=signals, reference=False
        )
        recorded = []
        try:
            for _ in range(4):
                controller.observe()
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                controller.step(loss)
                recorded.append(loss.item())
        finally:
            controller.close()
        return recorded

    assert losses(signals=True) == losses(signals=False)
