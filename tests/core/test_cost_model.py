"""The cost model: term counts per mode, default constants = FLOP ratio, the constants fit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import conv_chain

from freeze_agent import Mode, partition
from freeze_agent.bench.profiling import fit_profile
from freeze_agent.core.cost_model import (
    DEFAULT_CONSTANTS,
    TERMS,
    CostConstants,
    _nnls,
    cost_ratio,
    fit_constants,
    iteration_flops,
    iteration_terms,
)

T, L, F_ = Mode.TRAIN, Mode.LOCAL, Mode.FROZEN
# plausible CPU constants: memory-bound bytes, op dispatch, optimizer, cache reads, fixed cost
SOME = CostConstants(
    gemm_forward=1.0,
    gemm_backward=1.3,
    traffic=2.0,
    frozen_traffic=0.5,
    ops=3e4,
    parameters=10.0,
    cache_read=1.0,
    fixed=2e5,
    batch_size=16,
)


@pytest.fixture
def units():
    return partition(conv_chain(width=8, depth=4), torch.randn(4, 1, 16))


def prefix(n: int, k: int) -> list[Mode]:
    return [F_] * k + [T] * (n - k)


def test_terms_follow_the_mode_rules(units):
    n, batch = len(units), 16
    full = iteration_terms(units, [T] * n, batch_size=batch)
    assert full["traffic"] == pytest.approx(
        batch
        * sum(
            u.traffic_forward + u.traffic_backward_input + u.traffic_backward_weight for u in units
        )
    )
    assert full["ops"] == sum(
        u.ops_forward + u.ops_backward_input + u.ops_backward_weight for u in units
    )
    assert full["parameters"] == sum(u.num_params for u in units)
    assert full["cache_read"] == 0 and full["fixed"] == 1
    # a frozen prefix of 2: its forward runs in eval mode without autograd (counted apart), no
    # input gradient into unit 2, no parameters updated in the prefix
    frozen = iteration_terms(units, prefix(n, 2), batch_size=batch)
    trained_traffic = (
        sum(u.traffic_forward for u in units[2:])
        + units[2].traffic_backward_weight
        + sum(u.traffic_backward_input + u.traffic_backward_weight for u in units[3:])
    )
    assert frozen["traffic"] == pytest.approx(batch * trained_traffic)
    assert frozen["frozen_traffic"] == pytest.approx(
        batch * (units[0].traffic_forward_frozen + units[1].traffic_forward_frozen)
    )
    assert frozen["ops"] == (
        units[0].ops_forward_frozen
        + units[1].ops_forward_frozen
        + sum(u.ops_forward for u in units[2:])
        + units[2].ops_backward_weight
        + sum(u.ops_backward_input + u.ops_backward_weight for u in units[3:])
    )
    assert frozen["parameters"] == sum(u.num_params for u in units[2:])
    # served from the cache: the prefix's forward is gone, its boundary is read instead
    cached = iteration_terms(units, prefix(n, 2), cached_prefix=2, batch_size=batch)
    assert cached["traffic"] == frozen["traffic"] and cached["frozen_traffic"] == 0
    assert (
        frozen["ops"] - cached["ops"] == units[0].ops_forward_frozen + units[1].ops_forward_frozen
    )
    assert cached["cache_read"] == batch * units[1].output_bytes > 0
    # LOCAL: forward plus the update, nothing flows back through it
    local = iteration_terms(units, [L, *([T] * (n - 1))], batch_size=batch)
    assert local["ops"] == full["ops"] - units[1].ops_backward_input
    with pytest.raises(ValueError, match="only a FROZEN prefix"):
        iteration_terms(units, [T] * n, cached_prefix=1)


def test_default_constants_give_the_flop_ratio(units):
    n = len(units)
    for modes, cached in [(prefix(n, 2), 0), (prefix(n, 3), 3), ([T, F_, T, T, T], 0)]:
        flop = iteration_flops(units, modes, cached) / iteration_flops(units, [T] * n)
        assert cost_ratio(units, modes, cached) == pytest.approx(flop)
        assert cost_ratio(units, modes, cached, DEFAULT_CONSTANTS) == pytest.approx(flop)


@pytest.mark.parametrize("constants", [DEFAULT_CONSTANTS, SOME], ids=["default", "fitted-like"])
def test_cost_falls_with_frozen_depth_and_the_cache_cuts_it_further(units, constants):
    n = len(units)
    uncached = [cost_ratio(units, prefix(n, k), 0, constants) for k in range(n)]
    cached = [cost_ratio(units, prefix(n, k), k, constants) for k in range(1, n)]
    assert uncached[0] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(uncached))
    assert all(a > b for a, b in itertools.pairwise(cached))
    assert all(c < u for c, u in zip(cached, uncached[1:], strict=True))
    assert all(c > 0 for c in cached)


def test_fixed_work_bounds_the_speedup(units):
    n = len(units)
    heavy_fixed = CostConstants(fixed=1e9, batch_size=16)
    assert cost_ratio(units, prefix(n, n - 1), n - 1, heavy_fixed) > 0.95
    assert cost_ratio(units, prefix(n, n - 1), n - 1) < 0.1


def test_nnls_matches_the_unconstrained_solution_or_clips_at_zero():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 1.0, (12, 3))
    x = np.array([1.0, 0.5, 2.0])
    assert _nnls(a, a @ x) == pytest.approx(x)
    b = a @ np.array([1.0, -0.5, 2.0])  # the least-squares optimum has a negative entry
    solved = _nnls(a, b)
    assert np.all(solved >= 0) and solved[1] == 0
    for column in range(3):  # no other non-negative point does better
        nudged = solved.copy()
        nudged[column] += 1e-3
        assert np.sum((a @ nudged - b) ** 2) >= np.sum((a @ solved - b) ** 2)


def test_fit_recovers_known_constants_from_synthetic_timings():
    rng = np.random.default_rng(1)
    truth = CostConstants(
        gemm_forward=1.0,
        gemm_backward=1.5,
        traffic=4.0,
        frozen_traffic=1.0,
        ops=2e4,
        parameters=0.0,  # absent on this "device": the fit must say so, not go negative
        cache_read=0.5,
        fixed=3e5,
        batch_size=32,
    )
    scale = 1e-10  # seconds per FLOP-equivalent
    magnitude = {
        "gemm_forward": 1e7,
        "gemm_backward": 2e7,
        "traffic": 1e6,
        "frozen_traffic": 1e6,
        "ops": 200,
        "parameters": 1e5,
        "cache_read": 1e6,
        "fixed": 1,
    }
    terms = [
        {t: magnitude[t] * (1.0 if t == "fixed" else rng.uniform(0, 1)) for t in TERMS}
        for _ in range(20)
    ]
    seconds = [scale * iteration_cost_from_terms(truth, row) for row in terms]
    fit = fit_constants(terms, seconds, batch_size=32, prior=0)
    assert fit.seconds_per_flop == pytest.approx(scale, rel=1e-6)
    for term in TERMS:
        assert getattr(fit.constants, term) == pytest.approx(getattr(truth, term), abs=1e-6)
    assert fit.constants.batch_size == 32
    assert fit.seconds(terms[0]) == pytest.approx(seconds[0], rel=1e-9)


def test_the_prior_settles_collinear_terms_on_the_flop_model():
    """Parameters proportional to the backward FLOPs (linear layers): the data cannot tell the
    two apart, so the weak prior gives the time to the FLOPs, and the fit stays as good."""
    rng = np.random.default_rng(2)
    terms = []
    for _ in range(10):
        backward = rng.uniform(1e6, 1e7)
        row = dict.fromkeys(TERMS, 0.0)
        row |= {"gemm_forward": rng.uniform(1e6, 1e7), "gemm_backward": backward}
        terms.append(row | {"parameters": backward / 256, "fixed": 1.0})
    truth = CostConstants(gemm_forward=1.0, gemm_backward=2.0, fixed=1e5)
    seconds = [1e-10 * iteration_cost_from_terms(truth, row) for row in terms]
    fit = fit_constants(terms, seconds, batch_size=16)
    assert fit.constants.gemm_backward == pytest.approx(2.0, rel=0.02)
    assert fit.constants.parameters * 256 < 0.02 * fit.constants.gemm_backward
    assert all(
        fit.seconds(row) == pytest.approx(t, rel=0.01)
        for row, t in zip(terms, seconds, strict=True)
    )


def iteration_cost_from_terms(constants: CostConstants, terms: dict[str, float]) -> float:
    return sum(getattr(constants, t) * terms[t] for t in TERMS)


def test_profile_fit_is_exact_when_the_device_follows_the_model(units):
    """Times generated by the model itself: in-sample and leave-one-out ratios are exact (the
    constants themselves need not be: identical blocks make some terms collinear)."""
    n, batch = len(units), 16
    plans = {str(k): (prefix(n, k), 0) for k in range(n)}
    plans |= {f"{k} cached": (prefix(n, k), k) for k in range(1, n)}
    plans |= {f"{k} alone": ([F_ if i == k else T for i in range(n)], 0) for k in range(1, n)}
    terms = {v: iteration_terms(units, *plan, batch) for v, plan in plans.items()}
    seconds = {v: 1e-10 * iteration_cost_from_terms(SOME, terms[v]) for v in plans}
    measured = {v: seconds[v] / seconds["0"] for v in plans}
    few = ("gemm_forward", "traffic", "fixed")
    _, in_sample, _ = fit_profile(terms, seconds, batch, few, prior=0)
    # a model with fewer terms than the device does not fit exactly ...
    assert any(abs(in_sample[v] / measured[v] - 1) > 1e-3 for v in plans)
    _, in_sample, loo = fit_profile(terms, seconds, batch, prior=0)
    # ... the full model does, and predicts each variant from the others (but the head frozen
    # alone: the only variant without the head's parameters, so none other pins them down)
    assert set(loo) == set(plans) - {"0"}
    for v in plans:
        assert in_sample[v] == pytest.approx(measured[v], rel=1e-6)
        if v not in ("0", f"{n - 1} alone"):
            assert loo[v] == pytest.approx(measured[v], rel=1e-3)


def test_constants_round_trip_through_a_dict():
    assert CostConstants.from_dict({**SOME.as_dict(), "unknown": 1.0}) == SOME
