"""The published freezing rules, each on synthetic observations where the right answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import conv_chain, synthetic_observation, train_steps

from freeze_agent import FreezeController
from freeze_agent.core.modes import Mode
from freeze_agent.policies.autofreeze import AutoFreeze
from freeze_agent.policies.base import registered_policies
from freeze_agent.policies.egeria import Egeria
from freeze_agent.policies.freezeout import FreezeOut
from freeze_agent.policies.localsgd import LocalSGDDynamic, LocalSGDStatic
from freeze_agent.policies.random_prefix import RandomPrefix
from freeze_agent.policies.registry import make_policy
from freeze_agent.policies.schedules import Geometric, LinearPrefix
from freeze_agent.policies.smartfrz import SmartFRZ

F, L, T = Mode.FROZEN, Mode.LOCAL, Mode.TRAIN


def squashed(r: list[float]) -> list[float]:
    """AutoFreeze's r as the observation holds it: r / (1 + r)."""
    return [x / (1 + x) for x in r]


def test_autofreeze_freezes_up_to_the_first_active_unit_at_or_above_the_median():
    policy = AutoFreeze()
    # active units 0..4 (5 is the head): median of r is 0.03; unit 2 (0.5) is the first >= it
    observation = synthetic_observation(6, grad_change=squashed([0.01, 0.02, 0.5, 0.03, 0.4, 0]))
    assert policy.decide(observation) == [F, F, T, T, T, T]
    # with two units frozen, the median is over units 2..4 (0.4): unit 2 (0.05) freezes
    observation = synthetic_observation(
        6, frozen=2, grad_change=squashed([0, 0, 0.05, 0.9, 0.4, 0])
    )
    assert policy.decide(observation) == [F, F, F, T, T, T]
    # an unmeasured unit stops the prefix
    unmeasured = synthetic_observation(4, dynamics_missing=[1, 1, 1, 1])
    assert policy.decide(unmeasured) == [T, T, T, T]


