"""The reward of the freeze environment: throughput gained minus accuracy lost.

Per decision interval the agent earns the fraction of the run's all-TRAIN cost that the interval
saved, so the per-step rewards of an episode add up to the fraction of the whole run saved
(1 - cost ratio). It pays for validation loss above the same-seed all-TRAIN reference at the same
point of training, as a fraction of the loss reduction the reference achieves over its run and
weighted by the interval's share of the run. (Relative to the reference loss itself, a model that
has converged to a near-zero loss would pay heavily for differences that change no prediction.)
At the end it pays for final validation accuracy lost beyond a tolerance. A run that diverges
ends at once with a fixed penalty. Both penalties saturate, so that one ruined run does not
swamp the value estimates of every other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class RewardConfig:
    """Weights and tolerance of the reward.

    Args:
        loss_weight: penalty per unit of validation-loss excess over the reference, measured
            in the reference's loss reduction over the run and integrated over the run (at 1,
            lagging 10% of that reduction behind the reference for the whole run costs as much
            as saving 10% of the compute earns).
        accuracy_weight: final penalty per percentage point of validation accuracy lost beyond
            ``tolerance_pp``. At 0.5, a 1.3x speedup (saving 0.23 of the run) is worth less
            than half a point lost beyond the tolerance.
        tolerance_pp: accuracy loss (percentage points) that costs nothing.
        max_loss_excess: validation-loss excess (in the same unit) beyond which the penalty
            stops growing.
        max_accuracy_penalty: most the final accuracy penalty can cost.
        divergence_penalty: paid once when the training loss becomes non-finite.
        cost: "modeled" rewards the cost model's saving (deterministic); "measured" rewards the
            wall time saved against the reference run's measured time.
    """

    loss_weight: float = 1.0
    accuracy_weight: float = 0.5
    tolerance_pp: float = 0.5
    max_loss_excess: float = 1.0
    max_accuracy_penalty: float = 2.0
    divergence_penalty: float = 1.0
    cost: Literal["modeled", "measured"] = "modeled"

    def __post_init__(self) -> None:
        if self.cost not in ("modeled", "measured"):
            raise ValueError(f"cost must be 'modeled' or 'measured', got {self.cost!r}")
        for name, value in asdict(self).items():
            if name == "cost":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def saving(interval_share: float, cost_ratio: float) -> float:
    """Fraction of the whole run's all-TRAIN cost saved by one interval that took
    ``interval_share`` of the run's steps at ``cost_ratio`` of the all-TRAIN cost per step."""
    return interval_share * (1.0 - cost_ratio)


def loss_penalty(
    config: RewardConfig,
    interval_share: float,
    val_loss: float,
    reference_val_loss: float,
    loss_reduction: float,
) -> float:
    """Penalty for validation loss above the reference at the same point of training.

    ``loss_reduction`` is the reference run's: its validation loss at initialization minus its
    lowest; the excess is measured in it."""
    if loss_reduction <= 0:
        return 0.0
    excess = (val_loss - reference_val_loss) / loss_reduction
    if not math.isfinite(excess):  # a non-finite validation loss is as bad as it gets
        excess = config.max_loss_excess
    excess = min(max(excess, 0.0), config.max_loss_excess)
    return config.loss_weight * interval_share * excess


def accuracy_penalty(config: RewardConfig, val_accuracy: float, reference_accuracy: float) -> float:
    """Final penalty for validation accuracy (fractions in [0, 1]) lost beyond the tolerance."""
    lost_pp = 100.0 * (reference_accuracy - val_accuracy)
    penalty = config.accuracy_weight * max(0.0, lost_pp - config.tolerance_pp)
    return min(penalty, config.max_accuracy_penalty)
