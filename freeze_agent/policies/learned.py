"""The learned policy, deployed: a trained ``UnitAttentionPolicy`` loaded from its artifact
(``freeze_agent.policies.artifact``) without executing pickled code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gymnasium import spaces
from safetensors import SafetensorError
from safetensors.torch import load_file

from freeze_agent.core.modes import Mode
from freeze_agent.policies.artifact import (
    CARD_FILE,
    WEIGHTS_FILE,
    PolicyArtifactError,
    check_card,
    load_card,
)
from freeze_agent.policies.base import Observation, Policy
from freeze_agent.policies.network import UnitAttentionPolicy, deterministic_actions
from freeze_agent.signals.observation import (
    observation_space,
)


class LearnedPolicy(Policy):
    """A trained ``UnitAttentionPolicy`` that decides the most probable legal mode of each unit.

    Args:
        network: the policy network (in eval mode after construction)
        name: how benchmarks and logs call this policy
        directory: the artifact folder it was loaded from, if any (its card records results)
    """

    def __init__(
        self, network: UnitAttentionPolicy, name: str = "learned", directory: Path | None = None
    ) -> None:
        self.network = network
        self.network.set_training_mode(False)
        self.name = name
        self.directory = directory

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> LearnedPolicy:
        """The policy of the artifact in ``directory``, from ``policy.json`` and
        ``policy.safetensors`` only, named after the folder."""
        directory = Path(directory)
        card = load_card(directory)
        check_card(card, directory / CARD_FILE)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise PolicyArtifactError(
                f"{weights} not found: the artifact in {directory} is incomplete; save the "
                "policy again (freeze_agent.policies.artifact.save_policy)"
            )
        try:
            state = load_file(weights)
        except (SafetensorError, OSError) as error:
            raise PolicyArtifactError(
                f"{weights} is damaged and cannot be read ({error}); restore the file or save "
                "the policy again"
            ) from error
        max_units = int(card["max_units"])
        try:
            network = UnitAttentionPolicy(
                observation_space(max_units),
                spaces.MultiDiscrete([len(Mode)] * max_units),
                UnitAttentionPolicy._dummy_schedule,  # no optimizer steps when deploying
                **card["architecture"],
            )
            network.load_state_dict(state)
        except (TypeError, RuntimeError) as error:
            raise PolicyArtifactError(
                f"{weights} does not match the architecture in {directory / CARD_FILE}: {error}"
            ) from error
        return cls(network.to(device), name=directory.resolve().name, directory=directory)

    @property
    def max_units(self) -> int:
        return self.network.max_units

    def decide(self, observation: Observation) -> list[Mode]:
        n_units = int(observation["mask"].sum())
        actions = deterministic_actions(self.network, _fit_slots(observation, self.max_units))
        return [Mode(int(action)) for action in actions[:n_units]]


def _fit_slots(observation: Observation, max_units: int) -> Observation:
    """The observation padded (or its padding cut) to ``max_units`` slots, so a controller built
    with another ``max_units`` can use the policy as long as the model's units fit."""
    slots, n_units = len(observation["mask"]), int(observation["mask"].sum())
    if slots == max_units:
        return observation
    if n_units > max_units:
        raise ValueError(
            f"the model has {n_units} units, this policy decides for at most {max_units}; build "
            f"the controller with max_units={max_units} so adjacent blocks are merged"
        )
    units = np.zeros((max_units, observation["units"].shape[1]), dtype=np.float32)
    mask = np.zeros(max_units, dtype=np.int8)
    units[:n_units], mask[:n_units] = observation["units"][:n_units], 1
    return {"units": units, "mask": mask, "global": observation["global"]}
