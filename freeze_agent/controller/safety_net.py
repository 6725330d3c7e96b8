"""The safety net: when accuracy slips or training goes wrong after a freeze, unfreeze.

A policy deployed on a model it has never seen can freeze too early. The net watches two things
and, when either says the run is being hurt, the controller returns the most recently frozen
units to TRAIN and holds them there for a while (``FreezeController`` does the unfreezing):

* the validation metric the user reports (``FreezeController.report_validation``): it fires
  when the metric falls behind its best so far by more than ``tolerance``;
* the training loss, every decision: it fires when the loss is not finite, or exceeds
  ``divergence_factor`` times its lowest interval mean while also having given back
  ``divergence_regress`` of the progress made since the first interval (divergence: near the
  end of a run, three times a loss of 0.004 is noise, not a blow-up), and, only while no
  validation metric has been reported, when the interval loss stays above its lowest value
  before the latest freeze by more than ``loss_tolerance`` (relative) for ``patience``
  decisions in a row.

The net only fires while something is frozen or local, and never twice within a hold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Alarm:
    """Why the net fires; ``urgent`` (a non-finite or diverging loss) acts even during a hold."""

    reason: str
    urgent: bool = False


@dataclass
class SafetyNetEvent:
    """One intervention: what fired, when, and which units went back to TRAIN until when."""

    step: int
    reason: str
    units: list[int]
    hold_until_step: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SafetyNet:
    """Decides when the run needs its recently frozen units back (see the module docstring).

    Args:
        tolerance: how far (in the metric's own units) a reported validation metric may fall
            behind its best before the net fires: 0.005 is half a point of accuracy given as
            a fraction; pass a loss-scale value when reporting a loss.
        hold_decisions: decisions the unfrozen units stay in TRAIN, whatever the policy asks.
        loss_tolerance: relative rise of the training loss over its pre-freeze low that counts
            as harm when no validation metric is reported.
        patience: decisions in a row the loss must stay that high.
        divergence_factor: interval loss over its lowest value beyond which training diverges.
        divergence_regress: share of the progress since the first interval (its loss minus the
            lowest) that a diverging loss must also have given back.
    """

    tolerance: float = 0.005
    hold_decisions: int = 3
    loss_tolerance: float = 0.10
    patience: int = 2
    divergence_factor: float = 3.0
    divergence_regress: float = 0.5
    best: float | None = None
    """Best reported metric so far, sign-adjusted so that higher is better."""
    reports: int = 0
    lowest_loss: float = math.inf
    first_loss: float | None = None
    loss_before_freeze: float | None = None
    """The lowest interval loss before the latest freeze (the loss-trend baseline)."""
    _high_streak: int = 0
    events: list[SafetyNetEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("tolerance", "loss_tolerance", "divergence_factor", "divergence_regress"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"safety net {name} must be a positive number, got {value!r}")
        for name in ("hold_decisions", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"safety net {name} must be an integer >= 1, got {value!r}")

    def froze(self) -> None:
        """A unit just left TRAIN: the loss-trend baseline becomes the low before it."""
        self.loss_before_freeze = self.lowest_loss if math.isfinite(self.lowest_loss) else None
        self._high_streak = 0

    def report(
        self, metric: float, *, higher_is_better: bool = True, tolerance: float | None = None
    ) -> Alarm | None:
        """Take a validation result; returns why the net fires, or None."""
        metric = float(metric)
        self.reports += 1
        if not math.isfinite(metric):
            return Alarm(f"the validation metric is {metric}", urgent=True)
        score = metric if higher_is_better else -metric
        if self.best is None or score > self.best:
            self.best = score
            return None
        allowed = self.tolerance if tolerance is None else tolerance
        if self.best - score > allowed:
            best = self.best if higher_is_better else -self.best
            return Alarm(
                f"the validation metric {metric:.4g} fell {self.best - score:.3g} behind its "
                f"best {best:.4g} (tolerance {allowed:.3g})"
            )
        return None

    def watch_loss(self, loss: float) -> Alarm | None:
        """Take a decision interval's mean training loss; returns why the net fires, or None."""
        if not math.isfinite(loss):
            return Alarm(f"the training loss is {loss}", urgent=True)
        if self._diverges(loss):
            return Alarm(
                f"training diverges: the interval loss {loss:.4g} is over "
                f"{self.divergence_factor:g}x its lowest, {self.lowest_loss:.4g}, and has given "
                f"back over {self.divergence_regress:.0%} of the progress from the first "
                f"interval's {self.first_loss:.4g}",
                urgent=True,
            )
        if self.first_loss is None:
            self.first_loss = loss
        self.lowest_loss = min(self.lowest_loss, loss)
        baseline = self.loss_before_freeze
        if self.reports or baseline is None:
            return None
        self._high_streak = (
            self._high_streak + 1 if loss > baseline * (1 + self.loss_tolerance) else 0
        )
        if self._high_streak >= self.patience:
            self._high_streak = 0
            return Alarm(
                f"the training loss {loss:.4g} stayed over {1 + self.loss_tolerance:g}x its "
                f"pre-freeze low {baseline:.4g} for {self.patience} decisions"
            )
        return None

    def _diverges(self, loss: float) -> bool:
        if self.first_loss is None or not math.isfinite(self.lowest_loss):
            return False
        progress = max(self.first_loss - self.lowest_loss, 0.0)
        return (
            loss > self.divergence_factor * self.lowest_loss
            and loss - self.lowest_loss > self.divergence_regress * progress
        )

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["events"] = [event.to_dict() for event in self.events]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self.events = [SafetyNetEvent(**event) for event in state["events"]]
