"""AutoFreeze (Liu et al., 2021): freeze the front units whose gradient stopped changing."""

from __future__ import annotations

import numpy as np

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Observation, Policy
from freeze_agent.policies.features import frozen_prefix, n_units, prefix_modes, unit_column


def gradient_change(observation: Observation) -> np.ndarray:
    """AutoFreeze's r_l = |G_l(prev) - G_l| / G_l(prev) of every real unit, NaN where unmeasured
    (the observation holds r / (1 + r))."""
    squashed = unit_column(observation, "grad_change")
    missing = unit_column(observation, "dynamics_missing") > 0.5
    with np.errstate(divide="ignore"):
        r = squashed / np.maximum(1.0 - squashed, 1e-12)
    r[missing] = np.nan
    return r


class AutoFreeze(Policy):
    """AutoFreeze's rule: freeze the front units whose gradient norm stopped changing.

    Per interval the controller accumulates each unit's gradient, G_l = ||sum_steps grad||_1,
    and its relative change against the previous interval, r_l. The threshold is the median of
    r_l over the active (training) units; the frozen prefix grows up to, not including, the
    first active unit with r_l >= threshold. A unit whose change is not measured yet stops the
    prefix. The head always trains, and nothing ever unfreezes.
    """

    registry_name = "autofreeze"
    name = "autofreeze"

    def decide(self, observation: Observation) -> list[Mode]:
        n = n_units(observation)
        start = frozen_prefix(observation)
        r = gradient_change(observation)
        active = r[start : n - 1]
        if active.size == 0 or np.isnan(active).all():
            return prefix_modes(start, n)
        threshold = float(np.nanmedian(active))
        frozen = start
        for value in active:
            if np.isnan(value) or value >= threshold:
                break
            frozen += 1
        return prefix_modes(frozen, n)
