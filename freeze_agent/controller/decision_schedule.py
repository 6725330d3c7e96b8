"""When a controller with a policy decides: at step 0 and every ``interval_steps`` after it.

The interval follows the project's trainer: ``ceil(total_steps / decisions)`` steps, so a run
of ``total_steps`` gets ``decisions`` decisions, the first before any training, as the policies
were trained to expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from freeze_agent.core.checks import require_int


@dataclass(frozen=True)
class DecisionSchedule:
    """Decide at optimizer steps 0, ``interval_steps``, 2 ``interval_steps``... while the run
    lasts (``total_steps``; None: no end known)."""

    interval_steps: int
    total_steps: int | None = None

    @classmethod
    def plan(
        cls, total_steps: int | None, decisions: int = 30, interval_steps: int | None = None
    ) -> DecisionSchedule:
        """The schedule for a run of ``total_steps`` optimizer steps split into ``decisions``
        intervals, or with a fixed ``interval_steps`` (which wins when both are given)."""
        if total_steps is not None:
            require_int("total_steps", total_steps, 1)
        if interval_steps is not None:
            require_int("interval_steps", interval_steps, 1)
            return cls(interval_steps, total_steps)
        if total_steps is None:
            raise ValueError(
                "a controller that decides by itself needs the run's length: pass total_steps "
                "(the optimizer steps the run will take, e.g. epochs * len(loader)) or "
                "interval_steps (optimizer steps between two decisions)"
            )
        require_int("decisions", decisions, 1)
        return cls(max(1, math.ceil(total_steps / decisions)), total_steps)

    def due(self, step: int) -> bool:
        """Is a decision due before optimizer step ``step`` (0-based) runs?"""
        within = self.total_steps is None or step < self.total_steps
        return within and step % self.interval_steps == 0
