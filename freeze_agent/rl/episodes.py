"""Play whole episodes of the freeze environment with any policy: the evaluation that policy
training (best-on-val selection), the kick-start and ``freeze-agent evaluate`` share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Policy
from freeze_agent.rl.env import FreezeTrainingEnv


def action_of(modes: Sequence[Mode], max_units: int) -> np.ndarray:
    """The env's action for ``modes`` of the real units: one mode per slot, padding in TRAIN."""
    action = np.full(max_units, int(Mode.TRAIN), dtype=np.int64)
    action[: len(modes)] = [int(m) for m in modes]
    return action


def play_episode(
    env: FreezeTrainingEnv,
    policy: Policy,
    task: str | None = None,
    seed: int | None = None,
    *,
    refresh_reference: bool = False,
) -> dict[str, Any]:
    """Run one episode to its end and return the env's episode summary (``refresh_reference``:
    see ``FreezeTrainingEnv.reset``). A privileged policy is given the episode's reference run."""
    options = {k: v for k, v in (("task", task), ("seed", seed)) if v is not None}
    options["refresh_reference"] = refresh_reference
    observation, _ = env.reset(options=options)
    policy.reset(env.reference if policy.privileged else None)
    while True:
        action = action_of(policy.decide(observation), env.max_units)
        # a rule that is also a learning-rate schedule (FreezeOut): the env's controller applies it
        env.trainer.controller.set_learning_rate_scales(policy.learning_rate_scales())
        observation, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return info["episode_summary"]


@dataclass
class Evaluation:
    """Episode summaries of one policy over tasks × seeds, and their means."""

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


def evaluate(env: FreezeTrainingEnv, policy: Policy, seeds: Sequence[int] = (0,)) -> Evaluation:
    """Play every task of ``env`` once per seed."""
    return Evaluation(
        [play_episode(env, policy, task.name, seed) for task in env.tasks for seed in seeds]
    )
