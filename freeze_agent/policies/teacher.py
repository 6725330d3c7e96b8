"""The plateau teacher: a privileged policy that knows where freezing is safe.

It reads the episode's all-TRAIN reference trajectory, which the agent never sees, and freezes
nothing until the reference's validation loss has done all but ``tolerance`` of its
improvement; then a prefix of units that grows linearly to every unit but the head by the end of
the run (``LinearPrefix`` from that point). Tasks that converge early are frozen early; tasks
still learning at the end of their budget are barely frozen. PPO is kick-started by imitating it
(``freeze_agent.rl.imitation``), and evaluation tables show it as an upper reference.
"""

from __future__ import annotations

import numpy as np

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Observation, Policy, ReferenceRun
from freeze_agent.policies.schedules import LinearPrefix, prefix_modes


class PlateauTeacher(Policy):
    """The plateau teacher: a frozen prefix once the reference's loss plateaus (privileged).

    The plateau is the first interval after which the reference's validation loss is within
    ``tolerance`` of its best, as a fraction of its improvement over the run:
    ``(L_i - min L) / (L_0 - min L) < tolerance``.
    """

    registry_name = "teacher"
    privileged = True
    reads_signals = False

    def __init__(self, tolerance: float = 0.05) -> None:
        if not 0.0 < tolerance < 1.0:
            raise ValueError(f"tolerance must lie in (0, 1), got {tolerance}")
        self.tolerance = tolerance
        self.name = f"teacher:{tolerance:g}"
        self._schedule: LinearPrefix | None = None
        self._intervals = 0
        self._decisions = 0

    def freeze_start(self, reference: ReferenceRun) -> float:
        """The fraction of the run after which the teacher starts freezing."""
        losses = np.asarray(reference.val_losses, dtype=np.float64)
        improvement = losses[0] - losses.min()
        if not np.isfinite(improvement) or improvement <= 0.0:
            return 1.0  # the reference never improved on its first interval: never freeze
        remaining = (losses - losses.min()) / improvement
        plateau = int(np.argmax(remaining < self.tolerance))
        return (plateau + 1) / len(losses)

    def reset(self, reference: ReferenceRun | None = None) -> None:
        super().reset(reference)
        start = self.freeze_start(reference)
        self._schedule = LinearPrefix(start) if start < 1.0 else None
        self._intervals = len(reference.val_losses)
        self._decisions = 0

    def decide(self, observation: Observation) -> list[Mode]:
        """The modes of the next decision: decisions are counted from ``reset``, one interval
        of the reference run each."""
        if self._intervals == 0:
            raise RuntimeError(
                f"{self.name}: call reset(reference) with the run's all-TRAIN reference first"
            )
        n_units = int(observation["mask"].sum())
        progress = self._decisions / self._intervals
        self._decisions += 1
        if self._schedule is None:
            return [Mode.TRAIN] * n_units
        return prefix_modes(self._schedule.frozen_count(progress, n_units), n_units)
