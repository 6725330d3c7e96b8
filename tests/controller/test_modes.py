"""FreezeController: FROZEN, LOCAL and TRAIN have exactly the intended effect."""

from __future__ import annotations

import pytest
import torch
from helpers import conv_chain, train_steps
from torch import nn

from freeze_agent import FreezeController, Mode, effective_modes, partition
from freeze_agent.core.cost_model import cost_ratio, iteration_flops
from freeze_agent.core.local_learning import WeakSupervision, hebbian_update

OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("set_to_none", [True, False])
def test_frozen_units_stay_bit_identical(chain, signal_batch, make_optimizer, set_to_none):
    optimizer = make_optimizer(chain.parameters())
    controller = FreezeController(chain, optimizer, signal_batch[0])
    train_steps(chain, optimizer, controller, signal_batch)  # momentum / moments now non-zero
    controller.set_modes([Mode.FROZEN, Mode.TRAIN, Mode.FROZEN, Mode.TRAIN])
    frozen = [snapshot(chain[0]), snapshot(chain[2])]  # includes BatchNorm running statistics
    trained = snapshot(chain[1])
    train_steps(chain, optimizer, controller, signal_batch, set_to_none=set_to_none)
    assert same(frozen[0], snapshot(chain[0])) and same(frozen[1], snapshot(chain[2]))
    assert not same(trained, snapshot(chain[1]))
    assert all(p.grad is None for p in chain[0].parameters())


def test_frozen_units_switch_off_dropout_and_norm_updates_even_after_model_train(chain):
    controller = FreezeController(
        chain, torch.optim.SGD(chain.parameters(), lr=0.1), torch.randn(4, 1, 16)
    )
    controller.set_modes(["FROZEN", "FROZEN", "TRAIN", "TRAIN"])
    chain.train()
    x = torch.randn(4, 1, 16)
    assert torch.equal(chain[:2](x), chain[:2](x))  # dropout in unit 1 is off
    assert not chain[0][1].training and not chain[1][3].training
    controller.set_modes(["TRAIN"] * 4)
    assert chain[1][3].training  # back to the model's mode on unfreeze


def test_frozen_prefix_builds_no_graph(chain):
    controller = FreezeController(
        chain, torch.optim.SGD(chain.parameters(), lr=0.1), torch.randn(4, 1, 16)
    )
    controller.set_modes(["FROZEN", "FROZEN", "TRAIN", "TRAIN"])
    hidden = chain[:2](torch.randn(4, 1, 16))
    assert hidden.grad_fn is None and not hidden.requires_grad


def test_optimizer_state_kept_on_unfreeze_unless_reset(chain, signal_batch):
    for reset in (False, True):
        model = conv_chain()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        controller = FreezeController(
            model, optimizer, signal_batch[0], reset_optimizer_state_on_unfreeze=reset
        )
        train_steps(model, optimizer, controller, signal_batch, steps=1)
        weight = model[0][0].weight
        assert "momentum_buffer" in optimizer.state[weight]
        controller.set_modes(["FROZEN", "TRAIN", "TRAIN", "TRAIN"])
        controller.set_modes(["TRAIN"] * 4)
        assert (weight in optimizer.state) is not reset


def test_unfreezing_keeps_the_parameters_the_model_keeps_fixed(chain, signal_batch):
    """TRAIN restores each parameter's own requires_grad: a weight the model (or its user) keeps
    fixed does not start training when its unit is unfrozen, nor after close()."""
    optimizer = torch.optim.AdamW(chain.parameters(), lr=0.01)
    fixed = chain[0][0].weight
    fixed.requires_grad_(False)
    controller = FreezeController(chain, optimizer, signal_batch[0], signals=False)
    controller.set_modes([Mode.FROZEN, Mode.TRAIN, Mode.TRAIN, Mode.TRAIN])
    controller.set_modes([Mode.TRAIN] * 4)
    assert not fixed.requires_grad
    assert all(p.requires_grad for p in chain[0].parameters() if p is not fixed)
    before = fixed.detach().clone()
    train_steps(chain, optimizer, controller, signal_batch)
    assert torch.equal(before, fixed)
    controller.set_modes([Mode.FROZEN, Mode.TRAIN, Mode.TRAIN, Mode.TRAIN])
    controller.close()
    assert not fixed.requires_grad


