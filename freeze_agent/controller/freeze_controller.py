"""The one place where units change mode.

``FreezeController`` partitions a model into units and owns every mode change, so that frozen
parameters receive no gradient, no momentum and no weight decay, norm statistics and dropout
freeze with them, and local units learn by the local rule. The trainer, the Gymnasium
environment and a user's own training loop all drive the same object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from freeze_agent.core.cost_model import cost_ratio
from freeze_agent.core.local_learning import LocalLearning, WeakSupervision
from freeze_agent.core.modes import Mode, effective_modes
from freeze_agent.core.units import ModelInput, Unit, partition
from freeze_agent.signals.attention import AttentionScore
from freeze_agent.signals.dynamics import DynamicsTracker, UnitDynamics
from freeze_agent.signals.observation import ObservationBuilder, Signals, has_plasticity
from freeze_agent.signals.plasticity import PlasticityMonitor


class FreezeController:
    """Partition ``model`` and apply TRAIN / LOCAL / FROZEN modes to its units.

    Args:
        model: the model being trained.
        optimizer: its optimizer; frozen parameters are kept out of its updates by having no
            gradient, which every torch optimizer skips.
        example_input: one batch as the training loop feeds it, used to trace the model.
        max_units: most units to split the model into (adjacent blocks are merged beyond it).
        total_steps: planned optimizer steps of the run, for the progress feature (optional).
        local_lr: base learning rate of the local rule; it follows the optimizer's learning-rate
            schedule and the weak-supervision scale.
        reset_optimizer_state_on_unfreeze: drop a unit's optimizer state (momentum, Adam moments)
            when it returns to TRAIN, instead of resuming with the state it had when frozen.
        probe_input: the fixed batch (~32 training samples) on which plasticity is measured;
            defaults to ``example_input``.
        signals: track gradient/weight dynamics, plasticity and the attention score; without
            them the observation holds only the static, mode and progress features.
        reference: measure plasticity against an int8 reference model in a CPU worker process
            (started with the controller, so a fresh process pays its start-up while the first
            interval trains); needs ``signals``.
        predictor_dir: folder of the SmartFRZ predictor (default: the shipped one).

    Call ``step(loss)`` once after each optimizer step and ``observe()`` once per decision.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        example_input: ModelInput,
        max_units: int = 32,
        *,
        total_steps: int | None = None,
        local_lr: float = 1e-3,
        reset_optimizer_state_on_unfreeze: bool = False,
        probe_input: ModelInput | None = None,
        signals: bool = True,
        reference: bool = True,
        predictor_dir: str | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.max_units = max_units
        self.total_steps = total_steps
        self.reset_optimizer_state_on_unfreeze = reset_optimizer_state_on_unfreeze
        self.units: list[Unit] = partition(model, example_input, max_units)
        self._modes: list[Mode] = [Mode.TRAIN] * len(self.units)
        self._mode_since: list[int] = [0] * len(self.units)
        self._eval_hooks: dict[int, list[RemovableHandle]] = {}
        self._local = LocalLearning(local_lr)
        self.local_lr = local_lr
        self.weak_supervision = WeakSupervision()
        self._initial_lr = self._current_lr()
        self.steps = 0
        self.last_loss: float | None = None
        self.probe_input = example_input if probe_input is None else probe_input
        self.use_reference = signals and reference
        self.dynamics = DynamicsTracker(self.units) if signals else None
        self.attention = AttentionScore(self.units, predictor_dir) if signals else None
        # started now, so that the worker's child starts up while the first interval trains
        self.plasticity = (
            PlasticityMonitor(model, self.units, self.probe_input) if self.use_reference else None
        )
        self.observations = 0
        self.observations_with_plasticity = 0
        self.builder = ObservationBuilder(self.units, max_units, total_steps)
        self._interval_loss_sum, self._interval_loss_count = 0.0, 0
        self.interval_losses: list[float] = []
        self._lr_scales: list[float] | None = None
        self._scale_hooks: tuple[RemovableHandle, RemovableHandle] | None = None
        self._before: dict[torch.Tensor, torch.Tensor] = {}

    # ------------------------------------------------------------------ modes

    @property
    def modes(self) -> list[Mode]:
        """The effective mode of each unit."""
        return list(self._modes)

    def set_modes(self, modes: Sequence[Mode | int | str]) -> list[Mode]:
        """Apply ``modes`` (one per unit) and return the modes that actually apply: the head is
        always TRAIN, and TRAIN units upstream of a LOCAL unit become FROZEN."""
        new = effective_modes(modes, self.units)
        for unit, old_mode, new_mode in zip(self.units, self._modes, new, strict=True):
            if old_mode is new_mode:
                continue
            self._leave(unit, old_mode)
            self._enter(unit, new_mode)
            self._mode_since[unit.index] = self.steps
        self._modes = new
        return self.modes

    def set_learning_rate_scales(self, scales: Sequence[float] | None) -> None:
        """Multiply each unit's learning rate by its scale from the next optimizer step on (None
        or all 1: plain steps again), as FreezeOut's per-unit schedules need.

        The controller scales the update each optimizer step makes to the unit's parameters:
        ``p <- p_before + scale * (p_after - p_before)``. SGD (with momentum and weight decay),
        Adam and AdamW all take steps linear in the learning rate, so this is exactly a per-unit
        learning rate, for any optimizer the user built and whatever its schedule, without
        touching its parameter groups.
        """
        if scales is not None and len(scales) != len(self.units):
            raise ValueError(f"got {len(scales)} learning-rate scales for {len(self.units)} units")
        if scales is None or all(s == 1.0 for s in scales):
            self._lr_scales = None
            return
        if any(not math.isfinite(s) or s < 0 for s in scales):
            raise ValueError(f"learning-rate scales must be finite and >= 0, got {list(scales)}")
        self._lr_scales = [float(s) for s in scales]
        if self._scale_hooks is None:
            self._scale_hooks = (
                self.optimizer.register_step_pre_hook(self._before_step),
                self.optimizer.register_step_post_hook(self._after_step),
            )

    def _before_step(self, _optimizer: torch.optim.Optimizer, _args, _kwargs) -> None:
        self._before = {}
        if self._lr_scales is None:
            return
        for unit, scale in zip(self.units, self._lr_scales, strict=True):
            if scale != 1.0 and self._modes[unit.index] is Mode.TRAIN:
                for p in unit.parameters():
                    self._before[p] = p.detach().clone()

    @torch.no_grad()
    def _after_step(self, _optimizer: torch.optim.Optimizer, _args, _kwargs) -> None:
        if not self._before:
            return
        scale_of = {
            p: scale
            for unit, scale in zip(self.units, self._lr_scales or [], strict=False)
            for p in unit.parameters()
        }
        for p, before in self._before.items():
            p.lerp_(before, 1.0 - scale_of[p])  # before + scale * (after - before)
        self._before = {}

    def _enter(self, unit: Unit, mode: Mode) -> None:
        if mode is Mode.TRAIN:
            for p in unit.parameters():
                p.requires_grad_(True)
            return
        for p in unit.parameters():
            p.requires_grad_(False)
            p.grad = None  # so optimizers skip it: no momentum, no weight decay
        if mode is Mode.FROZEN:
            self._eval_hooks[unit.index] = [
                m.register_forward_pre_hook(_keep_in_eval) for m in unit.modules
            ]
            for m in unit.modules:
                m.eval()
        else:
            self._local.attach(unit)

    def _leave(self, unit: Unit, mode: Mode) -> None:
        if mode is Mode.FROZEN:
            for handle in self._eval_hooks.pop(unit.index, []):
                handle.remove()
            for m in unit.modules:
                m.train(self.model.training)
        elif mode is Mode.LOCAL:
            self._local.detach(unit)
        if mode is not Mode.TRAIN and self.reset_optimizer_state_on_unfreeze:
            for p in unit.parameters():
                self.optimizer.state.pop(p, None)

    # ------------------------------------------------------------------ progress

    def step(self, loss: float | torch.Tensor) -> None:
        """Record the loss of the optimizer step just taken; call once per optimizer step."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        self.last_loss = value
        self.steps += 1
        self._interval_loss_sum += value
        self._interval_loss_count += 1
        if self.dynamics is not None:
            self.dynamics.after_step()
        scale = self.weak_supervision.update(value)
        self._local.lr = self.local_lr * scale * self.lr_ratio()

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def lr_ratio(self) -> float:
        """Current learning rate divided by the one the run started with."""
        return self._current_lr() / self._initial_lr if self._initial_lr > 0 else 1.0

    @property
    def progress(self) -> float:
        """Fraction of ``total_steps`` done (0 when the budget is unknown)."""
        if not self.total_steps:
            return 0.0
        return min(self.steps / self.total_steps, 1.0)

    def steps_in_mode(self) -> list[int]:
        return [self.steps - since for since in self._mode_since]

    # ------------------------------------------------------------------ reporting

    def cost_ratio(self, cached_prefix: int = 0) -> float:
        """Modeled per-iteration cost of the current modes over the all-TRAIN cost, with the
        first ``cached_prefix`` (FROZEN) units served from an activation cache."""
        return cost_ratio(self.units, self._modes, cached_prefix)

    def observe(self) -> dict[str, np.ndarray]:
        """Close the current interval and return the observation a policy decides from (see
        ``freeze_agent.signals.observation``): gradient and weight dynamics of the interval,
        plasticity against the reference result due now, the attention score, progress and
        cost."""
        if self._interval_loss_count:
            self.interval_losses.append(self._interval_loss_sum / self._interval_loss_count)
            self._interval_loss_sum, self._interval_loss_count = 0.0, 0
        signals = Signals(
            steps_in_mode=self.steps_in_mode(),
            dynamics=self.dynamics.end_interval() if self.dynamics else _unmeasured(self.units),
            interval_losses=self.interval_losses,
            predictor_available=self.attention is not None and self.attention.available,
        )
        if self.plasticity is not None:
            signals.reference_available = self.plasticity.available
            measured = self.plasticity.check(self.steps)
            if measured is not None:
                signals.plasticity, signals.plasticity_trend, signals.plasticity_age = measured
        if self.attention is not None:
            signals.attention = self.attention.check()
        observation = self.builder.build(
            self._modes,
            signals,
            progress=self.progress,
            lr_ratio=self.lr_ratio(),
            cost_ratio=self.cost_ratio(),
        )
        self.observations += 1
        self.observations_with_plasticity += has_plasticity(observation)
        return observation

    def signal_report(self) -> dict[str, float | int]:
        """How the signals fared so far: the share of observations that carried plasticity, and
        how often (and how long) an observation waited for a late reference result. The waits
        are wall time: they vary with machine load, the observations do not."""
        monitor = self.plasticity
        return {
            "observations": self.observations,
            "plasticity_fraction": self.observations_with_plasticity / max(self.observations, 1),
            "reference_waits": monitor.waits if monitor is not None else 0,
            "reference_wait_seconds": monitor.wait_seconds if monitor is not None else 0.0,
        }

    def close(self) -> None:
        """Return every unit to TRAIN, remove all hooks and stop the reference worker."""
        self.set_modes([Mode.TRAIN] * len(self.units))
        self.set_learning_rate_scales(None)
        if self._scale_hooks is not None:
            for handle in self._scale_hooks:
                handle.remove()
            self._scale_hooks = None
        if self.plasticity is not None:
            self.plasticity.close()
            self.plasticity = None


def _unmeasured(units: Sequence[Unit]) -> list[UnitDynamics]:
    return [UnitDynamics() for _ in units]


def _keep_in_eval(module: nn.Module, _args: tuple) -> None:
    # model.train() at the start of an epoch would switch a frozen unit's norm layers and
    # dropout back on; this puts them back in eval before every forward.
    if module.training:
        module.eval()
