"""Best-on-validation selection during policy training, in stable-baselines3's shape: one
callback evaluates (as ``EvalCallback`` does), another keeps the best policy when told of a
new best (``callback_on_new_best``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback, EventCallback

from freeze_agent.policies.artifact import CARD_FILE, save_policy
from freeze_agent.policies.learned import LearnedPolicy
from freeze_agent.rl.env import FreezeTrainingEnv
from freeze_agent.rl.episodes import Evaluation, evaluate


class ValidationCallback(EventCallback):
    """Every ``eval_every`` timesteps, play each validation task once (seed 0, deterministic
    actions, as the deployed artifact acts) and trigger ``callback_on_new_best`` when the mean
    return beats the best so far.

    Args:
        make_env: builds the validation environment (once, at the first evaluation).
        eval_every: timesteps between evaluations; 0 evaluates only when asked
            (``evaluate_now``).
        callback_on_new_best: runs after an evaluation that set a new best
            (``SaveBestPolicy``); it reads ``parent.last_evaluation``.
        best: the best mean return to beat (a resumed run's), or None.
        verbose: 1 prints each evaluation's means.
    """

    def __init__(
        self,
        make_env: Callable[[], FreezeTrainingEnv],
        eval_every: int,
        *,
        callback_on_new_best: BaseCallback | None = None,
        best: float | None = None,
        verbose: int = 1,
    ) -> None:
        super().__init__(callback_on_new_best, verbose=verbose)
        self.make_env, self.eval_every = make_env, eval_every
        self.best_mean_return = best
        self.last_evaluation: Evaluation | None = None
        self.evaluated_at: int | None = None
        self.evaluate_at_start = False
        self._last_eval = 0
        self._env: FreezeTrainingEnv | None = None

    def _on_training_start(self) -> None:
        super()._on_training_start()
        self._last_eval = self.model.num_timesteps
        if self.evaluate_at_start:
            self.evaluate_now()

    def _on_step(self) -> bool:
        if self.eval_every and self.model.num_timesteps - self._last_eval >= self.eval_every:
            self._last_eval = self.model.num_timesteps
            return self.evaluate_now()
        return True

    def evaluate_now(self) -> bool:
        """Evaluate the current policy; returns what the new-best callback returns (True when
        there is none or no new best)."""
        if self._env is None:
            self._env = self.make_env()
        model: MaskablePPO = self.model
        result = evaluate(self._env, LearnedPolicy(model.policy, name="validation"))
        self.last_evaluation, self.evaluated_at = result, model.num_timesteps
        means = result.to_dict()["means"]
        if getattr(model, "_logger", None) is not None:  # none before the first learn()
            for key, value in means.items():
                self.logger.record(f"eval/{key}", value)
        if self.verbose:
            print(
                f"validation at {model.num_timesteps} timesteps: "
                + ", ".join(f"{k} {v:.3f}" for k, v in means.items())
            )
        if self.best_mean_return is not None and result.mean_return <= self.best_mean_return:
            return True
        self.best_mean_return = result.mean_return
        return self._on_event()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


class SaveBestPolicy(BaseCallback):
    """Writes the policy artifact to ``out`` each time its parent ``ValidationCallback`` finds
    a new best, with ``metadata(evaluation)`` in the card."""

    parent: ValidationCallback

    def __init__(
        self, out: str | Path, metadata: Callable[[Evaluation], dict[str, Any]], verbose: int = 0
    ) -> None:
        super().__init__(verbose=verbose)
        self.out, self.metadata = Path(out), metadata

    def _on_step(self) -> bool:
        evaluation = self.parent.last_evaluation
        if evaluation is None:
            raise RuntimeError("SaveBestPolicy must be a ValidationCallback's new-best callback")
        save_policy(self.model, self.out, metadata=self.metadata(evaluation))
        if self.verbose:
            print(f"new best policy written to {self.out}")
        return True


def recorded_best(out: str | Path) -> float | None:
    """The best validation mean return recorded in the card in ``out``, if any."""
    card = Path(out) / CARD_FILE
    if not card.is_file():
        return None
    validation = json.loads(card.read_text()).get("validation") or {}
    return validation.get("means", {}).get("return")
