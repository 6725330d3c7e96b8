"""FreezeOut (Brock et al., 2017): unit i of L stops training at t_i = (t0 + (1 - t0) i / L)^3
of the run, after its own cosine learning rate, scaled by 1 / t_i, has annealed to zero there."""

from __future__ import annotations

import math

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Observation, Policy
from freeze_agent.policies.features import global_value, n_units


class FreezeOut(Policy):
    """FreezeOut's cubic schedule, with per-unit cosine learning rates (the scaled variant).

    Unit i (the head is i = L, so t_L = 1 and it trains to the end) freezes at
    ``t_i = (t0 + (1 - t0) * i / L) ** 3``. Before that its learning rate is FreezeOut's
    ``lr / t_i * (1 + cos(pi * t / t_i)) / 2``. The task's own schedule still applies on top, so
    the scale returned is FreezeOut's per-unit curve relative to a cosine over the whole run:
    on a cosine schedule the unit's learning rate is exactly FreezeOut's, and the head keeps
    the task's. FreezeOut puts frozen layers in eval mode and detaches their outputs, which the
    controller does for FROZEN units.
    """

    registry_name = "freezeout"
    reads_signals = False

    def __init__(self, t0: float = 0.8, scaled: bool = True) -> None:
        if not 0.0 < t0 <= 1.0:
            raise ValueError(f"t0 must lie in (0, 1], got {t0}")
        self.t0, self.scaled = t0, scaled
        self.name = f"freezeout:{t0:g}"
        self._scales: list[float] | None = None

    def freeze_times(self, n: int) -> list[float]:
        """t_i of each unit of a model with ``n`` units (the head's is 1)."""
        last = max(n - 1, 1)
        return [(self.t0 + (1.0 - self.t0) * i / last) ** 3 for i in range(n)]

    def reset(self, reference=None) -> None:
        super().reset(reference)
        self._scales = None

    def decide(self, observation: Observation) -> list[Mode]:
        n, progress = n_units(observation), global_value(observation, "progress")
        times = self.freeze_times(n)
        modes = [
            Mode.FROZEN if progress >= t and i < n - 1 else Mode.TRAIN for i, t in enumerate(times)
        ]
        whole_run = 0.5 * (1.0 + math.cos(math.pi * progress))
        scales = []
        for t_i, mode in zip(times, modes, strict=True):
            if mode is Mode.FROZEN or t_i >= 1.0 or whole_run <= 0.0:
                scales.append(1.0)
                continue
            own = 0.5 * (1.0 + math.cos(math.pi * min(progress / t_i, 1.0)))
            scales.append((own / t_i if self.scaled else own) / whole_run)
        self._scales = scales
        return modes

    def learning_rate_scales(self) -> list[float] | None:
        return self._scales
