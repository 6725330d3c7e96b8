"""Modeled cost of one training iteration for any assignment of modes.

Per unit, with F the forward FLOPs, B_x the backward to the input and B_w the backward to the
weights:

* TRAIN: F + B_w, plus B_x if any unit upstream still trains (someone needs the gradient);
* FROZEN: F, plus B_x if any unit upstream still trains; 0 when served from the activation cache;
* LOCAL: F plus one weight-gradient-shaped GEMM (about B_w) for the local update; nothing flows
  back through it.

FLOPs alone miss the work that is not a GEMM, which dominates once most GEMMs are gone: the
memory-bound operators (normalization, activations, pooling, dropout), the per-operator dispatch
overhead, the per-weight work of the units that train (the optimizer step, gradient
accumulation), reading the cached boundary activation, and what no mode removes (the loss,
zeroing gradients, the loop). So an iteration costs a sum of *terms*, each a count taken from
the units (``units.py`` counts them once, at partition time, split into forward /
backward-to-input / backward-to-weights like the FLOPs) times a device constant:

==================  ==================================================================  =======
term                count per iteration (B = batch size; sums over the units that run)   default
==================  ==================================================================  =======
``gemm_forward``    B · F                                                                1
``gemm_backward``   B · (B_x + B_w), by the rules above                                  1
``traffic``         B · bytes read and written by the memory-bound ops, same rules       0
``frozen_traffic``  B · the same in the forward of a frozen prefix (see below)           0
``ops``             operators dispatched, same rules                                     0
``parameters``      parameter elements updated (TRAIN and LOCAL units)                   0
``cache_read``      B · bytes of the boundary activation read from the cache             0
``fixed``           1                                                                    0
==================  ==================================================================  =======

A FROZEN unit with no TRAIN unit upstream runs its forward in eval mode without autograd: norm
layers use their running statistics and pooling keeps no indices, kernels several times faster
per byte than their training versions, hence a term of their own.

Constants are in FLOP-equivalents (``gemm_forward`` = 1 sets the scale; only ratios matter).
The defaults reduce to the plain FLOP ratio. A device's constants are fitted to measured
iteration times by ``fit_constants`` (``freeze-agent profile`` does it), non-negative least
squares on relative error, with a small penalty on all but the FLOP terms. The terms are partly
collinear (a unit's parameters, its weight-gradient FLOPs and its operators grow together), so
individual fitted constants are effective values, not kernel costs; what the fit is judged by
is how well it predicts iteration times.
``cost_ratio`` divides by the all-TRAIN cost of the same model.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from freeze_agent.core.modes import Mode
from freeze_agent.core.units import Unit

TERMS: tuple[str, ...] = (
    "gemm_forward",
    "gemm_backward",
    "traffic",
    "frozen_traffic",
    "ops",
    "parameters",
    "cache_read",
    "fixed",
)


@dataclass(frozen=True)
class CostConstants:
    """Device constants of the cost model, in FLOP-equivalents per unit of each term."""

    gemm_forward: float = 1.0
    """per forward GEMM/convolution FLOP"""
    gemm_backward: float = 1.0
    """per backward GEMM/convolution FLOP"""
    traffic: float = 0.0
    """per byte read or written by a memory-bound operator (with autograd, train mode)"""
    frozen_traffic: float = 0.0
    """the same in the forward of a frozen prefix (eval mode, no autograd): other kernels run"""
    ops: float = 0.0
    """per operator dispatched"""
    parameters: float = 0.0
    """per parameter element updated (the optimizer step or the local rule)"""
    cache_read: float = 0.0
    """per byte of boundary activation served from the activation cache"""
    fixed: float = 0.0
    """per iteration, whatever the modes"""
    batch_size: int = 128
    """the batch an iteration is modeled at: per-sample counts are multiplied by it"""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, float]) -> CostConstants:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def weights(self) -> np.ndarray:
        return np.array([getattr(self, term) for term in TERMS], dtype=float)


DEFAULT_CONSTANTS = CostConstants()


def iteration_terms(
    units: Sequence[Unit], modes: Sequence[Mode], cached_prefix: int = 0, batch_size: int = 128
) -> dict[str, float]:
    """The count of every term for one iteration of ``modes`` at ``batch_size``; the first
    ``cached_prefix`` units (all FROZEN) are served from the activation cache."""
    per_sample = dict.fromkeys(("gemm_forward", "gemm_backward", "traffic", "frozen_traffic"), 0.0)
    ops = parameters = 0.0
    trains_upstream = False
    for i, (unit, mode) in enumerate(zip(units, modes, strict=True)):
        if i < cached_prefix:
            if mode is not Mode.FROZEN:
                raise ValueError(f"unit {i} is {mode.name}; only a FROZEN prefix can be cached")
            continue
        per_sample["gemm_forward"] += unit.flops_forward
        if mode is Mode.FROZEN and not trains_upstream:  # eval mode, no autograd
            per_sample["frozen_traffic"] += unit.traffic_forward_frozen
            ops += unit.ops_forward_frozen
        else:
            per_sample["traffic"] += unit.traffic_forward
            ops += unit.ops_forward
        if trains_upstream and mode is not Mode.LOCAL:
            per_sample["gemm_backward"] += unit.flops_backward_input
            per_sample["traffic"] += unit.traffic_backward_input
            ops += unit.ops_backward_input
        if mode is not Mode.FROZEN:  # TRAIN's weight gradient, LOCAL's update GEMM
            per_sample["gemm_backward"] += unit.flops_backward_weight
            per_sample["traffic"] += unit.traffic_backward_weight
            ops += unit.ops_backward_weight
            parameters += unit.num_params
        trains_upstream = trains_upstream or mode is Mode.TRAIN
    cache = units[cached_prefix - 1].output_bytes if cached_prefix > 0 else 0.0
    return {
        **{term: batch_size * value for term, value in per_sample.items()},
        "ops": ops,
        "parameters": parameters,
        "cache_read": batch_size * cache,
        "fixed": 1.0,
    }


def iteration_cost(
    units: Sequence[Unit],
    modes: Sequence[Mode],
    cached_prefix: int = 0,
    constants: CostConstants = DEFAULT_CONSTANTS,
) -> float:
    """Modeled cost of one iteration in FLOP-equivalents."""
    terms = iteration_terms(units, modes, cached_prefix, constants.batch_size)
    return sum(getattr(constants, term) * terms[term] for term in TERMS)


def iteration_flops(units: Sequence[Unit], modes: Sequence[Mode], cached_prefix: int = 0) -> float:
    """Modeled per-sample GEMM FLOPs of one iteration (the FLOP-only part of the model)."""
    terms = iteration_terms(units, modes, cached_prefix, batch_size=1)
    return terms["gemm_forward"] + terms["gemm_backward"]


def cost_ratio(
    units: Sequence[Unit],
    modes: Sequence[Mode],
    cached_prefix: int = 0,
    constants: CostConstants | None = None,
) -> float:
    """Modeled cost of ``modes`` divided by the cost with every unit in TRAIN (with the default
    constants, the FLOP ratio)."""
    constants = constants or DEFAULT_CONSTANTS
    full = iteration_cost(units, [Mode.TRAIN] * len(units), 0, constants)
    if full <= 0:
        return 1.0
    return iteration_cost(units, modes, cached_prefix, constants) / full


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class Fit:
    """Constants fitted to measured iteration times."""

    constants: CostConstants
    seconds_per_flop: float
    """seconds per FLOP-equivalent: modeled seconds = this × ``iteration_cost``"""

    def seconds(self, terms: Mapping[str, float]) -> float:
        weights = self.constants.weights()
        return self.seconds_per_flop * float(weights @ np.array([terms[t] for t in TERMS]))


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ‖a x − b‖ over x ≥ 0, exactly, by trying every support (a handful of columns)."""
    n = a.shape[1]
    best, best_residual = np.zeros(n), float(b @ b)
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(x < 0):
                continue
            residual = float(np.sum((a[:, cols] @ x - b) ** 2))
            if residual < best_residual - 1e-15 * max(best_residual, 1.0):
                best = np.zeros(n)
                best[cols] = x
                best_residual = residual
    return best


