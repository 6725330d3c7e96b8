"""LoCal+SGD (Frontiers in Neuroscience 2022): the units in front of a transition unit learn by
the localized rule, the transition unit and everything after it by SGD; the transition moves
deeper as training goes, by a static schedule or by the trend of its weight updates."""

from __future__ import annotations

import math

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Observation, Policy, ReferenceRun
from freeze_agent.policies.features import global_value, n_units, unit_column


def localized_modes(transition: int, observation: Observation) -> list[Mode]:
    """LOCAL before ``transition`` where the local rule applies (FROZEN where it does not: it
    cannot train by SGD upstream of a LOCAL unit), TRAIN from it on."""
    n = n_units(observation)
    transition = max(0, min(transition, n - 1))
    supports = unit_column(observation, "supports_local") > 0.5
    front = [Mode.LOCAL if supports[i] else Mode.FROZEN for i in range(transition)]
    return front + [Mode.TRAIN] * (n - transition)


class LocalSGDStatic(Policy):
    """LoCal+SGD, its transition unit moving by a static schedule.

    A reconstruction: no localized learning before ``start`` of the run, then the transition
    moves linearly so that it would reach the head at ``end``. The local rule's weak supervision
    (its rate follows the training loss trend) is the controller's."""

    registry_name = "localsgd-static"
    reads_signals = False

    def __init__(self, start: float = 0.2, end: float = 1.0) -> None:
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1, got {start} and {end}")
        self.start, self.end = start, end
        self.name = f"localsgd-static:{start:g}"

    def decide(self, observation: Observation) -> list[Mode]:
        n, progress = n_units(observation), global_value(observation, "progress")
        if progress < self.start:
            return [Mode.TRAIN] * n
        fraction = min((progress - self.start) / (self.end - self.start), 1.0)
        return localized_modes(math.ceil(fraction * (n - 1)), observation)


class LocalSGDDynamic(Policy):
    """LoCal+SGD, its transition unit moving when its weight updates level off.

    A reconstruction: after ``warmup`` of the run, the transition moves one unit deeper whenever the
    relative change, between two decisions, of the transition unit's relative weight update ||dW|| /
    ||W|| falls under ``threshold``."""

    registry_name = "localsgd-dynamic"

    def __init__(self, threshold: float = 0.1, warmup: float = 0.1) -> None:
        if threshold <= 0.0 or not 0.0 <= warmup < 1.0:
            raise ValueError(f"need threshold > 0 and warmup in [0, 1), got {threshold}, {warmup}")
        self.threshold, self.warmup = threshold, warmup
        self.name = f"localsgd-dynamic:{threshold:g}"
        self.reset()

    def reset(self, reference: ReferenceRun | None = None) -> None:
        super().reset(reference)
        self._transition = 0
        self._previous: float | None = None

    def decide(self, observation: Observation) -> list[Mode]:
        n = n_units(observation)
        update = _weight_update(observation, self._transition)
        if global_value(observation, "progress") >= self.warmup and self._transition < n - 1:
            previous = self._previous
            levelled = update is not None and previous is not None and previous > 0
            if levelled and abs(update - previous) / previous < self.threshold:
                self._transition += 1
                update = _weight_update(observation, self._transition)
        self._previous = update
        return localized_modes(self._transition, observation)


def _weight_update(observation: Observation, unit: int) -> float | None:
    """``||dW|| / ||W||`` of ``unit`` over the last interval (the observation holds it
    log-scaled: 1 + log10(x) / 6), None while unmeasured."""
    if unit_column(observation, "dynamics_missing")[unit] > 0.5:
        return None
    scaled = float(unit_column(observation, "weight_change")[unit])
    return 10.0 ** (6.0 * (scaled - 1.0)) if scaled > 0.0 else 0.0
