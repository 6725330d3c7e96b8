"""SmartFRZ's attention score (Li et al., ICLR 2023): the trained predictor's probability that
each unit can freeze."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from freeze_agent.core.units import Unit
from freeze_agent.signals.predictor import WeightHistory, WeightSampler, load_predictor
from freeze_agent.signals.threads import one_thread_if


class AttentionScore:
    """SmartFRZ's attention score: the trained predictor's probability that each unit can freeze,
    from a history of sampled weight snapshots (one per check)."""

    def __init__(self, units: Sequence[Unit], predictor_dir=None) -> None:
        try:
            self.predictor = load_predictor(predictor_dir) if predictor_dir else load_predictor()
        except FileNotFoundError:
            self.predictor = None
        self.history = WeightHistory(WeightSampler(units))

    @property
    def available(self) -> bool:
        return self.predictor is not None

    @torch.no_grad()
    def check(self) -> list[float] | None:
        if self.predictor is None:
            return None
        self.history.record()
        with one_thread_if(True):  # a small network on a short history
            return self.predictor.freeze_probability(self.history.tensor()).tolist()
