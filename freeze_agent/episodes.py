"""Play whole episodes of the freeze environment with any decision rule: the evaluation that
policy training (best-on-val selection) and ``freeze-agent evaluate`` share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sb3_contrib import MaskablePPO

from freeze_agent.env import FreezeTrainingEnv
from freeze_agent.modes import Mode
from freeze_agent.policy import Observation, Policy
from freeze_agent.policy_net import deterministic_actions

Actor = Callable[[Observation, np.ndarray], np.ndarray]
"""Maps an observation and its flat action mask to one mode per unit slot."""


def policy_actor(policy: Policy, max_units: int) -> Actor:
    """An ``Actor`` from a ``Policy`` (which decides for the real units only)."""

    def act(observation: Observation, _mask: np.ndarray) -> np.ndarray:
        modes = policy.decide(observation)
        action = np.full(max_units, int(Mode.TRAIN), dtype=np.int64)
        action[: len(modes)] = [int(m) for m in modes]
        return action

    return act


def sb3_actor(model: MaskablePPO) -> Actor:
    """An ``Actor`` from a MaskablePPO model, acting deterministically the way its artifact
    (``LearnedPolicy``) will."""
    return lambda observation, _mask: deterministic_actions(model.policy, observation)


def play_episode(
    env: FreezeTrainingEnv,
    act: Actor | Policy,
    task: str | None = None,
    seed: int | None = None,
    *,
    refresh_reference: bool = False,
) -> dict[str, Any]:
    """Run one episode to its end and return the env's episode summary (``refresh_reference``:
    see ``FreezeTrainingEnv.reset``)."""
    options = {k: v for k, v in (("task", task), ("seed", seed)) if v is not None}
    options["refresh_reference"] = refresh_reference
    observation, _ = env.reset(options=options)
    if isinstance(act, Policy):
        act = policy_actor(act, env.max_units)
    while True:
        action = act(observation, env.action_masks())
        observation, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return info["episode_summary"]


@dataclass
class Evaluation:
    """Episode summaries of one actor over tasks × seeds, and their means."""

    episodes: list[dict[str, Any]]

    @property
    def mean_return(self) -> float:
        return self.mean("return")

    def mean(self, key: str) -> float:
        return float(np.mean([e[key] for e in self.episodes]))

    def to_dict(self) -> dict[str, Any]:
        keys = ("return", "modeled_speedup", "measured_speedup", "accuracy_delta_pp")
        return {
            "means": {key: self.mean(key) for key in keys},
            "episodes": [
                {k: v for k, v in e.items() if k not in ("timeline", "unit_names")}
                for e in self.episodes
            ],
        }


def evaluate(
    env: FreezeTrainingEnv, act: Actor | Policy, seeds: Sequence[int] = (0,)
) -> Evaluation:
    """Play every task of ``env`` once per seed."""
    return Evaluation(
        [play_episode(env, act, task.name, seed) for task in env.tasks for seed in seeds]
    )
