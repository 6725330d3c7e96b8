"""The training of a model as a Gymnasium environment.

An episode is one training run of a task, from initialization to the end of its budget. Each
step, the agent sets the mode of every unit (TRAIN / LOCAL / FROZEN), the trainer runs one
decision interval, and the agent observes the signals of ``freeze_agent.signals.observation``.
The reward (``freeze_agent.rl.rewards``) is the compute the interval saved minus the validation
loss it cost against the same-seed all-TRAIN reference (``freeze_agent.rl.trajectories``); the
last step also pays for final accuracy lost beyond a tolerance.

Registered as ``freeze_agent/FreezeTraining-v0``::

    env = gymnasium.make("freeze_agent/FreezeTraining-v0", tasks="train")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from freeze_agent.core.modes import Mode
from freeze_agent.rl.rewards import RewardConfig, accuracy_penalty, loss_penalty, saving
from freeze_agent.rl.trajectories import ReferenceTrajectory, reference_trajectory
from freeze_agent.signals.observation import action_mask, observation_space
from freeze_agent.tasks.spec import Task, TaskSource, resolve_tasks
from freeze_agent.tasks.trainer import Trainer

ENV_ID = "freeze_agent/FreezeTraining-v0"


class FreezeTrainingEnv(gym.Env):
    """Train a task while the agent decides, interval by interval, the mode of every unit.

    Args:
        tasks: the task(s) an episode is drawn from (see ``resolve_tasks``); one is drawn per
            episode from the env's seeded generator, unless ``reset(options={"task": name})``.
        max_units: unit slots of the observation and action; larger models are merged into this
            many units.
        seeds: the training seeds an episode draws from. Each (task, seed) needs one all-TRAIN
            reference run, cached on disk, so a small set keeps that cost bounded.
        reward: weights and tolerance of the reward.
        epochs, decisions: override the task's budget and its number of decision intervals.
        device: where the model trains (default: CUDA when available).
        reference_model: measure plasticity against the int8 reference model in a CPU worker
            process. Its results are computed asynchronously but used on a fixed schedule (a
            late one is waited for), so observations and rewards do not depend on timing.
        cache: serve a frozen prefix's activations from the activation cache.
        timing: report the measured speedup (wall time against the reference run's) and the
            waits for late reference results in ``info``. Wall time varies from run to run, so
            without it an episode, its ``info`` included, is exactly reproducible from its seed.

    Actions are one mode per unit slot (``MultiDiscrete([3] * max_units)``); padded slots, the
    head and LOCAL where the local rule does not apply are masked (``action_masks``), and the
    controller enforces the same rules if an unmasked action asks for them anyway.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(
        self,
        tasks: TaskSource | Sequence[TaskSource] = "train",
        *,
        max_units: int = 32,
        seeds: Sequence[int] = (0, 1, 2),
        reward: RewardConfig | None = None,
        epochs: int | None = None,
        decisions: int | None = None,
        device: str | None = None,
        reference_model: bool = True,
        cache: bool = True,
        timing: bool = True,
    ) -> None:
        self.tasks = resolve_tasks(tasks)
        if not seeds:
            raise ValueError("seeds must name at least one training seed")
        self.max_units, self.seeds = max_units, list(seeds)
        self.reward_config = reward or RewardConfig()
        self.epochs, self.decisions, self.device = epochs, decisions, device
        self.reference_model, self.cache, self.timing = reference_model, cache, timing
        if self.reward_config.cost == "measured" and not timing:
            raise ValueError("a reward on measured cost needs timing=True")
        self.observation_space = observation_space(max_units)
        self.action_space = gym.spaces.MultiDiscrete([len(Mode)] * max_units)
        self.trainer: Trainer | None = None
        self.reference: ReferenceTrajectory | None = None
        self._observation: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ episode

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start a training run. ``options`` may name the ``task`` and the training ``seed``
        (otherwise both are drawn from the env's generator), and ask with
        ``refresh_reference=True`` for the all-TRAIN reference run to be trained again rather
        than read from the cache (fresh wall times for a fair measured speedup)."""
        super().reset(seed=seed)
        options = options or {}
        task = self._pick_task(options.get("task"))
        run_seed = int(options.get("seed", self.seeds[self.np_random.integers(len(self.seeds))]))
        self._close_trainer()
        # the reference run must train exactly what this episode trains
        run = {
            "device": self.device,
            "epochs": self.epochs,
            "decisions": self.decisions,
            "max_units": self.max_units,
        }
        self.reference = reference_trajectory(
            task, run_seed, **run, refresh=bool(options.get("refresh_reference", False))
        )
        self.trainer = Trainer(
            task, run_seed, **run, cache=self.cache, reference=self.reference_model
        )
        self._intervals = 0
        self._return = 0.0
        self._timeline: list[str] = []
        # Same seed, same initial model: the reference's loss at initialization is this one.
        initial_val_loss, _ = self.trainer.evaluate("val")
        self._loss_reduction = initial_val_loss - min(self.reference.val_losses)
        self._observation = self.trainer.controller.observe()
        info = {"task": task.name, "seed": run_seed, "units": len(self.trainer.units)}
        return self._observation, info

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self.trainer is None or self.reference is None:
            raise RuntimeError("call reset() before step()")
        if self.trainer.done:
            raise RuntimeError("the episode is over: call reset() to start another")
        trainer, reference = self.trainer, self.reference
        requested = np.asarray(action, dtype=np.int64).reshape(-1)
        if requested.shape != (self.max_units,):
            raise ValueError(f"expected {self.max_units} modes, got shape {requested.shape}")
        modes = trainer.set_modes([Mode(int(a)) for a in requested[: len(trainer.units)]])
        self._timeline.append("".join(m.name[0] for m in modes))

        report = trainer.run_interval()
        share = report.steps / trainer.total_steps
        interval_index = self._intervals
        self._intervals += 1
        info: dict[str, Any] = {"modes": [m.name for m in modes]}

        if trainer.diverged:
            reward = -self.reward_config.divergence_penalty
            info["reason"] = (
                f"training loss became non-finite at step {trainer.step} of {trainer.total_steps}"
            )
            val_loss, val_accuracy = math.inf, 0.0
        else:
            val_loss, val_accuracy = trainer.evaluate("val")
            saved = self._saved(report.cost_ratio, report.seconds, share, interval_index)
            penalty = loss_penalty(
                self.reward_config,
                share,
                val_loss,
                reference.val_losses[interval_index],
                self._loss_reduction,
            )
            reward = saved - penalty
            info.update(saved=saved, loss_penalty=penalty)

        terminated = trainer.done
        if terminated and not trainer.diverged:
            final = accuracy_penalty(self.reward_config, val_accuracy, reference.final_val_accuracy)
            reward -= final
            info["accuracy_penalty"] = final
        self._return += reward
        info.update(self._progress_info(val_accuracy))
        self._observation = trainer.controller.observe()
        if terminated:
            info["episode_summary"] = self._summary(val_accuracy, info.get("reason"))
        return self._observation, float(reward), terminated, False, info

    def action_masks(self) -> np.ndarray:
        """Legal modes of the current observation, flattened unit by unit (MaskablePPO's
        layout for a MultiDiscrete action)."""
        if self._observation is None:
            raise RuntimeError("call reset() before action_masks()")
        return action_mask(self._observation).reshape(-1)

    def close(self) -> None:
        self._close_trainer()

    # ------------------------------------------------------------------ helpers

    def _pick_task(self, name: str | None) -> Task:
        if name is None:
            return self.tasks[self.np_random.integers(len(self.tasks))]
        for task in self.tasks:
            if task.name == name:
                return task
        known = ", ".join(t.name for t in self.tasks)
        raise ValueError(f"task {name!r} is not one of this env's tasks: {known}")

    def _saved(self, cost_ratio: float, seconds: float, share: float, index: int) -> float:
        if self.reward_config.cost == "modeled":
            return saving(share, cost_ratio)
        reference_seconds = self.reference.interval_seconds[index]
        return saving(share, seconds / reference_seconds if reference_seconds > 0 else 1.0)

    def _progress_info(self, val_accuracy: float) -> dict[str, Any]:
        trainer = self.trainer
        costs = trainer.step_costs
        info = {
            "modeled_speedup": len(costs) / sum(costs) if sum(costs) > 0 else 1.0,
            "val_accuracy": val_accuracy,
        }
        if self.timing:
            reference_seconds = self.reference.seconds_until(self._intervals)
            info["measured_speedup"] = reference_seconds / max(trainer.train_seconds, 1e-9)
        return info

    def _summary(self, val_accuracy: float, reason: str | None) -> dict[str, Any]:
        trainer, reference = self.trainer, self.reference
        progress = self._progress_info(val_accuracy)
        test_accuracy = 0.0 if trainer.diverged else trainer.evaluate("test")[1]
        return {
            "task": trainer.task.name,
            "seed": trainer.seed,
            "return": self._return,
            "decisions": self._intervals,
            "modeled_speedup": progress["modeled_speedup"],
            "measured_speedup": progress.get("measured_speedup", math.nan),
            "val_accuracy": val_accuracy,
            "reference_val_accuracy": reference.final_val_accuracy,
            "accuracy_delta_pp": 100.0 * (val_accuracy - reference.final_val_accuracy),
            "test_accuracy": test_accuracy,
            "reference_test_accuracy": reference.test_accuracy,
            "test_delta_pp": 100.0 * (test_accuracy - reference.test_accuracy),
            "diverged": trainer.diverged,
            "reason": reason,
            "unit_names": [u.name for u in trainer.units],
            "timeline": list(self._timeline),
            **self._signal_summary(),
        }

    def _signal_summary(self) -> dict[str, Any]:
        """The share of observations with plasticity; with ``timing``, also the waits for late
        reference results (wall time, which varies from run to run)."""
        report = self.trainer.controller.signal_report()
        summary = {"plasticity_fraction": report["plasticity_fraction"]}
        if self.timing:
            summary.update(
                reference_waits=report["reference_waits"],
                reference_wait_seconds=report["reference_wait_seconds"],
            )
        return summary

    def _close_trainer(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
