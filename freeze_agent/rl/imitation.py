"""Kick-start PPO from a privileged teacher: imitate it first, then let PPO improve on it.

From scratch, PPO has to discover freezing by random exploration, and every wrong freeze costs
accuracy: 3.5k decisions of it left the learning curve flat and the policy all-TRAIN. A teacher
that knows where freezing is safe gives PPO a sensible starting policy instead.

The teacher (``freeze_agent.policies.teacher.PlateauTeacher``) has privileged information: the
episode's all-TRAIN reference trajectory, which the agent never sees. It freezes a growing
prefix once the reference's validation loss has plateaued, so tasks that converge early are
frozen early and tasks still learning at the end of their budget are barely frozen.

The agent imitates it from its own observations (behaviour cloning on the teacher's decisions),
so it must learn to recognise a plateau from the signals it also has in deployment. Later
rounds are DAgger (Ross et al., 2011): the agent acts, the teacher labels, and the agent learns
what to do in the states its own mistakes lead to. The value head learns the discounted returns
of the same episodes, so PPO's first advantages are meaningful.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv

from freeze_agent.policies.base import Policy
from freeze_agent.rl.episodes import action_of
from freeze_agent.signals.observation import action_mask


@dataclass
class Demonstrations:
    """Decisions of whole episodes, labelled with the teacher's action."""

    observations: dict[str, list[np.ndarray]] = field(default_factory=dict)
    action_masks: list[np.ndarray] = field(default_factory=list)
    teacher_actions: list[np.ndarray] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    episodes: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.returns)

    def extend(self, other: Demonstrations) -> None:
        for key, values in other.observations.items():
            self.observations.setdefault(key, []).extend(values)
        self.action_masks.extend(other.action_masks)
        self.teacher_actions.extend(other.teacher_actions)
        self.returns.extend(other.returns)
        self.episodes.extend(other.episodes)


def collect(
    venv: VecEnv,
    teacher: Policy,
    episodes_per_env: int,
    *,
    gamma: float,
    act: Policy | None = None,
) -> Demonstrations:
    """Play ``episodes_per_env`` whole episodes in every env of ``venv``, labelling each
    decision with the teacher's action. The teacher acts unless ``act`` is given (DAgger).

    Episodes still running when every env has its share are dropped.
    """
    n_envs, max_units = venv.num_envs, venv.action_space.nvec.shape[0]
    collected = Demonstrations()
    # one teacher per env, reset with that env's reference whenever it starts an episode
    teachers = [copy.deepcopy(teacher) for _ in range(n_envs)]
    running: list[list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]]] = [
        [] for _ in range(n_envs)
    ]
    finished = [0] * n_envs
    observations = venv.reset()
    for each, reference in zip(teachers, venv.get_attr("reference"), strict=True):
        each.reset(reference)
    while min(finished) < episodes_per_env:
        singles = [{key: value[i] for key, value in observations.items()} for i in range(n_envs)]
        masks = np.stack([action_mask(single).reshape(-1) for single in singles])
        labels = np.stack(
            [action_of(t.decide(s), max_units) for t, s in zip(teachers, singles, strict=True)]
        )
        if act is None:
            actions = labels
        else:
            actions = np.stack([action_of(act.decide(s), max_units) for s in singles])
        observations, rewards, dones, infos = venv.step(actions)
        for i in range(n_envs):
            running[i].append((singles[i], masks[i], labels[i], float(rewards[i])))
            if dones[i]:  # the env has already reset itself for its next episode
                if finished[i] < episodes_per_env:
                    _append_episode(collected, running[i], gamma)
                    collected.episodes.append(infos[i]["episode_summary"])
                finished[i] += 1
                running[i] = []
                teachers[i].reset(venv.get_attr("reference", indices=[i])[0])
    return collected


def _append_episode(
    collected: Demonstrations,
    steps: list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]],
    gamma: float,
) -> None:
    discounted, returns = 0.0, []
    for *_, reward in reversed(steps):
        discounted = reward + gamma * discounted
        returns.append(discounted)
    for (observation, mask, label, _), value in zip(steps, reversed(returns), strict=True):
        for key, array in observation.items():
            collected.observations.setdefault(key, []).append(array)
        collected.action_masks.append(mask)
        collected.teacher_actions.append(label)
        collected.returns.append(value)


def clone(
    model: MaskablePPO,
    demonstrations: Demonstrations,
    *,
    epochs: int = 100,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    value_weight: float = 0.5,
    seed: int = 0,
) -> dict[str, float]:
    """Fit ``model``'s policy to the teacher's actions (maximum likelihood under the action
    masks) and its value head to the episodes' discounted returns.

    Returns the final losses and the agreement: the share of real units on which the
    deterministic policy picks the teacher's mode.
    """
    if len(demonstrations) == 0:
        raise ValueError("no demonstrations to clone: collect at least one whole episode")
    policy = model.policy
    device = policy.device
    observations = obs_as_tensor(
        {k: np.stack(v) for k, v in demonstrations.observations.items()}, device
    )
    masks = torch.as_tensor(np.stack(demonstrations.action_masks), device=device)
    actions = torch.as_tensor(np.stack(demonstrations.teacher_actions), device=device)
    returns = torch.as_tensor(demonstrations.returns, dtype=torch.float32, device=device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    n = len(demonstrations)
    policy.set_training_mode(True)
    for _ in range(epochs):
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            values, log_prob, _ = policy.evaluate_actions(
                {k: v[batch] for k, v in observations.items()}, actions[batch], masks[batch]
            )
            imitation = -log_prob.mean()
            value = torch.nn.functional.mse_loss(values.flatten(), returns[batch])
            optimizer.zero_grad()
            (imitation + value_weight * value).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
            optimizer.step()
    policy.set_training_mode(False)
    with torch.no_grad():
        values, log_prob, _ = policy.evaluate_actions(observations, actions, masks)
        chosen = policy.get_distribution(observations, masks).get_actions(deterministic=True)
    real = observations["mask"].bool()
    agreement = float((chosen == actions)[real].float().mean())
    return {
        "imitation_loss": float(-log_prob.mean()),
        "value_loss": float(torch.nn.functional.mse_loss(values.flatten(), returns)),
        "agreement": agreement,
        "decisions": n,
    }
