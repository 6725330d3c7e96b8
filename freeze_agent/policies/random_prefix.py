"""A sanity floor: a frozen prefix of random length at every decision."""

from __future__ import annotations

import numpy as np

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Observation, Policy, ReferenceRun
from freeze_agent.policies.features import n_units, prefix_modes


class RandomPrefix(Policy):
    """A frozen prefix of random length at every decision, ``fraction`` of the units on average.

    At every decision it freezes a prefix of ``Binomial(L, fraction)`` of the ``L`` units before
    the head, so that on average ``fraction`` of them are frozen; drawn from ``seed``, again at
    every reset, so runs repeat. Any informed policy should beat it at the same frozen fraction."""

    registry_name = "random"
    reads_signals = False

    def __init__(self, fraction: float = 0.3, seed: int = 0) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
        self.fraction, self.seed = fraction, seed
        self.name = f"random:{fraction:g}"
        self.reset()

    def reset(self, reference: ReferenceRun | None = None) -> None:
        super().reset(reference)
        self._rng = np.random.default_rng(self.seed)

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._rng.bit_generator.state = state["rng"]

    def decide(self, observation: Observation) -> list[Mode]:
        n = n_units(observation)
        return prefix_modes(int(self._rng.binomial(max(n - 1, 0), self.fraction)), n)
