"""Deploy a freeze policy in a PyTorch Lightning ``Trainer.fit``: ``FreezePolicyCallback``.

The callback drives the same ``FreezeController.from_pretrained`` a plain loop uses; Lightning
owns the loop, so the callback hooks in where the loop's four freeze-agent lines would be:

* ``on_fit_start``: fail fast (before the sanity check) on a wrong ``model_attr`` or a
  ``configure_optimizers`` that returned no or several optimizers.
* ``on_train_start``: build the controller (``_build_controller``). It is the first hook where
  everything the controller needs is final: the optimizer and scheduler exist (the strategy
  built them from ``configure_optimizers`` before ``on_fit_start``), a resumed run has its
  optimizer, scheduler and loop counters (``trainer.global_step``) restored (after
  ``on_fit_start``), and the training loader is set up (``trainer.train_dataloader``). The
  example batch comes from ``example_batch`` (the loader is never iterated, so the data order
  is the one the run has without freeze-agent) and goes through Lightning's own batch
  preparation (precision conversion, batch-transfer hooks, device).
  Callback state from a checkpoint is loaded (``load_state_dict``) before this hook, so it is
  kept and applied right after the controller is built.
* ``on_train_batch_end``: once per optimizer step, seen as ``trainer.global_step`` advancing
  (so with ``accumulate_grad_batches=k`` once every k batches), call ``controller.step`` with
  the mean ``training_step`` loss over the batches the step accumulated (Lightning's
  ``outputs["loss"]`` times ``accumulate_grad_batches``, undoing its normalization), and
  log ``controller_metrics`` with ``pl_module.log_dict``. Lightning has stepped the
  optimizer and the step-interval schedulers by then, as a plain loop does before
  ``controller.step``, and ``self.log`` is allowed in this hook (not in ``on_validation_end``
  or ``on_train_start``). The metrics are logged at the steps where Lightning writes step
  metrics (``Trainer(log_every_n_steps=...)``), so they reach whatever loggers the trainer has
  (CSV, TensorBoard, W&B) in the same rows as the user's own ``self.log`` values.
* ``on_validation_end``: ``trainer.callback_metrics[monitor]`` goes to
  ``controller.report_validation`` (the safety net). This hook sees metrics the LightningModule
  logs in its own ``on_validation_epoch_end``, which a callback's ``on_validation_epoch_end``
  (called before the module's) would miss. A unit the safety net unfreezes there is put back in
  training mode in the next ``on_train_batch_start``: after this hook Lightning restores every
  submodule's mode from before the validation, when the unit was frozen (in eval mode).
* ``on_train_epoch_start``: with ``cache=True``, put the controller's cached loader
  (``FreezeController.wrap_loader``) in place of the training loader (again whenever Lightning
  reloads its loaders). Lightning creates the first epoch's iterator before any hook runs, so
  the cache serves from the second epoch on.
* ``on_fit_end`` / ``on_exception`` / ``teardown``: keep the final summary and state, then
  ``controller.close()`` (units back to TRAIN, reference worker stopped).
* ``state_dict`` / ``load_state_dict``: the controller's state travels in Lightning's
  checkpoints, so ``trainer.fit(ckpt_path=...)`` continues with the same decisions.

**DDP** (``Trainer(strategy="ddp_find_unused_parameters_true")``, or
``DDPStrategy(find_unused_parameters=True)``; the processes launched by Lightning or by
``torchrun``): by ``on_train_start`` the strategy has wrapped the model in
``DistributedDataParallel`` (``trainer.strategy.model``), and every rank builds a
``DistributedFreezeController`` (``freeze_agent.integrations.ddp``) on the module it
partitions, never on the wrapper, whose forward runs ``training_step``; ``attach_ddp`` then
registers the communication hook that leaves frozen gradients out of the all-reduce. Rank 0
decides at the planned steps and every rank applies its modes (``on_train_batch_end`` runs on
every rank at the same optimizer steps, and the decision is a collective there); rank 0 alone
measures the signals and runs the reference worker. ``on_validation_end`` calls
``report_validation`` on every rank, as it must (a collective: rank 0's ``monitor`` value is the
one judged). A strategy without ``find_unused_parameters=True`` fails here with what to pass,
before anything is partitioned; Lightning's ``ddp_comm_hook=`` is refused (DDP takes one hook,
and freeze-agent's is it). The logged metrics are the same on every rank (the modes are), so
each rank logs them as Lightning lets it. Lightning saves the callback's state from rank 0 and
loads it on every rank: ranks other than 0 skip its signals' part. ``summary()["ddp"]`` counts
the all-reduce bytes saved (``DistributedFreezeController.distributed_stats``).

Three Lightning internals are read, each where no public API gives the same: the training
loop's ``CombinedLoader`` (``trainer.fit_loop._combined_loader``, to put the cached loader in),
``LightningModule._on_before_batch_transfer`` (the batch hook the loop calls, datamodule
included) and ``trainer._logger_connector.should_update_logs`` (the log cadence; without it,
every step is logged).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "freeze_agent.integrations.lightning needs PyTorch Lightning: "
        "pip install 'freeze-agent[lightning]'"
    ) from error

from freeze_agent.controller import FreezeController
from freeze_agent.controller.safety_net import SafetyNet
from freeze_agent.core.modes import Mode
from freeze_agent.core.units import (
    ModelInput,
    Unit,
    batch_size_of,
    call_model,
    preserved_state,
)
from freeze_agent.integrations.common import build_controller, controller_metrics, example_batch
from freeze_agent.integrations.ddp import (
    check_ddp_wrapper,
)
from freeze_agent.policies.base import Policy
from freeze_agent.policies.registry import make_policy

__all__ = ["FreezePolicyCallback"]

_STATE_FORMAT = 1


class FreezePolicyCallback(pl.Callback):
    """Let a freeze policy decide, while ``Trainer.fit`` runs, which units of the model train,
    learn locally or freeze: ``FreezeController.from_pretrained`` for Lightning.

    ::

        trainer = Trainer(max_epochs=10, callbacks=[FreezePolicyCallback("default")])
        trainer.fit(module, datamodule=data)
        print(trainer.callbacks[0].summary())

    Args:
        policy: a shipped policy's name (``"default"``), a trained policy's folder, a registered
            policy's spec (``"linear-prefix:0.2"``) or a ``Policy``; resolved here, so a wrong
            name fails when the callback is made.
        decisions: decisions over the run (the shipped policy was trained with 30).
        interval_steps: optimizer steps between decisions, instead of ``decisions``.
        total_steps: optimizer steps the run takes; default ``trainer.estimated_stepping_batches``
            (``max_epochs`` x batches / ``accumulate_grad_batches``, capped by ``max_steps``).
            Pin it when a run is continued with other limits (a first ``fit`` with
            ``max_steps=100``, a resumed one with ``max_steps=200``): the decision schedule and
            the policy's progress feature follow it, so a resumed run keeps the first run's
            decisions only when both runs plan the same total.
        safety_net: True for the default ``SafetyNet``, a ``SafetyNet`` to tune it, False off.
        monitor: the validation metric (a key of ``trainer.callback_metrics``, as logged with
            ``self.log`` in ``validation_step``) the safety net watches after each validation;
            None: report none (the net then watches the training loss only).
        mode: ``"min"`` when lower ``monitor`` is better (a loss), ``"max"`` when higher is
            (an accuracy), as for ``ModelCheckpoint`` and ``EarlyStopping``.
        model_attr: dotted name of the submodule to partition and freeze (``"model"`` for
            ``self.model``); default: the LightningModule itself, whose ``forward`` must then
            take the input.
        input_fn: the partitioned module's input from one training batch (as ``training_step``
            receives it): a tensor, a tuple of positional arguments or a dict of keyword
            arguments. Default: a dict batch as keywords, the first element of a tuple or list
            batch, any other batch as it is.
        cache: serve the frozen prefix from the activation cache, as
            ``FreezeController.wrap_loader`` does in a plain loop: True, or a dict of
            ``wrap_loader``'s options (``deterministic``, ``memory_budget_bytes``,
            ``spill_dir``). It serves from the second epoch on (Lightning starts the first
            epoch's loader iterator before any callback hook, and restarting it would change
            the data order), needs a single map-style training ``DataLoader``, and the
            partitioned module's training forward must be called directly (``self(x)``
            with ``model_attr=None``, ``self.model(x)`` with ``model_attr="model"``); batches
            changed by augmentation in the batch-transfer hooks must not be cached.
        log: log ``controller_metrics`` (frozen and local fractions, units per mode, modeled
            speedup, each unit's mode) through ``pl_module.log_dict`` at the optimizer steps
            where the trainer writes its step logs (every ``log_every_n_steps``).
        log_prefix: prefix of the logged names.
        **controller_kwargs: the controller's other arguments (``max_units``, ``reference``,
            ``signals``, ``local_lr``, ...).

    ``controller`` is the ``FreezeController`` from ``on_train_start`` on. After ``fit`` it is
    closed (every unit back in TRAIN, the reference worker stopped); ``controller.summary()``
    still works, and ``summary()`` gives the summary exactly as it was when training ended.
    Under DDP it is a ``DistributedFreezeController`` on every rank, and the summary has its
    ``"ddp"`` entry (the all-reduce bytes saved); rank 0's alone has the signals (see the module
    docstring).
    """

    def __init__(
        self,
        policy: str | Path | Policy = "default",
        *,
        decisions: int = 30,
        interval_steps: int | None = None,
        total_steps: int | None = None,
        safety_net: bool | SafetyNet = True,
        monitor: str | None = "val_loss",
        mode: str = "min",
        model_attr: str | None = None,
        input_fn: Callable[[Any], ModelInput] | None = None,
        cache: bool | Mapping[str, Any] = False,
        log: bool = True,
        log_prefix: str = "freeze/",
        **controller_kwargs: Any,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if isinstance(policy, (str, Path)):
            policy = make_policy(str(policy))
        if not isinstance(policy, Policy):
            raise TypeError(
                f"policy must be a policy name, a policy folder or a Policy, got "
                f"{type(policy).__name__}"
            )
        self.policy = policy
        self.decisions = decisions
        self.interval_steps = interval_steps
        self.total_steps = total_steps
        self.safety_net = safety_net
        self.monitor = monitor
        self.mode = mode
        self.model_attr = model_attr
        self.input_fn = input_fn
        self.cache_options: dict[str, Any] | None = (
            dict(cache) if isinstance(cache, Mapping) else ({} if cache else None)
        )
        self.log_metrics = log
        self.log_prefix = log_prefix
        self.controller_kwargs = controller_kwargs

        self._controller: FreezeController | None = None
        self._closed = False
        self._planned_steps: int | None = None
        self._restored: dict[str, Any] | None = None
        self._final_summary: dict[str, Any] | None = None
        self._final_state: dict[str, Any] | None = None
        self._seen_global_step = 0
        self._loss_sum, self._loss_count = 0.0, 0
        self._cached_loader: Any = None
        self._unfrozen_in_validation: list[Unit] = []
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ public

    @property
    def state_key(self) -> str:
        return self._generate_state_key(policy=self.policy.name, model_attr=self.model_attr)

    @property
    def controller(self) -> FreezeController:
        """The ``FreezeController``, built when training starts (``on_train_start``)."""
        if self._controller is None:
            raise RuntimeError(
                "FreezePolicyCallback.controller exists once training starts: it is built in "
                "on_train_start of trainer.fit(), when the optimizer and the training data "
                "are ready"
            )
        return self._controller

    def summary(self) -> dict[str, Any]:
        """``controller.summary()``: live while training runs, as it was at the end of
        training once ``fit`` returned (the controller is closed by then)."""
        if self._final_summary is not None and self._closed:
            return self._final_summary
        return self.controller.summary()

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module_to_freeze(pl_module)
        self._optimizer(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._controller, self._closed = None, False
        self._final_summary = self._final_state = None
        self._cached_loader = None
        self._unfrozen_in_validation = []
        self._loss_sum, self._loss_count = 0.0, 0
        restored, self._restored = self._restored, None
        self._planned_steps = self._total_steps(trainer, resumed=restored is not None)
        self._controller = self._build_controller(trainer, pl_module)
        self._seen_global_step = trainer.global_step
        if restored is not None:
            self._apply_restored(restored, trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cache_options is not None and self._live():
            self._install_cache(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._live():
            return
        loss = _loss_of(outputs)
        if loss is not None:
            # Lightning divides the automatic-optimization loss by accumulate_grad_batches
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self._loss_sum += loss * scale
            self._loss_count += 1
        stepped = trainer.global_step - self._seen_global_step
        if stepped <= 0:
            return
        self._seen_global_step = trainer.global_step
        controller = self.controller
        if self._loss_count:
            step_loss = self._loss_sum / self._loss_count
        else:  # training_step returned no loss (a skipped batch): repeat the last one
            step_loss = controller.last_loss if controller.last_loss is not None else 0.0
        self._loss_sum, self._loss_count = 0.0, 0
        for _ in range(stepped):
            controller.step(step_loss)
        if self.log_metrics and trainer.loggers and _logs_due(trainer):
            pl_module.log_dict(
                controller_metrics(controller, self.log_prefix),
                on_step=True,
                on_epoch=False,
                prog_bar=False,
                logger=True,
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor is None or not self._live():
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            self._warn_once(
                "monitor",
                f"FreezePolicyCallback(monitor={self.monitor!r}): no such metric after "
                f"validation; the logged metrics are "
                f"{', '.join(sorted(trainer.callback_metrics)) or 'none'}. The safety net "
                "watches the training loss only: log the metric in validation_step "
                "(self.log(...)), name another with monitor=..., or pass monitor=None",
            )
            return
        controller = self.controller
        before = controller.modes
        controller.report_validation(float(value), higher_is_better=self.mode == "max")
        # A unit the safety net unfreezes here goes back to the module's mode, eval during
        # validation, and Lightning then restores every submodule's mode from before validation,
        # when the unit was frozen (eval): it would train in eval mode (batch norm on running
        # statistics). Its mode is set again before the next training batch.
        self._unfrozen_in_validation += [
            unit
            for unit, old, new in zip(controller.units, before, controller.modes, strict=True)
            if old is Mode.FROZEN and new is not Mode.FROZEN
        ]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Put the units the last validation unfroze in the module's training mode again."""
        if self._unfrozen_in_validation and self._live():
            training = self.controller.model.training
            for unit in self._unfrozen_in_validation:
                if self.controller.modes[unit.index] is not Mode.FROZEN:
                    for module in unit.modules:
                        module.train(training)
        self._unfrozen_in_validation = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._finish()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (plain data and tensors) and the callback's own: the total
        steps it planned and the losses of an optimizer step still accumulating."""
        if self._live():
            return {
                "format": _STATE_FORMAT,
                "controller": self.controller.state_dict(),
                "total_steps": self._planned_steps,
                "accumulated_loss": [self._loss_sum, self._loss_count],
            }
        if self._final_state is not None:
            return self._final_state
        return dict(self._restored) if self._restored is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's state; it is applied as soon as ``on_train_start`` has built
        the controller (Lightning restores callbacks before that)."""
        if not state_dict:
            return
        if state_dict.get("format") != _STATE_FORMAT or "controller" not in state_dict:
            raise ValueError(
                "not a FreezePolicyCallback checkpoint state (no 'format' entry of version "
                f"{_STATE_FORMAT} with a 'controller' entry)"
            )
        self._restored = dict(state_dict)

    # ------------------------------------------------------------------ building

    def _build_controller(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> FreezeController:
        """The controller for this run: the module to freeze, the optimizer Lightning built
        from ``configure_optimizers`` and one training batch as ``training_step`` sees it.

        Under a DDP strategy (the module wrapped in ``DistributedDataParallel``, or more than
        one process) it is a ``DistributedFreezeController`` built on the module itself (not on
        Lightning's wrapper, whose forward runs ``training_step``), every rank building it at
        this same hook, with the communication hook registered on ``trainer.strategy.model``
        (``attach_ddp``). The wrapper is checked first, so that a strategy without
        ``find_unused_parameters=True`` fails before anything is partitioned."""
        module = self._module_to_freeze(pl_module)
        optimizer = self._optimizer(trainer)
        wrapper = _ddp_wrapper(trainer, module)
        inputs = self._example_input(trainer, pl_module, module)
        arguments: dict[str, Any] = {
            "total_steps": self._planned_steps,
            "decisions": self.decisions,
            "interval_steps": self.interval_steps,
            "safety_net": self.safety_net,
            **self.controller_kwargs,
        }
        # under DDP a collective: every rank reaches on_train_start together
        return build_controller(
            self.policy, module, optimizer, inputs, wrapper=wrapper, **arguments
        )

    def _module_to_freeze(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.model_attr is None:
            return pl_module
        try:
            module = pl_module.get_submodule(self.model_attr)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"FreezePolicyCallback(model_attr={self.model_attr!r}): "
                f"{type(pl_module).__name__} has no submodule {self.model_attr!r}; its "
                f"submodules with parameters are: {_param_children(pl_module) or 'none'}"
            )
        return module

    def _optimizer(self, trainer: pl.Trainer) -> torch.optim.Optimizer:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise RuntimeError(
                f"FreezePolicyCallback drives one optimizer; configure_optimizers returned "
                f"{len(optimizers)}. The controller reads the learning rate of, and keeps frozen "
                "units out of, a single optimizer: put all parameters in one optimizer (with "
                "parameter groups for different settings)"
            )
        return optimizers[0]

    def _example_input(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, module: nn.Module
    ) -> ModelInput:
        """One training batch, taken without iterating the loader and prepared as the training
        loop prepares each batch, turned into the module's input; checked to run."""
        loaders = trainer.train_dataloader
        if loaders is None:
            raise RuntimeError("FreezePolicyCallback found no training dataloader to trace with")
        if isinstance(loaders, Mapping):
            batch: Any = {key: example_batch(loader) for key, loader in loaders.items()}
        elif isinstance(loaders, (list, tuple)):
            batch = type(loaders)(example_batch(loader) for loader in loaders)
        else:
            batch = example_batch(loaders)
        # the training loop's own preparation (training_epoch_loop.advance)
        batch = trainer.precision_plugin.convert_input(batch)
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        if self.input_fn is not None:
            inputs = self.input_fn(batch)
        elif isinstance(batch, Mapping):
            inputs = dict(batch)
        elif isinstance(batch, (tuple, list)) and batch:
            inputs = batch[0]
        else:
            inputs = batch
        self._check_runs(pl_module, module, inputs)
        return inputs

    def _check_runs(self, pl_module: pl.LightningModule, module: nn.Module, inputs: Any) -> None:
        """Run ``module`` once on ``inputs`` (no gradients, state restored) so that a wrong
        module or input fails with what to pass, not deep inside the partition."""
        name = self.model_attr or type(pl_module).__name__
        try:
            batch_size_of(inputs)
            with preserved_state(module), torch.no_grad():  # every generator put back
                call_model(module, inputs)
        except Exception as error:
            raise ValueError(
                f"FreezePolicyCallback could not run {name}({_describe(inputs)}) to partition "
                f"it ({type(error).__name__}: {error}). The callback calls the module it "
                "freezes on an input built from one training batch, not training_step: pass "
                "model_attr='...' naming the submodule training_step runs (submodules with "
                f"parameters: {_param_children(pl_module) or 'none'}) and input_fn=lambda "
                "batch: ... returning that module's input (a tensor, a tuple of positional "
                "arguments or a dict of keyword arguments)"
            ) from error

    def _total_steps(self, trainer: pl.Trainer, resumed: bool) -> int | None:
        if self.total_steps is not None:
            return self.total_steps
        estimated = trainer.estimated_stepping_batches
        if not isinstance(estimated, int) or estimated < 1:  # inf, or -1 without max_steps
            if self.interval_steps is not None:
                return None
            raise ValueError(
                "FreezePolicyCallback needs the run's length and the Trainer has none "
                f"(estimated_stepping_batches={estimated}: max_epochs=-1 or an iterable dataset, "
                "without max_steps): pass total_steps=... or interval_steps=..."
            )
        if trainer.global_step and not resumed:
            # continuing a run that had no freeze-agent state: plan what remains of it
            self._warn_once(
                "fresh-resume",
                f"FreezePolicyCallback starts at global step {trainer.global_step} with no "
                "freeze-agent state in the checkpoint: it plans its decisions over the "
                f"{estimated - trainer.global_step} remaining steps",
            )
            return max(estimated - trainer.global_step, 1)
        return estimated

    def _apply_restored(self, state: dict[str, Any], trainer: pl.Trainer) -> None:
        controller = self.controller
        controller.load_state_dict(state["controller"])
        self._loss_sum, self._loss_count = state["accumulated_loss"]
        if state["total_steps"] != self._planned_steps:
            self._warn_once(
                "total-steps",
                f"FreezePolicyCallback resumes a run planned over {state['total_steps']} "
                f"optimizer steps, this one plans {self._planned_steps}: the decisions from now "
                "on follow the new plan. Pass total_steps=... to both runs to keep one schedule",
            )
        if controller.steps != trainer.global_step:
            self._warn_once(
                "steps",
                f"FreezePolicyCallback state from the checkpoint has {controller.steps} optimizer "
                f"steps, the trainer resumes at global step {trainer.global_step}",
            )

    # ------------------------------------------------------------------ running

    def _live(self) -> bool:
        return self._controller is not None and not self._closed

    def _install_cache(self, trainer: pl.Trainer) -> None:
        """Put the controller's cached loader in place of Lightning's training loader, unless
        it is there already."""
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        if combined is None:
            return
        loaders = combined.flattened
        if self._cached_loader is not None and loaders == [self._cached_loader]:
            return
        if len(loaders) != 1 or hasattr(loaders[0], "state_dict"):
            self._warn_once(
                "cache",
                "FreezePolicyCallback(cache=...) serves one map-style torch DataLoader without "
                f"resumable state; this run trains on {len(loaders)} loader(s) of type "
                f"{', '.join(type(x).__name__ for x in loaders)}: the cache stays off",
            )
            return
        wrapped = self.controller.wrap_loader(loaders[0], **(self.cache_options or {}))
        if wrapped.router is None:
            self._warn_once("cache", f"FreezePolicyCallback: cache off, {wrapped.reason_off}")
            return
        combined.flattened = [wrapped]
        self._cached_loader = wrapped

    def _finish(self) -> None:
        """Keep the final summary and state, then close the controller (once)."""
        if not self._live():
            return
        controller = self.controller
        try:
            self._final_summary = controller.summary()
            self._final_state = self.state_dict()
        finally:
            self._closed = True
            controller.close()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _ddp_wrapper(trainer: pl.Trainer, module: nn.Module) -> DistributedDataParallel | None:
    """Lightning's DDP wrapper of the model (``trainer.strategy.model``) when the run is
    distributed, checked for what freezing needs (``check_ddp_wrapper``: above all
    ``find_unused_parameters=True``); None for a single process without a wrapper. One process
    under a DDP strategy is wrapped too, and its reducer needs the same as several."""
    wrapper = trainer.strategy.model
    if not isinstance(wrapper, DistributedDataParallel):
        if trainer.world_size <= 1:
            return None
        raise RuntimeError(
            f"FreezePolicyCallback runs distributed under a DDP strategy only; this Trainer "
            f"runs {trainer.world_size} processes under {type(trainer.strategy).__name__}, "
            f"which wraps the model in {type(wrapper).__name__}, not DistributedDataParallel: "
            'use Trainer(strategy="ddp_find_unused_parameters_true") or '
            "DDPStrategy(find_unused_parameters=True)"
        )
    check_ddp_wrapper(wrapper, module)
    return wrapper


def _logs_due(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this batch's step metrics to the loggers
    (``Trainer(log_every_n_steps=...)``); step values logged at other batches are dropped, and
    ``self.log`` costs a fraction of a millisecond per metric."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def _loss_of(outputs: Any) -> float | None:
    """The loss in ``on_train_batch_end``'s ``outputs`` (None when the batch had none)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().float())
    if isinstance(loss, (int, float)):
        return float(loss)
    return None


def _param_children(module: nn.Module) -> str:
    """The names of ``module``'s children that hold parameters, for error messages."""
    names = [n for n, child in module.named_children() if any(True for _ in child.parameters())]
    return ", ".join(names)


def _describe(value: Any) -> str:
    """A short picture of an input: ``Tensor[32, 1, 16]``, ``dict(x=Tensor[32, 8])``."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)}"
    if isinstance(value, Mapping):
        return "dict(" + ", ".join(f"{k}={_describe(v)}" for k, v in value.items()) + ")"
    if isinstance(value, (tuple, list)):
        return type(value).__name__ + "(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__
