"""The one place where units change mode.

``FreezeController`` partitions a model into units and owns every mode change, so that frozen
parameters receive no gradient, no momentum and no weight decay, norm statistics and dropout
freeze with them, and local units learn by the local rule. The trainer, the Gymnasium
environment and a user's own training loop all drive the same object.

In a user's loop it comes from ``FreezeController.from_pretrained``, with a policy attached: then
``step(loss)`` also decides at the planned steps (observe, decide, apply), ``wrap_loader`` serves
the frozen prefix from the activation cache, the safety net undoes freezes that hurt, and
``summary`` / ``plot_timeline`` / ``state_dict`` report and checkpoint the run.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from freeze_agent.controller.cached_loader import CachedLoader, ForwardRouter, why_not_cacheable
from freeze_agent.controller.decision_schedule import DecisionSchedule
from freeze_agent.controller.safety_net import Alarm, SafetyNet, SafetyNetEvent
from freeze_agent.core.cost_model import cost_ratio
from freeze_agent.core.local_learning import LocalLearning, WeakSupervision
from freeze_agent.core.mode_timeline import plot_timeline
from freeze_agent.core.modes import Mode, effective_modes, parse_modes
from freeze_agent.core.prefix_cache import PrefixCache
from freeze_agent.core.units import ModelInput, Unit, partition
from freeze_agent.policies.base import Policy
from freeze_agent.policies.registry import make_policy
from freeze_agent.signals.attention import AttentionScore
from freeze_agent.signals.dynamics import DynamicsTracker, UnitDynamics
from freeze_agent.signals.observation import ObservationBuilder, Signals, has_plasticity
from freeze_agent.signals.plasticity import PlasticityMonitor

_STATE_FORMAT = 1


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

    Call ``step(loss)`` once after each optimizer step and ``observe()`` once per decision;
    or build it with ``from_pretrained``, and ``step(loss)`` decides by itself.
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
        # what TRAIN means for each parameter: the model's own requires_grad, so a parameter it
        # keeps fixed (Whisper's sinusoidal position table, a feature encoder frozen with
        # ``freeze_feature_encoder()``) stays fixed when its unit returns to TRAIN
        self._trainable: dict[torch.Tensor, bool] = {p: p.requires_grad for p in model.parameters()}
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
        self.last_observation: dict[str, np.ndarray] | None = None
        self.builder = ObservationBuilder(self.units, max_units, total_steps)
        self._interval_loss_sum, self._interval_loss_count = 0.0, 0
        self.interval_losses: list[float] = []
        self._lr_scales: list[float] | None = None
        self._scale_hooks: tuple[RemovableHandle, RemovableHandle] | None = None
        self._before: dict[torch.Tensor, torch.Tensor] = {}
        # deployment: set by from_pretrained / attach_policy and wrap_loader
        self.policy: Policy | None = None
        self.schedule: DecisionSchedule | None = None
        self.safety_net: SafetyNet | None = None
        self.cache: PrefixCache | None = None
        self._router: ForwardRouter | None = None
        self._cache_reason = "wrap_loader() was not called"
        self._retired: dict[int, str] = {}  # cache depths that failed, from a checkpoint
        self._held_until: dict[int, int] = {}
        self.timeline: list[dict[str, Any]] = []
        self.validation: list[tuple[int, float]] = []
        self._cost_sum = 0.0
        self._costs: dict[tuple[tuple[Mode, ...], int], float] = {}
        self.measured_seconds = 0.0
        self.decision_seconds = 0.0
        self._last_step_end: float | None = None

    # ------------------------------------------------------------------ deployment

    @classmethod
    def from_pretrained(
        cls,
        policy: str | Policy,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        example_input: ModelInput,
        *,
        total_steps: int | None = None,
        decisions: int = 30,
        interval_steps: int | None = None,
        safety_net: bool | SafetyNet = True,
        **kwargs: Any,
    ) -> FreezeController:
        """A controller that decides by itself, for a user's own training loop.

        Loads ``policy``, partitions ``model`` and makes the first decision; from then on
        ``step(loss)``, called once per optimizer step, observes, decides and applies the modes
        at every interval.

        Args:
            policy: a shipped policy's name (``"default"``), a trained policy's folder, any
                registered policy's spec (``"autofreeze"``, ``"linear-prefix:0.2"``) or a
                ``Policy``.
            model, optimizer, example_input: as for the constructor.
            total_steps: optimizer steps the run will take (``epochs * len(loader)`` divided by
                the gradient-accumulation steps); sets the interval and the progress feature.
            decisions: decisions over ``total_steps`` (the shipped policy was trained with 30).
            interval_steps: optimizer steps between decisions, instead of ``decisions``.
            safety_net: True (default) for the default ``SafetyNet``, a ``SafetyNet`` to tune
                it, False to turn it off.
            **kwargs: the constructor's other arguments (``max_units``, ``reference``, ...).
                ``signals`` defaults to the policy's ``reads_signals``: a fixed schedule
                (``linear``, ``freezeout``, ...) reads only progress, so it runs without the
                per-step gradient sums, the probe forwards and the reference worker.
        """
        chosen = make_policy(policy) if isinstance(policy, (str, Path)) else policy
        if not isinstance(chosen, Policy):
            raise TypeError(
                f"policy must be a policy name, a policy folder or a Policy, got "
                f"{type(policy).__name__}"
            )
        schedule = DecisionSchedule.plan(total_steps, decisions, interval_steps)
        kwargs.setdefault("signals", chosen.reads_signals)
        controller = cls(model, optimizer, example_input, total_steps=total_steps, **kwargs)
        try:
            controller.attach_policy(chosen, schedule, safety_net=safety_net)
        except BaseException:
            controller.close()
            raise
        return controller

    def attach_policy(
        self, policy: Policy, schedule: DecisionSchedule, *, safety_net: bool | SafetyNet = True
    ) -> None:
        """Let ``policy`` decide at ``schedule``'s steps from now on, and decide once now."""
        policy.reset()  # a privileged policy refuses here, with the reason
        self.policy, self.schedule = policy, schedule
        if isinstance(safety_net, SafetyNet):
            self.safety_net = safety_net
        else:
            self.safety_net = SafetyNet() if safety_net else None
        if schedule.due(self.steps):
            self.decide()

    def decide(self) -> list[Mode]:
        """Observe, let the policy decide and apply its modes; ``step`` calls it when due."""
        if self.policy is None:
            raise RuntimeError(
                "no policy is attached: build the controller with "
                "FreezeController.from_pretrained(policy, model, optimizer, example_input, ...)"
            )
        started = time.perf_counter()
        observation = self.observe()
        if self.safety_net is not None and self.steps and self.interval_losses:
            self._raise_alarm(self.safety_net.watch_loss(self.interval_losses[-1]))
        applied = self._apply(self.policy.decide(observation), cause="policy")
        self.set_learning_rate_scales(self.policy.learning_rate_scales())
        self.decision_seconds += time.perf_counter() - started
        return applied

    def report_validation(
        self, metric: float, higher_is_better: bool = True, tolerance: float | None = None
    ) -> None:
        """Tell the safety net a validation result (accuracy, or a loss with
        ``higher_is_better=False``); call it whenever the loop evaluates. If the metric fell
        behind its best by more than the tolerance, the most recently frozen units go back to
        TRAIN now (a warning says so)."""
        self.validation.append((self.steps, float(metric)))
        if self.safety_net is not None:
            alarm = self.safety_net.report(
                metric, higher_is_better=higher_is_better, tolerance=tolerance
            )
            self._raise_alarm(alarm)

    def _raise_alarm(self, alarm: Alarm | None) -> None:
        """Unfreeze the most recently frozen units (and LOCAL units after them, which would
        stop their gradient) and hold them in TRAIN; a hold in force defers all but urgent
        alarms, as recovery takes time."""
        net = self.safety_net
        if alarm is None or net is None or all(m is Mode.TRAIN for m in self._modes):
            return
        holding = self._holding()
        if holding and not alarm.urgent:
            return
        candidates = [
            u for u, m in enumerate(self._modes) if m is not Mode.TRAIN and u not in holding
        ]
        units: list[int] = []
        if candidates:
            latest = max(self._mode_since[u] for u in candidates)
            units = [u for u in candidates if self._mode_since[u] == latest]
            units += [
                u
                for u in range(min(units) + 1, len(self.units))
                if self._modes[u] is Mode.LOCAL and u not in units
            ]
        interval = self.schedule.interval_steps if self.schedule is not None else 1
        until = self.steps + net.hold_decisions * interval
        for u in units:
            self._held_until[u] = until
        self._apply(self._modes, cause="safety net")
        net.events.append(SafetyNetEvent(self.steps, alarm.reason, sorted(units), until))
        names = ", ".join(self.units[u].name for u in sorted(units)) or "none left to unfreeze"
        warnings.warn(
            f"freeze-agent safety net at step {self.steps}: {alarm.reason}; back to TRAIN "
            f"until step {until}: {names}",
            stacklevel=3,
        )

    def _holding(self) -> set[int]:
        return {u for u, until in self._held_until.items() if until > self.steps}

    def _apply(self, modes: Sequence[Mode | int | str], cause: str) -> list[Mode]:
        """``set_modes`` with the safety net's holds in force, recorded in the timeline."""
        requested = parse_modes(modes, len(self.units))
        held = self._holding()
        self._held_until = {u: self._held_until[u] for u in held}
        for u in held:
            requested[u] = Mode.TRAIN
        # a LOCAL unit detaches its output, which would freeze the held units before it
        for u in range(min(held, default=len(self.units)) + 1, len(self.units)):
            if requested[u] is Mode.LOCAL:
                requested[u] = Mode.TRAIN
        applied = self._set_modes(requested)
        self._record(cause)
        return applied

    def wrap_loader(
        self,
        loader: Iterable,
        *,
        deterministic: bool | None = None,
        memory_budget_bytes: int = 1 << 30,
        spill_dir: str | Path | None = None,
    ) -> CachedLoader:
        """The training loader, yielding the same batches; while the frozen prefix ends at a
        cut point, each batch's training forward skips the prefix and reads its boundary
        activation from the cache (``freeze_agent.controller.cached_loader``).

        Args:
            loader: a ``DataLoader`` over a map-style dataset (anything else passes through,
                with the reason in ``summary()["cache"]``).
            deterministic: whether a sample always reaches the model as the same input; None
                checks it by collating a few samples twice.
            memory_budget_bytes: memory for stored activations; rows beyond spill to disk.
            spill_dir: folder of the spill files (a temporary folder by default).
        """
        self._drop_cache()
        reason = why_not_cacheable(loader, deterministic)
        if reason is not None:
            self._cache_reason = reason
            return CachedLoader(loader, None, reason)
        self.cache = PrefixCache(
            self.model,
            self.units,
            len(loader.dataset),  # type: ignore[attr-defined]
            deterministic_data=True,
            memory_budget_bytes=memory_budget_bytes,
            spill_dir=Path(spill_dir) if spill_dir is not None else None,
        )
        self.cache.retire(self._retired)
        self.cache.update(self._modes)
        self._router = ForwardRouter(self.model, self.cache)
        return CachedLoader(loader, self._router, None)

    def _drop_cache(self) -> None:
        if self._router is not None:
            self._router.remove()
            self._router = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    # ------------------------------------------------------------------ modes

    @property
    def modes(self) -> list[Mode]:
        """The effective mode of each unit."""
        return list(self._modes)

    def set_modes(self, modes: Sequence[Mode | int | str]) -> list[Mode]:
        """Apply ``modes`` (one per unit) and return the modes that actually apply: the head is
        always TRAIN, and TRAIN units upstream of a LOCAL unit become FROZEN."""
        applied = self._set_modes(modes)
        self._record("user")
        return applied

    def _record(self, cause: str) -> None:
        modes = "".join(m.name[0] for m in self._modes)
        self.timeline.append({"step": self.steps, "modes": modes, "cause": cause})

    def _set_modes(self, modes: Sequence[Mode | int | str]) -> list[Mode]:
        new = effective_modes(modes, self.units)
        for unit, old_mode, new_mode in zip(self.units, self._modes, new, strict=True):
            if old_mode is new_mode:
                continue
            self._leave(unit, old_mode)
            self._enter(unit, new_mode)
            self._mode_since[unit.index] = self.steps
        froze = any(
            old is Mode.TRAIN and now is not Mode.TRAIN
            for old, now in zip(self._modes, new, strict=True)
        )
        self._modes = new
        if froze and self.safety_net is not None:
            self.safety_net.froze()
        if self.cache is not None:
            self.cache.update(new)
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
                p.requires_grad_(self._trainable.get(p, True))
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
        now = time.perf_counter()
        if self._last_step_end is not None:
            self.measured_seconds += now - self._last_step_end
        self._cost_sum += self._step_cost()
        if self.policy is not None and self.schedule is not None and self.schedule.due(self.steps):
            self.decide()
        self._last_step_end = time.perf_counter()

    def _step_cost(self) -> float:
        """Modeled cost of the step just taken: rows served from the cache skip the prefix."""
        depth, hit = self.cache.last_batch if self.cache is not None else (0, 0.0)
        uncached = self._cost(0)
        return uncached if not depth else hit * self._cost(depth) + (1 - hit) * uncached

    def _cost(self, cached_prefix: int) -> float:
        key = (tuple(self._modes), cached_prefix)
        if key not in self._costs:
            self._costs[key] = self.cost_ratio(cached_prefix)
        return self._costs[key]

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

    @property
    def modeled_speedup(self) -> float:
        """All-TRAIN cost over the modeled cost of the steps taken so far (cache hits included)."""
        return self.steps / self._cost_sum if self._cost_sum > 0 else 1.0

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
        self.last_observation = observation
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

    def summary(self) -> dict[str, Any]:
        """What the controller did so far, as plain data (for logs and reports).

        ``timeline``: one string of mode letters (T/L/F, one per unit) per decision, at
        ``decision_steps``; ``modeled_speedup``: all-TRAIN cost over the modeled cost of the
        steps taken (cache hits included); ``measured_seconds``: wall time between consecutive
        ``step`` calls, decisions excluded (``decision_seconds``); ``cache``: hits, misses, state
        and why it is off; ``safety_net``: its interventions (None when it is off).
        """
        cache: dict[str, Any]
        if self.cache is not None:
            cache = asdict(self.cache.stats())
            cache["routed_batches"] = self._router.routed if self._router is not None else 0
        else:
            cache = {"state": "off", "hits": 0, "misses": 0, "reason_off": self._cache_reason}
        return {
            "policy": self.policy.name if self.policy is not None else None,
            "units": [unit.name for unit in self.units],
            "steps": self.steps,
            "timeline": [entry["modes"] for entry in self.timeline],
            "decision_steps": [entry["step"] for entry in self.timeline],
            "causes": [entry["cause"] for entry in self.timeline],
            "modeled_speedup": self.modeled_speedup,
            "measured_seconds": self.measured_seconds,
            "decision_seconds": self.decision_seconds,
            "cache": cache,
            "safety_net": (
                [event.to_dict() for event in self.safety_net.events]
                if self.safety_net is not None
                else None
            ),
            "validation": [list(entry) for entry in self.validation],
            "signals": self.signal_report(),
        }

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue with the same decisions: modes, the step
        count, signal history (dynamics, plasticity and its reference results, the attention
        history, losses), the policy's and the safety net's state, the timeline and the
        activation cache's retired boundaries (stored activations refill after a resume).

        Plain data and tensors only, so ``torch.save`` / ``torch.load(weights_only=True)`` and
        framework checkpoints carry it. Save the model and optimizer beside it as usual.
        """
        return {
            "format": _STATE_FORMAT,
            "units": [unit.name for unit in self.units],
            "modes": [int(m) for m in self._modes],
            "mode_since": list(self._mode_since),
            "steps": self.steps,
            "last_loss": self.last_loss,
            "interval_loss": [self._interval_loss_sum, self._interval_loss_count],
            "interval_losses": list(self.interval_losses),
            "observations": [self.observations, self.observations_with_plasticity],
            "initial_lr": self._initial_lr,
            "lr_scales": self._lr_scales,
            "weak_supervision": self.weak_supervision.state_dict(),
            "builder": self.builder.state_dict(),
            "dynamics": self.dynamics.state_dict() if self.dynamics is not None else None,
            "plasticity": self.plasticity.state_dict() if self.plasticity is not None else None,
            "attention": self.attention.history.state_dict() if self.attention else None,
            "policy": self.policy.state_dict() if self.policy is not None else None,
            "safety_net": self.safety_net.state_dict() if self.safety_net is not None else None,
            "held_until": dict(self._held_until),
            "timeline": [dict(entry) for entry in self.timeline],
            "validation": [list(entry) for entry in self.validation],
            "cost": [self._cost_sum, self.measured_seconds, self.decision_seconds],
            "cache_failed": self.cache.failed if self.cache is not None else dict(self._retired),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s checkpoint: build the controller as the first run
        did (same model, policy and arguments), load the model and optimizer, then this."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(
                "not a FreezeController checkpoint (no 'format' entry of version "
                f"{_STATE_FORMAT}): pass what FreezeController.state_dict() returned"
            )
        names = [unit.name for unit in self.units]
        if state["units"] != names:
            raise ValueError(
                f"the checkpoint is of a model partitioned into {len(state['units'])} units "
                f"({', '.join(state['units'])}), this controller has {len(names)} "
                f"({', '.join(names)}): build it with the same model and max_units"
            )
        for part, owner in (
            ("dynamics", self.dynamics),
            ("plasticity", self.plasticity),
            ("policy", self.policy),
            ("safety_net", self.safety_net),
        ):
            if (state[part] is None) != (owner is None):
                saved = "with" if state[part] is not None else "without"
                raise ValueError(
                    f"the checkpoint was saved {saved} {part.replace('_', ' ')}; build the "
                    "controller with the same arguments as the run that saved it"
                )
        self.steps = state["steps"]
        self._set_modes([Mode(m) for m in state["modes"]])
        self._mode_since = list(state["mode_since"])
        self.last_loss = state["last_loss"]
        self._interval_loss_sum, self._interval_loss_count = state["interval_loss"]
        self.interval_losses = list(state["interval_losses"])
        self.observations, self.observations_with_plasticity = state["observations"]
        self._initial_lr = state["initial_lr"]
        self.set_learning_rate_scales(state["lr_scales"])
        self.weak_supervision.load_state_dict(state["weak_supervision"])
        self.builder.load_state_dict(state["builder"])
        if self.dynamics is not None:
            self.dynamics.load_state_dict(state["dynamics"])
        if self.plasticity is not None:
            self.plasticity.load_state_dict(state["plasticity"])
        if self.attention is not None and state["attention"] is not None:
            self.attention.history.load_state_dict(state["attention"])
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])
        if self.safety_net is not None:
            self.safety_net.load_state_dict(state["safety_net"])
        self._held_until = {int(u): until for u, until in state["held_until"].items()}
        self.timeline = [dict(entry) for entry in state["timeline"]]
        self.validation = [(step, value) for step, value in state["validation"]]
        self._cost_sum, self.measured_seconds, self.decision_seconds = state["cost"]
        self._last_step_end = None
        self._retired = {int(depth): why for depth, why in state["cache_failed"].items()}
        if self.cache is not None:
            self.cache.retire(self._retired)

    def plot_timeline(self, path: str | Path, title: str = "") -> Path:
        """Draw the mode timeline (units down, decisions across) to an image file."""
        timeline = [entry["modes"] for entry in self.timeline]
        figure = plot_timeline([u.name for u in self.units], timeline, title)
        figure.savefig(path)
        return Path(path)

    def close(self) -> None:
        """Return every unit to TRAIN, remove all hooks, drop the activation cache and stop the
        reference worker."""
        self._drop_cache()
        self._set_modes([Mode.TRAIN] * len(self.units))
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
