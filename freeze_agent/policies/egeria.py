"""Egeria (Wang et al., EuroSys 2023): knowledge-guided freezing on plasticity against an int8
reference model."""

from __future__ import annotations

import math

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Observation, Policy, ReferenceRun
from freeze_agent.policies.features import global_value, n_units, prefix_modes, unit_column
from freeze_agent.signals.similarity import slope


class Egeria(Policy):
    """Egeria's rule: freeze the front unit once its plasticity has flattened out.

    A reconstruction: the defaults are not all in the paper. Plasticity is the observation's:
    the SP loss between each unit's output in the training model and in the int8 reference snapshot
    (run on the CPU in another process, refreshed every few decisions by the controller), normalized
    by the run's maximum. After a ``bootstrap`` fraction of the run, only the front-most training
    unit is evaluated: when the least-squares slope of its last ``window`` plasticity values stays
    under ``tolerance`` in magnitude for ``checks`` consecutive decisions, it freezes, so frozen
    units form a prefix. When the learning rate drops sharply (by ``lr_drop`` or more between two
    decisions, a step decay), every unit unfreezes and the evaluation starts over.
    """

    registry_name = "egeria"

    def __init__(
        self,
        window: int = 20,
        tolerance: float = 1e-4,
        checks: int = 2,
        bootstrap: float = 0.3,
        lr_drop: float = 10.0,
    ) -> None:
        if window < 2 or checks < 1 or not 0.0 <= bootstrap < 1.0 or lr_drop <= 1.0:
            raise ValueError(
                "egeria needs window >= 2, checks >= 1, bootstrap in [0, 1) and lr_drop > 1"
            )
        self.window, self.tolerance, self.checks = window, tolerance, checks
        self.bootstrap, self.lr_drop = bootstrap, lr_drop
        self.name = f"egeria:{window},{tolerance:g}"
        self.reset()

    def reset(self, reference: ReferenceRun | None = None) -> None:
        super().reset(reference)
        self._history: list[list[float]] = []
        self._frozen = 0
        self._flat_checks = 0
        self._lr_ratio: float | None = None

    def decide(self, observation: Observation) -> list[Mode]:
        n = n_units(observation)
        plasticity = unit_column(observation, "plasticity")
        missing = unit_column(observation, "plasticity_missing") > 0.5
        if len(self._history) != n:
            self._history = [[] for _ in range(n)]
        for u in range(n):
            if not missing[u]:
                self._history[u] = (self._history[u] + [float(plasticity[u])])[-self.window :]

        lr_ratio = global_value(observation, "lr_ratio")
        if self._lr_ratio is not None and lr_ratio * self.lr_drop <= self._lr_ratio:
            self._frozen, self._flat_checks = 0, 0  # a sharp decay: everything learns again
            self._history = [[] for _ in range(n)]
        self._lr_ratio = lr_ratio

        front = self._frozen
        if global_value(observation, "progress") >= self.bootstrap and front < n - 1:
            history = self._history[front]
            flat = len(history) >= self.window and math.fabs(slope(history)) < self.tolerance
            self._flat_checks = self._flat_checks + 1 if flat else 0
            if self._flat_checks >= self.checks:
                self._frozen, self._flat_checks = front + 1, 0
        return prefix_modes(self._frozen, n)
