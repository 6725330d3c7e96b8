"""Fixed schedules of a frozen prefix: none, linear (Composer's LayerFreezing) and geometric
(PipeTransformer)."""

from __future__ import annotations

import math

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Observation, Policy
from freeze_agent.policies.features import global_value, n_units, prefix_modes

__all__ = ["Geometric", "LinearPrefix", "NoFreeze", "prefix_modes"]


class NoFreeze(Policy):
    """Every unit trains for the whole run: the reference every speedup is measured against."""

    name = "none"
    registry_name = "none"
    reads_signals = False

    def decide(self, observation: Observation) -> list[Mode]:
        return [Mode.TRAIN] * n_units(observation)


class LinearPrefix(Policy):
    """A frozen prefix growing linearly from ``start`` of training (Composer's LayerFreezing).

    Nothing is frozen before ``start`` (a fraction of the run); from there the frozen prefix grows
    linearly so that every unit but the head is frozen at ``end`` of the run (Composer's
    ``freeze_start`` and ``freeze_level``; its defaults are 0.5 and 1.0).
    """

    registry_name = "linear"
    reads_signals = False
    aliases = ("linear-prefix",)

    def __init__(self, start: float = 0.3, end: float = 1.0) -> None:
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(
                f"start must be a fraction of training before end (0 <= start < end <= 1), got "
                f"start={start}, end={end}"
            )
        self.start, self.end = start, end
        self.name = f"linear:{start:g}" if end == 1.0 else f"linear:{start:g},{end:g}"

    def frozen_count(self, progress: float, n_units: int) -> int:
        if progress < self.start or n_units < 2:
            return 0
        fraction = min((progress - self.start) / (self.end - self.start), 1.0)
        return min(n_units - 1, math.ceil(fraction * (n_units - 1)))

    def decide(self, observation: Observation) -> list[Mode]:
        n = n_units(observation)
        return prefix_modes(self.frozen_count(global_value(observation, "progress"), n), n)


class Geometric(Policy):
    """PipeTransformer's geometric schedule (He et al., ICML 2021).

    After freeze step ``T`` the frozen prefix holds ``ceil(L * (1 - (1 - alpha)^T))`` of the
    ``L`` units before the head. A reconstruction: PipeTransformer takes a freeze step per
    epoch; here the run is split into ``steps`` equal freeze steps, whatever its epochs.
    """

    registry_name = "geometric"
    reads_signals = False

    def __init__(self, alpha: float = 1 / 3, steps: int = 10) -> None:
        if not 0.0 < alpha < 1.0 or steps < 1:
            raise ValueError(f"alpha must lie in (0, 1) and steps be >= 1, got {alpha}, {steps}")
        self.alpha, self.steps = alpha, steps
        self.name = f"geometric:{alpha:.3g},{steps}"

    def frozen_count(self, progress: float, n_units: int) -> int:
        step = math.floor(progress * self.steps)
        if step <= 0 or n_units < 2:
            return 0
        frozen = math.ceil((n_units - 1) * (1.0 - (1.0 - self.alpha) ** step))
        return min(frozen, n_units - 1)

    def decide(self, observation: Observation) -> list[Mode]:
        n = n_units(observation)
        return prefix_modes(self.frozen_count(global_value(observation, "progress"), n), n)
