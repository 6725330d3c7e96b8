"""``FreezeController.state_dict`` / ``load_state_dict``: a run stopped, saved with
``torch.save`` and resumed in a new controller continues exactly as the uninterrupted run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ResidualNet

from freeze_agent import FreezeController

STEPS, DECISIONS, STOP = 36, 12, 17  # stop mid-interval, with a reference snapshot in flight


def build(policy: str, **kwargs):
    torch.manual_seed(0)
    model = ResidualNet(8, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(32, 1, 16, generator=torch.Generator().manual_seed(3))
    y = (x.mean(dim=(1, 2)) > 0).long()
    controller = FreezeController.from_pretrained(
        policy, model, optimizer, x, total_steps=STEPS, decisions=DECISIONS, **kwargs
    )
    return model, optimizer, controller, x, y


def train(model, optimizer, controller, x, y, steps, observations):
    decisions = len(controller.timeline)
    losses = []
    for _ in range(steps):
        model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        controller.step(loss)
        losses.append(loss.item())
        if len(controller.timeline) > decisions:  # a decision was taken: keep what it saw
            decisions = len(controller.timeline)
            observations.append(controller.last_observation)
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["default", "random:0.5"])
def test_a_resumed_run_continues_exactly_as_the_uninterrupted_one(tmp_path, policy):
    model, optimizer, controller, x, y = build(policy)
    seen_a: list = []
    try:
        losses_a = train(model, optimizer, controller, x, y, STEPS, seen_a)
        summary_a = controller.summary()
    finally:
        controller.close()

    model, optimizer, controller, x, y = build(policy)
    seen_b: list = []
    try:
        losses_b = train(model, optimizer, controller, x, y, STOP, seen_b)
        path = tmp_path / "checkpoint.pt"
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "freeze": controller.state_dict(),
            },
            path,
        )
    finally:
        controller.close()

    model, optimizer, controller, x, y = build(policy)  # a new process would do the same
    try:
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        controller.load_state_dict(saved["freeze"])
        losses_b += train(model, optimizer, controller, x, y, STEPS - STOP, seen_b)
        summary_b = controller.summary()
    finally:
        controller.close()

    assert summary_b["timeline"] == summary_a["timeline"]
    assert summary_b["decision_steps"] == summary_a["decision_steps"]
    assert len(seen_a) == len(seen_b) == DECISIONS - 1
    for a, b in zip(seen_a, seen_b, strict=True):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    assert losses_b == losses_a
    for key in ("observations", "plasticity_fraction"):
        assert summary_b["signals"][key] == summary_a["signals"][key]
    assert summary_b["modeled_speedup"] == pytest.approx(summary_a["modeled_speedup"])


def test_a_checkpoint_of_another_model_or_setup_is_refused_clearly():
    _, _, controller, _, _ = build("linear-prefix", reference=False)
    state = controller.state_dict()
    controller.close()
    torch.manual_seed(0)
    other = ResidualNet(8, 4)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    controller = FreezeController.from_pretrained(
        "linear-prefix", other, optimizer, torch.randn(4, 1, 16), total_steps=10, reference=False
    )
    try:
        with pytest.raises(ValueError, match=r"partitioned into 5 units .* this controller has 6"):
            controller.load_state_dict(state)
        with pytest.raises(ValueError, match="not a FreezeController checkpoint"):
            controller.load_state_dict({"modes": []})
    finally:
        controller.close()
    _, _, controller, _, _ = build("linear-prefix", reference=False, safety_net=False)
    try:
        with pytest.raises(ValueError, match="saved with safety net; build the controller"):
            controller.load_state_dict(state)
    finally:
        controller.close()