def fit_constants(
    terms: Sequence[Mapping[str, float]],
    seconds: Sequence[float],
    batch_size: int,
    fit: Sequence[str] = TERMS,
    weights: Sequence[float] | None = None,
    prior: float = 1e-3,
) -> Fit:
    """Non-negative constants (seconds per unit of each term) that best explain measured
    ``seconds`` per iteration from the term counts of each measured variant, minimizing the
    (``weights``-weighted) squared *relative* error.

    Terms are partly collinear (in a linear layer the weight-gradient FLOPs are proportional to
    the parameters), so nearly equal fits can split the time between terms very differently. A
    small penalty on every term but the FLOPs settles such ties on the FLOP model: the other
    terms explain only what FLOPs cannot. A term's share of the variant where it weighs most
    costs, squared, ``prior`` times as much as the same relative error on one variant (so a
    100% share costs like a 3% error); ``prior`` 0 turns it off.

    Returned in FLOP-equivalents: scaled so that ``gemm_forward`` is 1 (or ``gemm_backward``, if
    the fit left ``gemm_forward`` at 0; if both are 0, 1 FLOP-equivalent is 1 ps). Terms not in
    ``fit`` are held at 0."""
    if len(terms) != len(seconds) or not terms:
        raise ValueError("need one measured time per variant, and at least one variant")
    columns = [t for t in TERMS if t in fit]
    times = np.asarray(seconds, dtype=float)
    w = np.ones(len(times)) if weights is None else np.asarray(weights, dtype=float)
    a = np.array([[row[t] for t in columns] for row in terms], dtype=float)
    a *= (w / times)[:, None]
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    a /= scale
    b = w
    others = [i for i, t in enumerate(columns) if t not in ("gemm_forward", "gemm_backward")]
    if prior > 0 and others:  # a small penalty on every term but the FLOPs
        a = np.vstack([a, np.sqrt(prior) * np.eye(len(columns))[others]])
        b = np.concatenate([b, np.zeros(len(others))])
    x = _nnls(a, b) / scale
    per_term = dict.fromkeys(TERMS, 0.0) | dict(zip(columns, x.tolist(), strict=True))
    unit = per_term["gemm_forward"] or per_term["gemm_backward"] or 1e-12
    constants = replace(
        CostConstants(**{t: per_term[t] / unit for t in TERMS}), batch_size=batch_size
    )
    return Fit(constants=constants, seconds_per_flop=unit)
