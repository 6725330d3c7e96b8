"""Reading an observation the way the hand-written policies need it: per-unit columns of the
real units, the global progress and learning-rate ratio, and the frozen prefix."""

from __future__ import annotations

import numpy as np

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Observation
from freeze_agent.signals.observation import GLOBAL_FEATURES, UNIT_FEATURES


def n_units(observation: Observation) -> int:
    return int(observation["mask"].sum())


def unit_column(observation: Observation, feature: str) -> np.ndarray:
    """One feature of every real unit, as float64."""
    return observation["units"][: n_units(observation), UNIT_FEATURES.index(feature)].astype(
        np.float64
    )


def global_value(observation: Observation, feature: str) -> float:
    return float(observation["global"][GLOBAL_FEATURES.index(feature)])


def frozen_prefix(observation: Observation) -> int:
    """How many units from the front are FROZEN now."""
    frozen = unit_column(observation, f"mode_{Mode.FROZEN.name.lower()}") > 0.5
    return int(np.argmin(frozen)) if not frozen.all() else len(frozen)


def prefix_modes(frozen: int, n: int, mode: Mode = Mode.FROZEN) -> list[Mode]:
    """The first ``frozen`` of ``n`` units in ``mode`` (never the head), the rest TRAIN."""
    frozen = max(0, min(frozen, n - 1))
    return [mode] * frozen + [Mode.TRAIN] * (n - frozen)
