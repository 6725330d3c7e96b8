"""SmartFRZ (Li et al., ICLR 2023): freeze what the attention-based predictor says converged."""

from __future__ import annotations

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Observation, Policy
from freeze_agent.policies.features import frozen_prefix, n_units, prefix_modes, unit_column


class SmartFRZ(Policy):
    """SmartFRZ's rule: freeze, in prefix order, what its attention predictor says converged.

    The shipped predictor (``policies/smartfrz``, an attention network over a history of sampled
    weights) scores each unit; units scored ``threshold`` or more freeze.

    The frozen prefix grows from the front while consecutive units are scored converged and
    never shrinks; with no predictor (``attention_missing``) nothing freezes.
    """

    registry_name = "smartfrz"

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        self.threshold = threshold
        self.name = f"smartfrz:{threshold:g}"

    def decide(self, observation: Observation) -> list[Mode]:
        n = n_units(observation)
        frozen = frozen_prefix(observation)
        scores = unit_column(observation, "attention_score")
        missing = unit_column(observation, "attention_missing") > 0.5
        while frozen < n - 1 and not missing[frozen] and scores[frozen] >= self.threshold:
            frozen += 1
        return prefix_modes(frozen, n)