def test_local_unit_learns_without_gradients_and_upstream_is_untouched(chain, signal_batch):
    optimizer = torch.optim.SGD(chain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    controller = FreezeController(chain, optimizer, signal_batch[0], local_lr=0.05)
    train_steps(chain, optimizer, controller, signal_batch, steps=1)
    applied = controller.set_modes(["TRAIN", "LOCAL", "TRAIN", "TRAIN"])
    assert applied == [Mode.FROZEN, Mode.LOCAL, Mode.TRAIN, Mode.TRAIN]
    upstream, local = snapshot(chain[0]), chain[1][0].weight.detach().clone()
    norms = local.flatten(1).norm(dim=1)
    train_steps(chain, optimizer, controller, signal_batch)
    assert same(upstream, snapshot(chain[0]))
    assert not torch.equal(local, chain[1][0].weight)
    assert chain[1][0].weight.grad is None
    # the local rule keeps each output row at its norm
    torch.testing.assert_close(chain[1][0].weight.flatten(1).norm(dim=1), norms)
    out = chain[:2](signal_batch[0])
    assert out.grad_fn is None  # the LOCAL unit's output is detached


def test_local_rule_on_a_hand_computed_linear_case():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    y = layer(x)  # [[1, 2], [1, -2]]
    hebbian_update(layer, x, y, lr=0.5)
    # ΔW = 0.5 · yᵀx / 2 = [[0.5, 0], [0, 1]]; W + ΔW = [[1.5, 0], [0, 3]], rows rescaled
    torch.testing.assert_close(layer.weight, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    x2 = torch.tensor([[1.0, 0.0]])
    hebbian_update(layer, x2, torch.tensor([[0.0, 1.0]]), lr=1.0)
    # ΔW = [[0, 0], [1, 0]]; row 1 = [1, 2] rescaled to norm 2
    torch.testing.assert_close(layer.weight[1], torch.tensor([1.0, 2.0]) * 2 / 5**0.5)


def test_local_rule_on_a_convolution_matches_autograd():
    conv = nn.Conv1d(2, 3, 3, padding=1, bias=False)
    x = torch.randn(4, 2, 10)
    y = conv(x).detach()
    expected_delta = torch.autograd.grad((conv(x) * y).sum(), conv.weight)[0] / 4
    before = conv.weight.detach().clone()
    hebbian_update(conv, x, y, lr=1e-3)
    raw = before + 1e-3 * expected_delta
    expected = raw * (before.flatten(1).norm(dim=1) / raw.flatten(1).norm(dim=1)).view(-1, 1, 1)
    torch.testing.assert_close(conv.weight.detach(), expected)


def test_weak_supervision_cuts_the_local_rate_when_the_loss_rises():
    ws = WeakSupervision(window=2, cut=0.5)
    for loss in (3.0, 3.0, 2.0, 2.0):  # falling: kept
        ws.update(loss)
    assert ws.scale == 1.0
    for loss in (2.5, 2.5):  # rising: cut
        ws.update(loss)
    assert ws.scale == 0.5


def test_effective_modes_projection(residual_net):
    units = partition(residual_net, torch.randn(4, 1, 16))
    T, L, F_ = Mode.TRAIN, Mode.LOCAL, Mode.FROZEN
    assert effective_modes([T, T, L, T, F_], units) == [F_, F_, L, T, T]
    assert effective_modes([L, T, L, F_, T], units) == [L, F_, L, F_, T]
    assert effective_modes([F_] * 5, units) == [F_, F_, F_, F_, T]
    assert effective_modes(["train", 1, "FROZEN", 0, 2], units) == [F_, L, F_, T, T]
    # a timeline's letters, one per unit, and a whole timeline string
    assert effective_modes(["f", "L", "F", "T", "F"], units) == [F_, L, F_, T, T]
    assert effective_modes("FFTTT", units) == [F_, F_, T, T, T]
    with pytest.raises(ValueError, match="one mode per unit"):
        effective_modes([T, T], units)
    with pytest.raises(ValueError, match="not a mode"):
        effective_modes([T, T, T, T, "melt"], units)
    with pytest.raises(ValueError, match="not a mode"):
        effective_modes("FFTTX", units)


def test_local_on_an_unsupported_unit_is_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(8 * 3, 2))
    controller = FreezeController(
        model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randint(0, 10, (4, 3))
    )
    with pytest.raises(ValueError, match="cannot be LOCAL"):
        controller.set_modes(["LOCAL", "TRAIN"])


def test_cost_model_follows_research_rules(residual_net):
    units = partition(residual_net, torch.randn(4, 1, 16))
    T, L, F_ = Mode.TRAIN, Mode.LOCAL, Mode.FROZEN
    full = sum(u.flops_train for u in units)
    assert iteration_flops(units, [T] * 5) == pytest.approx(full)
    # a frozen prefix costs its forward only; the first trainable unit needs no input gradient
    prefix = iteration_flops(units, [F_, F_, T, T, T])
    expected = (
        sum(u.flops_forward for u in units[:2])
        + units[2].flops_forward
        + units[2].flops_backward_weight
        + sum(u.flops_train for u in units[3:])
    )
    assert prefix == pytest.approx(expected)
    # frozen in the middle still passes the gradient back to the trainable unit before it
    middle = iteration_flops(units, [T, F_, T, T, T])
    assert middle == pytest.approx(full - units[1].flops_backward_weight)
    # cached prefix costs nothing; local costs forward + one weight-sized GEMM
    assert iteration_flops(units, [F_, F_, T, T, T], cached_prefix=2) == pytest.approx(
        prefix - units[0].flops_forward - units[1].flops_forward
    )
    local = iteration_flops(units, [L, T, T, T, T])
    assert local == pytest.approx(full - units[1].flops_backward_input)
    assert cost_ratio(units, [F_, F_, F_, F_, T]) < cost_ratio(units, [F_, T, T, T, T]) < 1.0


def test_the_reference_worker_starts_with_the_controller(chain, signal_batch):
    controller = FreezeController(
        chain, torch.optim.SGD(chain.parameters(), lr=0.1), signal_batch[0]
    )
    try:
        assert controller.plasticity is not None and controller.plasticity.worker.pid is not None
        assert controller.signal_report()["observations"] == 0  # before any observation
    finally:
        controller.close()
    assert controller.plasticity is None
