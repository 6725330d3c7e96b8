"""Fixed schedules: no freezing, and a frozen prefix growing linearly in training progress."""

from __future__ import annotations

import math

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Observation, Policy
from freeze_agent.signals.observation import GLOBAL_FEATURES

_PROGRESS = GLOBAL_FEATURES.index("progress")


def prefix_modes(frozen: int, n_units: int) -> list[Mode]:
    """The first ``frozen`` of ``n_units`` units FROZEN, the rest TRAIN."""
    return [Mode.FROZEN] * frozen + [Mode.TRAIN] * (n_units - frozen)


class NoFreeze(Policy):
    """Every unit trains for the whole run: the reference every speedup is measured against."""

    name = "none"
    registry_name = "none"

    def decide(self, observation: Observation) -> list[Mode]:
        return [Mode.TRAIN] * int(observation["mask"].sum())


class LinearPrefix(Policy):
    """A frozen prefix growing linearly from ``start`` of training (Composer's LayerFreezing).

    Nothing is frozen before ``start`` (a fraction of the run); from there the frozen prefix grows
    linearly so that every unit but the head would be frozen at the end of the run. Composer's
    LayerFreezing uses the same shape from 50% of training.
    """

    registry_name = "linear-prefix"

    def __init__(self, start: float = 0.3) -> None:
        if not 0.0 <= start < 1.0:
            raise ValueError(f"start must be a fraction of training in [0, 1), got {start}")
        self.start = start
        self.name = f"linear-prefix:{start:g}"

    def frozen_count(self, progress: float, n_units: int) -> int:
        if progress < self.start or n_units < 2:
            return 0
        fraction = (progress - self.start) / (1.0 - self.start)
        return min(n_units - 1, math.ceil(fraction * (n_units - 1)))

    def decide(self, observation: Observation) -> list[Mode]:
        n = int(observation["mask"].sum())
        return prefix_modes(self.frozen_count(float(observation["global"][_PROGRESS]), n), n)