def test_freezeout_freezes_unit_i_at_t_i_and_scales_its_learning_rate():
    policy = FreezeOut(t0=0.8)
    times = policy.freeze_times(5)
    assert times == pytest.approx([(0.8 + 0.05 * i) ** 3 for i in range(5)])
    assert times[-1] == 1.0
    progress = 0.6  # past t_0 = 0.512, before t_1 = 0.614
    modes = policy.decide(synthetic_observation(5, progress=progress))
    assert modes == [F, T, T, T, T]
    scales = policy.learning_rate_scales()
    whole_run = 0.5 * (1 + math.cos(math.pi * progress))
    for i in (1, 2, 3):
        own = 0.5 * (1 + math.cos(math.pi * progress / times[i]))
        assert scales[i] == pytest.approx(own / times[i] / whole_run, rel=1e-5)  # float32
    assert scales[0] == 1.0 and scales[4] == 1.0  # frozen, and the head keeps the task's schedule
    assert policy.decide(synthetic_observation(5, progress=0.99)) == [F, F, F, F, T]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_the_controller_applies_learning_rate_scales_as_per_unit_learning_rates(
    make_optimizer, signal_batch
):
    scales = [0.5, 2.0, 1.0, 0.25]
    # float64: Adam's normalized step amplifies float32 rounding on near-zero gradients
    scaled_model, grouped_model = conv_chain().double(), conv_chain().double()
    grouped_model.load_state_dict(scaled_model.state_dict())
    signal_batch = (signal_batch[0].double(), signal_batch[1])
    controller = FreezeController(
        scaled_model, make_optimizer(scaled_model.parameters()), signal_batch[0], signals=False
    )
    controller.set_learning_rate_scales(scales)
    # the same steps with one parameter group per unit, its learning rate scaled
    base_lr = make_optimizer(grouped_model.parameters()).defaults["lr"]
    grouped = make_optimizer(
        [
            {"params": list(block.parameters()), "lr": base_lr * s}
            for block, s in zip(grouped_model, scales, strict=True)
        ]
    )
    reference = FreezeController(grouped_model, grouped, signal_batch[0], signals=False)
    runs = ((scaled_model, controller.optimizer, controller), (grouped_model, grouped, reference))
    for model, optimizer, owner in runs:
        torch.manual_seed(0)  # the same dropout masks
        train_steps(model, optimizer, owner, signal_batch, steps=3)
    for a, b in zip(scaled_model.parameters(), grouped_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    controller.close()
    reference.close()


def test_egeria_freezes_the_front_unit_after_k_flat_checks_and_unfreezes_on_a_lr_drop():
    policy = Egeria(window=3, tolerance=1e-3, checks=2, bootstrap=0.2)
    falling = [0.9, 0.5, 0.3]  # unit 1 keeps moving; unit 0 is flat from the start

    def at(check: int, lr_ratio: float = 1.0):
        plasticity = [0.4, falling[min(check, 2)] - 0.1 * check, 0.5, 0.0]
        return policy.decide(
            synthetic_observation(4, progress=check / 10, lr_ratio=lr_ratio, plasticity=plasticity)
        )

    # check 0: bootstrap; checks 1, 2 fill the window; 2 and 3 are flat checks of unit 0
    assert [at(c) for c in range(3)] == [[T, T, T, T]] * 3
    assert at(3) == [F, T, T, T]
    assert at(4) == [F, T, T, T]  # unit 1 is still falling: it stays
    assert at(5, lr_ratio=0.09) == [T, T, T, T]  # a 10x drop: everything learns again
    missing = synthetic_observation(4, progress=0.9, plasticity_missing=[1, 1, 1, 1])
    assert policy.decide(missing) == [T, T, T, T]


def test_localsgd_dynamic_moves_the_transition_on_a_flat_weight_change_and_puts_locals_in_front():
    policy = LocalSGDDynamic(threshold=0.1, warmup=0.0)

    def weight_change(relative_update: float) -> float:  # as the observation holds it
        return 1 + math.log10(relative_update) / 6

    supports = [1, 0, 1, 1, 0]  # unit 1 cannot learn locally
    moving = synthetic_observation(5, weight_change=weight_change(1e-2), supports_local=supports)
    assert policy.decide(moving) == [T] * 5
    halved = synthetic_observation(5, weight_change=weight_change(5e-3), supports_local=supports)
    assert policy.decide(halved) == [T] * 5  # a 50% change: still learning
    flat = synthetic_observation(5, weight_change=weight_change(4.9e-3), supports_local=supports)
    assert policy.decide(flat) == [L, T, T, T, T]  # a 2% change: the transition moves on
    assert policy.decide(flat) == [L, F, T, T, T]  # unit 1 levels off too; it cannot be LOCAL
    static = LocalSGDStatic(start=0.2)
    assert static.decide(synthetic_observation(5, progress=0.1)) == [T] * 5
    halfway = synthetic_observation(5, progress=0.55, supports_local=1)  # ceil(0.44 * 4) = 2
    assert static.decide(halfway) == [L, L, T, T, T]


@pytest.mark.parametrize(
    ("policy", "progress", "frozen"),
    [
        (LinearPrefix(0.3), 0.2, 0),
        (LinearPrefix(0.3), 0.65, 3),  # half-way from 0.3 to 1.0: ceil(0.5 * 6)
        (LinearPrefix(0.5, end=0.75), 0.8, 6),
        (Geometric(alpha=1 / 3, steps=10), 0.05, 0),
        (Geometric(alpha=1 / 3, steps=10), 0.1, 2),  # ceil(6 * (1 - 2/3))
        (Geometric(alpha=1 / 3, steps=10), 0.3, 5),  # ceil(6 * (1 - (2/3)^3)) = ceil(4.22)
    ],
)
def test_linear_and_geometric_frozen_counts(policy, progress, frozen):
    modes = policy.decide(synthetic_observation(7, progress=progress))
    assert modes == [F] * frozen + [T] * (7 - frozen)


def test_random_prefixes_match_their_frozen_fraction_and_repeat_after_a_reset():
    policy = RandomPrefix(fraction=0.3, seed=5)
    observation = synthetic_observation(11)
    counts = [policy.decide(observation).count(F) for _ in range(2000)]
    assert np.mean(counts) / 10 == pytest.approx(0.3, abs=0.02)
    policy.reset()
    assert [policy.decide(observation).count(F) for _ in range(50)] == counts[:50]


def test_smartfrz_freezes_the_converged_units_in_prefix_order():
    policy = SmartFRZ(threshold=0.5)
    observation = synthetic_observation(5, attention_score=[0.9, 0.8, 0.2, 0.9, 0.9])
    assert policy.decide(observation) == [F, F, T, T, T]
    no_predictor = synthetic_observation(5, attention_score=0.9, attention_missing=1)
    assert policy.decide(no_predictor) == [T] * 5


def test_every_family_is_registered_and_old_names_keep_working():
    names = set(registered_policies(aliases=False))
    expected = {"none", "linear", "geometric", "freezeout", "autofreeze", "egeria", "smartfrz"}
    assert expected | {"localsgd-static", "localsgd-dynamic", "random", "oracle"} <= names
    assert isinstance(make_policy("linear-prefix:0.2"), LinearPrefix)
    assert make_policy("egeria:window=30,tolerance=1e-4").window == 30


def test_a_parameter_typo_names_the_valid_parameters():
    with pytest.raises(ValueError, match=r"no parameter 'windw'.*window, tolerance, checks"):
        make_policy("egeria:windw=3")
    with pytest.raises(ValueError, match="window='three' is not a int"):
        make_policy("egeria:window=three")
