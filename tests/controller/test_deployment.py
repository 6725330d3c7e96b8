"""Deploying a policy in a user's own loop: ``from_pretrained`` decides by itself at the planned
steps, the safety net undoes freezes that hurt, and ``summary`` / ``plot_timeline`` report."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import FreezePrefix, ResidualNet

from freeze_agent import FreezeController, Mode
from freeze_agent.controller.safety_net import SafetyNet


def make_run(seed: int = 0):
    torch.manual_seed(seed)
    model = ResidualNet(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(32, 1, 16)
    y = (x.mean(dim=(1, 2)) > 0).long()
    return model, optimizer, x, y


def train(model, optimizer, controller, x, y, steps: int, losses=None) -> None:
    for _ in range(steps):
        model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        controller.step(loss if losses is None else losses.pop(0))


def test_from_pretrained_decides_by_itself_at_the_planned_steps():
    model, optimizer, x, y = make_run()
    controller = FreezeController.from_pretrained(
        "linear-prefix:0.2", model, optimizer, x, total_steps=40, decisions=8, reference=False
    )
    try:
        assert controller.summary()["decision_steps"] == [0]  # the first decision, before step 1
        train(model, optimizer, controller, x, y, 40)
        summary = controller.summary()
    finally:
        controller.close()
    assert summary["decision_steps"] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert set(summary["causes"]) == {"policy"}
    assert all(len(modes) == len(controller.units) for modes in summary["timeline"])
    # linear-prefix freezes a growing prefix after its start: the last decision froze some
    assert summary["timeline"][0] == "T" * len(controller.units)
    assert summary["timeline"][-1].startswith("F")
    assert summary["modeled_speedup"] > 1.0
    assert summary["measured_seconds"] > 0 and summary["steps"] == 40


def test_the_shipped_policy_deploys_with_its_signals_in_a_plain_loop(tmp_path):
    model, optimizer, x, y = make_run()
    controller = FreezeController.from_pretrained(
        "default", model, optimizer, x, total_steps=30, decisions=6
    )
    try:
        train(model, optimizer, controller, x, y, 30)
        summary = controller.summary()
        path = controller.plot_timeline(tmp_path / "timeline.png")
    finally:
        controller.close()
    assert summary["policy"] == "default" and len(summary["timeline"]) == 6
    assert summary["signals"]["observations"] == 6
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("policy", "kwargs", "measured"),
    [
        ("linear-prefix:0.2", {}, False),  # a fixed schedule reads only progress
        ("freezeout", {}, False),
        ("autofreeze", {}, True),  # reads the gradient dynamics
        ("linear-prefix:0.2", {"signals": True}, True),  # asked for explicitly
    ],
)
def test_only_a_policy_that_reads_the_signals_pays_for_them(policy, kwargs, measured):
    model, optimizer, x, y = make_run()
    controller = FreezeController.from_pretrained(
        policy, model, optimizer, x, total_steps=20, decisions=4, reference=False, **kwargs
    )
    try:
        train(model, optimizer, controller, x, y, 20)
        observation = controller.last_observation
    finally:
        controller.close()
    assert (controller.dynamics is not None) is measured
    assert (controller.attention is not None) is measured
    # without the signals the observation still carries progress, so the schedule still runs
    assert len(controller.timeline) == 4 and observation is not None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "needs the run's length: pass total_steps"),
        ({"total_steps": 0}, ValueError, "total_steps must be an integer >= 1"),
        ({"interval_steps": 2.5}, ValueError, "interval_steps must be an integer"),
        ({"total_steps": 10, "policy": "no-such-policy"}, ValueError, "unknown policy"),
        ({"total_steps": 10, "policy": "teacher"}, ValueError, "privileged"),
        ({"total_steps": 10, "policy": 3}, TypeError, "policy must be a policy name"),
    ],
)
def test_from_pretrained_refuses_bad_arguments_clearly(kwargs, error, match):
    model, optimizer, x, _ = make_run()
    policy = kwargs.pop("policy", "none")
    with pytest.raises(error, match=match):
        FreezeController.from_pretrained(policy, model, optimizer, x, reference=False, **kwargs)


def test_safety_net_unfreezes_the_latest_frozen_units_on_a_validation_regression():
    model, optimizer, x, y = make_run()
    net = SafetyNet(tolerance=0.01, hold_decisions=2)
    controller = FreezeController.from_pretrained(
        FreezePrefix(start=2),
        model,
        optimizer,
        x,
        interval_steps=4,
        safety_net=net,
        reference=False,
    )
    head = len(controller.units) - 1
    try:
        train(model, optimizer, controller, x, y, 4)  # decision 2 at step 4 freezes
        assert controller.modes[:head] == [Mode.FROZEN] * head
        controller.report_validation(0.90)
        controller.report_validation(0.895)  # within tolerance: nothing happens
        assert not net.events
        with pytest.warns(UserWarning, match="safety net at step 4: the validation metric 0.8"):
            controller.report_validation(0.80)
        assert controller.modes == [Mode.TRAIN] * (head + 1)
        event = net.events[0]
        assert event.units == list(range(head)) and event.hold_until_step == 4 + 2 * 4
        train(model, optimizer, controller, x, y, 4)  # the policy asks to freeze: held
        assert controller.modes == [Mode.TRAIN] * (head + 1)
        train(model, optimizer, controller, x, y, 4)  # step 12: the hold is over
        assert controller.modes[:head] == [Mode.FROZEN] * head
        summary = controller.summary()
    finally:
        controller.close()
    assert summary["causes"] == ["policy", "policy", "safety net", "policy", "policy"]
    assert summary["safety_net"][0]["reason"].startswith("the validation metric 0.8")


def test_safety_net_watches_the_training_loss_when_nothing_is_reported():
    model, optimizer, x, y = make_run()
    controller = FreezeController.from_pretrained(
        FreezePrefix(start=3), model, optimizer, x, interval_steps=2, reference=False
    )
    # interval means 1.0, 0.8 (then the freeze), then 0.85 (fine), 0.95 and 0.95 (> 0.8 x 1.1)
    losses = [1.0, 1.0, 0.8, 0.8, 0.85, 0.85, 0.95, 0.95, 0.95, 0.95]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, optimizer, controller, x, y, 10, losses=losses)
        events = controller.summary()["safety_net"]
    finally:
        controller.close()
    assert [e["step"] for e in events] == [10]
    assert "stayed over 1.1x its pre-freeze low 0.8 for 2 decisions" in events[0]["reason"]
    assert any("safety net" in str(w.message) for w in caught)


def test_safety_net_acts_on_divergence_at_once_and_can_be_turned_off():
    for enabled in (True, False):
        model, optimizer, x, y = make_run()
        controller = FreezeController.from_pretrained(
            FreezePrefix(start=2),
            model,
            optimizer,
            x,
            interval_steps=2,
            safety_net=enabled,
            reference=False,
        )
        losses = [1.0, 1.0, 0.9, 0.9, math.nan, math.nan]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train(model, optimizer, controller, x, y, 6, losses=losses)
            summary = controller.summary()
        finally:
            controller.close()
        if enabled:
            assert summary["safety_net"][0]["reason"] == "the training loss is nan"
            assert summary["timeline"][-1] == "T" * len(controller.units)
        else:
            assert summary["safety_net"] is None
            assert summary["timeline"][-1].startswith("F")


def test_divergence_is_a_blow_up_not_noise_on_a_tiny_end_of_run_loss():
    # the false alarm the benchmarks showed: 0.0038 -> 0.014 is 3.6x the lowest, but gives back
    # under 1% of the progress from 2.3
    net = SafetyNet()
    for loss in (2.3, 1.0, 0.1, 0.01, 0.0038):
        assert net.watch_loss(loss) is None
    assert net.watch_loss(0.014) is None
    alarm = net.watch_loss(1.5)  # back over half-way to where training started
    assert alarm is not None and alarm.urgent
    assert "diverges" in alarm.reason and "first interval's 2.3" in alarm.reason
    early = SafetyNet()  # early in a run, the lowest is the first loss: 3x it diverges
    assert early.watch_loss(2.0) is None
    assert early.watch_loss(6.5) is not None


def test_safety_net_settings_are_checked():
    with pytest.raises(ValueError, match="tolerance must be a positive number"):
        SafetyNet(tolerance=-1)
    with pytest.raises(ValueError, match="hold_decisions must be an integer >= 1"):
        SafetyNet(hold_decisions=0)


class LocalAfterFreeze(FreezePrefix):
    """Freezes unit 0 from the second decision, and from the third also asks LOCAL of unit 2."""

    def decide(self, observation):
        modes = super().decide(observation)
        if self._decisions >= 3:
            modes[2] = Mode.LOCAL
        return modes


def test_a_hold_is_not_undone_by_a_local_unit_after_it():
    model, optimizer, x, y = make_run()
    controller = FreezeController.from_pretrained(
        LocalAfterFreeze(depth=1), model, optimizer, x, interval_steps=2, reference=False
    )
    try:
        train(model, optimizer, controller, x, y, 2)
        assert controller.modes[0] is Mode.FROZEN
        controller.report_validation(0.9)
        with pytest.warns(UserWarning, match="safety net"):
            controller.report_validation(0.5)
        train(model, optimizer, controller, x, y, 2)  # asks FROZEN for 0 and LOCAL for 2
        assert controller.modes[0] is Mode.TRAIN and controller.modes[2] is Mode.TRAIN
    finally:
        controller.close()
