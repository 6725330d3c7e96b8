"""Hand-written freeze policies: the baselines a learned policy is measured against."""

from __future__ import annotations

import math
from pathlib import Path

from freeze_agent.modes import Mode
from freeze_agent.observation import GLOBAL_FEATURES
from freeze_agent.policy import Observation, Policy

_PROGRESS = GLOBAL_FEATURES.index("progress")


class NoFreeze(Policy):
    """Every unit trains for the whole run: the reference every speedup is measured against."""

    name = "none"

    def decide(self, observation: Observation) -> list[Mode]:
        return [Mode.TRAIN] * int(observation["mask"].sum())


class LinearPrefix(Policy):
    """Freeze a growing prefix of units, linearly in training progress.

    Nothing is frozen before ``start`` (a fraction of the run); from there the frozen prefix grows
    linearly so that every unit but the head would be frozen at the end of the run. Composer's
    LayerFreezing uses the same shape from 50% of training.
    """

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
        k = self.frozen_count(float(observation["global"][_PROGRESS]), n)
        return [Mode.FROZEN] * k + [Mode.TRAIN] * (n - k)


BASELINES: dict[str, type[Policy]] = {"none": NoFreeze, "linear-prefix": LinearPrefix}


POLICIES_DIR = Path(__file__).resolve().parent.parent / "policies"


def make_policy(spec: str) -> Policy:
    """A policy from its command-line name: a trained policy's folder (``policies/default``, or
    just ``default`` for one shipped in ``policies/``), ``none``, ``linear-prefix`` or
    ``linear-prefix:0.1``."""
    for folder in (Path(spec), POLICIES_DIR / spec):
        if (folder / "policy.json").is_file():
            from freeze_agent.artifact import LearnedPolicy

            return LearnedPolicy.load(folder)
    name, _, argument = spec.partition(":")
    if name not in BASELINES:
        shipped = sorted(p.parent.name for p in POLICIES_DIR.glob("*/policy.json"))
        raise ValueError(
            f"unknown policy {spec!r}: not a policy folder (no policy.json there) nor a baseline; "
            f"choose a folder, one of the shipped policies ({', '.join(shipped) or 'none yet'}) "
            f"or a baseline ({', '.join(BASELINES)})"
        )
    if not argument:
        return BASELINES[name]()
    try:
        value = float(argument)
    except ValueError as error:
        raise ValueError(f"policy {name}: {argument!r} is not a number") from error
    if name != "linear-prefix":
        raise ValueError(f"policy {name} takes no argument")
    return LinearPrefix(value)
