"""Deploy a freeze policy in a Hugging Face ``Trainer.train()``: ``FreezePolicyCallback``.

    callback = FreezePolicyCallback("default")
    trainer = Trainer(model, args, train_dataset=..., eval_dataset=..., callbacks=[callback])
    trainer.train()
    callback.summary()   # what the policy did: timeline, modeled speedup, safety net, ...

The callback drives the same ``FreezeController`` that ``FreezeController.from_pretrained`` gives
a plain loop, from these events of ``Trainer._inner_training_loop``:

* ``on_train_begin`` fires once the Trainer has built its optimizer and LR scheduler, prepared
  them with ``accelerate`` and loaded the checkpoint it resumes from. The controller is built
  here from the model, the Trainer's own torch optimizer (unwrapped from accelerate's
  ``AcceleratedOptimizer``) and one batch of its training loader, for ``state.max_steps``
  optimizer steps; a resumed run then loads the controller's state from the checkpoint. The
  callback also moves itself to the front of the Trainer's callback list (see ``on_log``).
* ``on_step_begin`` / ``on_optimizer_step``: the latter fires once per optimizer step, with or
  without gradient accumulation, right after ``optimizer.step()`` and before the Trainer steps
  its LR scheduler and zeroes the gradients. ``controller.step(loss)`` runs there, where a plain
  loop calls it: its gradient signals read the step's gradients, which are gone by
  ``on_step_end``.
* ``on_evaluate``: the evaluation metric feeds the safety net (``report_validation``).
* ``on_log``: ``Trainer.log`` appends the logs to ``state.log_history`` and then hands one dict
  to every callback in list order, the reporting callbacks (W&B, TensorBoard...) before the
  user's. Running first, the callback adds the freeze metrics (``controller_metrics``) to the
  training logs before any reporter reads them, and to the history entry just written.
* ``on_save``: the controller's state goes into the checkpoint folder (``CHECKPOINT_FILE``).
* ``on_epoch_begin``: with ``cache=True``, keeps the activation cache in step with the epoch.
* ``on_train_end``: the final ``summary()`` is kept, then ``controller.close()`` returns every
  unit to TRAIN and stops the reference worker.

A callback's events carry the model, the optimizer, the scheduler and the loaders, not the
Trainer; the callback finds the Trainer (its callback list, its DDP wrapper and the checkpoint it
resumes from) in the calling ``_inner_training_loop`` frame.

**DDP** (``torchrun`` or ``accelerate launch``; on CPU ``TrainingArguments(use_cpu=True,
ddp_backend="gloo")``): the Trainer wraps the model in ``DistributedDataParallel`` in
``_prepare_for_training``, before ``on_train_begin``, as ``trainer.model_wrapped``; the events'
``model`` is the unwrapped one. Every rank then builds a ``DistributedFreezeController``
(``freeze_agent.integrations.ddp``) on the unwrapped model and registers, with ``attach_ddp``,
the communication hook that leaves frozen gradients out of the wrapper's all-reduce. Rank 0
decides and every rank applies its modes: ``on_optimizer_step`` runs on every rank at the same
optimizer steps (the decision is a collective there), and so does ``on_evaluate`` (the Trainer
evaluates on every rank, and ``report_validation`` is a collective too: rank 0's metric is the
one judged). Rank 0 alone measures the signals and runs the reference worker. The Trainer wraps
with ``find_unused_parameters`` from ``ddp_find_unused_parameters``, True by default unless
gradient checkpointing is on; False fails in ``on_train_begin`` with what to pass, before
anything is partitioned. Accelerate's ``comm_hook`` is refused (DDP takes one hook). ``on_save``
writes on the main process only (``args.should_save``), and a resumed run reads the file on every
rank (ranks other than 0 skip its signals' part). The freeze metrics are the same on every rank;
``summary()["ddp"]`` counts the all-reduce bytes saved.

Needs the ``hf`` extra: ``pip install 'freeze-agent[hf]'``.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from freeze_agent.controller import FreezeController
from freeze_agent.controller.cached_loader import ForwardRouter, RecordingBatchSampler
from freeze_agent.controller.safety_net import SafetyNet
from freeze_agent.core.units import preserved_state, tensors_in
from freeze_agent.integrations.common import build_controller, controller_metrics, example_batch
from freeze_agent.integrations.ddp import (
    check_ddp_wrapper,
)
from freeze_agent.policies.base import Policy

try:
    from accelerate.utils import send_to_device
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState
    from transformers.trainer_callback import CallbackHandler
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from transformers.training_args import TrainingArguments
    from transformers.utils import find_labels
except ImportError as error:
    raise ImportError(
        "freeze_agent.integrations.hf needs transformers and accelerate: "
        "pip install 'freeze-agent[hf]'"
    ) from error

__all__ = ["CHECKPOINT_FILE", "FreezePolicyCallback"]

CHECKPOINT_FILE = "freeze_agent_controller.pt"
"""The controller's state in each Trainer checkpoint folder (``torch.save`` of plain data and
tensors; ``trainer_state.json`` cannot hold tensors)."""

_CHECKPOINT_FORMAT = 1
_STACK_DEPTH = 16  # frames searched for the Trainer above a callback event


class FreezePolicyCallback(TrainerCallback):
    """A ``TrainerCallback`` that lets a freeze policy decide, layer by layer, while
    ``Trainer.train()`` runs, exactly as ``FreezeController.from_pretrained`` in a plain loop.

    Args:
        policy: a shipped policy's name (``"default"``), a trained policy's folder, a registered
            policy's spec (``"autofreeze"``, ``"linear-prefix:0.2"``) or a ``Policy``.
        decisions: decisions over the run (``state.max_steps`` optimizer steps).
        interval_steps: optimizer steps between decisions, instead of ``decisions``.
        safety_net: True for the default ``SafetyNet``, a ``SafetyNet`` to tune it, False to
            turn it off.
        metric: the evaluation metric that feeds the safety net, as the Trainer names it in
            ``on_evaluate`` (``"eval_loss"``, ``"eval_accuracy"``; the ``eval_`` prefix may be
            left out). Default: ``args.metric_for_best_model``, else ``"eval_loss"``.
        greater_is_better: whether a higher ``metric`` is better. Default: the Trainer's
            ``args.greater_is_better`` when ``metric`` is ``args.metric_for_best_model``, else
            True unless the name ends in ``loss``.
        metric_tolerance: how far the metric may fall behind its best before the safety net
            unfreezes, in the metric's own units (default: the safety net's, 0.005, made for an
            accuracy given as a fraction; pass a loss-scale value for a loss).
        cache: serve the frozen prefix from the activation cache (``FreezeController.
            wrap_loader``) through the Trainer's own training loader. Off by default: it needs a
            map-style dataset whose samples reach the model as the collator makes them, with
            fixed shapes (pad to a fixed length, not per batch), and a model whose frozen prefix
            ends at a cut point; the summary's ``cache`` entry says why it is off when it cannot
            serve. The first epoch of a resumed run is not served.
        **controller_kwargs: the controller's other arguments (``max_units``, ``reference``,
            ``signals``, ``local_lr``, ...), as for ``FreezeController.from_pretrained``.

    The model is partitioned with one batch of the Trainer's training loader, collated by the
    Trainer's collator, moved to the model's device and without its labels (the Trainer's
    ``label_names``): the keyword arguments of the Trainer's forward, less the targets. Traced
    with labels, the loss would read them after every unit, so the partition would find no cut
    point (a policy feature, and where the activation cache can serve). The batch is built from
    the dataset's first samples without iterating the loader, which would change the run's data
    order; it is also the probe batch of the plasticity signal.

    The controller's loss is the model's own: a forward hook records ``outputs.loss`` of each
    training forward, and the micro-batches of an optimizer step combine as in the Trainer's
    logged ``loss`` (their mean, or their sum when the Trainer passed ``num_items_in_batch`` to
    the model, which then normalizes over the whole step). When the Trainer computes the loss
    outside the model (``compute_loss_func``, label smoothing), call ``record_loss`` from the
    loss function.

    Checkpoints: ``on_save`` writes ``CHECKPOINT_FILE`` into the checkpoint folder; resuming
    (``trainer.train(resume_from_checkpoint=...)``) reads it back, so the policy continues with
    the same decisions.

    ``controller`` is the ``FreezeController`` from ``on_train_begin`` on (a RuntimeError
    before). After training it is closed, every unit back in TRAIN; ``summary()`` then returns
    the summary taken just before the close (``controller.summary()`` still answers, but without
    the cache's and the reference worker's figures, which the close released). Under DDP it is
    a ``DistributedFreezeController`` on every rank, and the summary has its ``"ddp"`` entry
    (the all-reduce bytes saved); rank 0's alone has the signals (see the module docstring).
    """

    def __init__(
        self,
        policy: str | Path | Policy = "default",
        *,
        decisions: int = 30,
        interval_steps: int | None = None,
        safety_net: bool | SafetyNet = True,
        metric: str | None = None,
        greater_is_better: bool | None = None,
        metric_tolerance: float | None = None,
        cache: bool = False,
        **controller_kwargs: Any,
    ) -> None:
        self.policy = policy
        self.decisions = decisions
        self.interval_steps = interval_steps
        self.safety_net = safety_net
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.metric_tolerance = metric_tolerance
        self.cache = cache
        self.controller_kwargs = controller_kwargs
        self._controller: FreezeController | None = None
        self._active = False
        self._final_summary: dict[str, Any] | None = None
        self._watch: _ForwardWatch | None = None
        self._feed: _CacheFeed | None = None
        self._metric_name = "eval_loss"
        self._higher_is_better = False
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ public

    @property
    def controller(self) -> FreezeController:
        """The ``FreezeController`` deployed in the run (built in ``on_train_begin``)."""
        if self._controller is None:
            raise RuntimeError(
                "FreezePolicyCallback.controller does not exist yet: it is built when training "
                "starts (on_train_begin), from the optimizer the Trainer creates; call "
                "trainer.train() first"
            )
        return self._controller

    def summary(self) -> dict[str, Any]:
        """``controller.summary()``: live while training runs, the one taken just before the
        controller was closed afterwards."""
        if self._final_summary is not None and not self._active:
            return self._final_summary
        return self.controller.summary()

    def record_loss(self, loss: float | torch.Tensor) -> None:
        """Give the controller the training loss of one micro-batch, when the model's output
        carries none (the Trainer's ``compute_loss_func``, label smoothing, an overridden
        ``compute_loss``): call it from the loss function. An optimizer step's loss is then the
        mean of the values recorded during it, instead of the model's own loss."""
        if self._watch is not None:
            self._watch.reported.append(
                loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
            )

    # ------------------------------------------------------------------ events

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Build the controller (or restore it, when resuming) and take the lead for logging."""
        self._shut_down()  # a second train() call, or auto_find_batch_size's retry
        self._final_summary, self._warned = None, set()
        model: nn.Module = kwargs["model"]
        optimizer = _torch_optimizer(kwargs["optimizer"])
        loader = kwargs["train_dataloader"]
        trainer, resumed_from = _calling_trainer()
        wrapper = _ddp_wrapper(trainer, model, args)  # before partitioning: fail fast
        self._lead_callbacks(trainer)
        self._metric_name, self._higher_is_better = self._resolve_metric(args)
        example = _example_input(loader, model, _label_names(trainer, args, model))
        controller = self._build_controller(model, optimizer, example, args, state, wrapper)
        self._controller, self._active = controller, True
        try:
            if state.global_step > 0:  # the state was read from the checkpoint being resumed
                self._restore(controller, args, state, resumed_from)
            self._watch = _ForwardWatch(model)
            if self.cache:
                self._feed = _CacheFeed(controller, loader, self._watch, state.global_step > 0)
        except BaseException:
            self._shut_down()
            raise

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """A new pass over the training loader starts: the cache feed starts a new queue."""
        if self._feed is not None:
            self._feed.begin_epoch()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """An optimizer step's first micro-batch is about to run."""
        if self._watch is not None:
            self._watch.begin_step()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """``controller.step(loss)`` once per optimizer step, gradients still in place."""
        if not self._active or self._watch is None:
            return
        loss = self._watch.take_step_loss()
        if loss is None:
            raise RuntimeError(
                "FreezePolicyCallback found no training loss for this optimizer step: the model's "
                "output carries no `loss` (the Trainer computes it outside the model with "
                "compute_loss_func, label_smoothing_factor or an overridden compute_loss). Call "
                "callback.record_loss(loss) from that loss function."
            )
        self.controller.step(loss)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Report the evaluation metric to the safety net (only while training runs)."""
        if not self._active or metrics is None:
            return
        name = self._metric_name
        key = name if name in metrics else f"eval_{name}"
        if key not in metrics:
            self._warn_once(
                f"metric:{name}",
                f"FreezePolicyCallback: the evaluation metrics hold no {name!r}, so the safety "
                f"net does not see this evaluation; the metrics are {', '.join(sorted(metrics))} "
                "(pass metric=... to choose one)",
            )
            return
        value = metrics[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.controller.report_validation(
                float(value), self._higher_is_better, tolerance=self.metric_tolerance
            )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the freeze metrics to the Trainer's training logs before the reporters see them
        (this callback runs first), and to the ``state.log_history`` entry just written."""
        if not self._active or logs is None or not ({"loss", "train_loss"} & logs.keys()):
            return
        metrics = controller_metrics(self.controller)
        entry = state.log_history[-1] if state.log_history else {}
        if entry.get("step") == state.global_step and logs.keys() <= entry.keys():
            entry.update(metrics)  # Trainer.log appended {**logs, "step": ...} just before
        logs.update(metrics)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Write the controller's state into the checkpoint folder the Trainer just saved."""
        if not self._active or not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            self._warn_once(
                "save",
                f"FreezePolicyCallback: no checkpoint folder {folder}, so the controller's state "
                "is not saved with it (a resumed run could not continue its decisions)",
            )
            return
        payload = {
            "format": _CHECKPOINT_FORMAT,
            "global_step": state.global_step,
            "controller": self.controller.state_dict(),
        }
        partial = folder / f"{CHECKPOINT_FILE}.partial"
        torch.save(payload, partial)
        os.replace(partial, folder / CHECKPOINT_FILE)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Keep the final summary and close the controller."""
        if self._active:
            self._final_summary = self.controller.summary()
        self._shut_down()

    # ------------------------------------------------------------------ building

    def _build_controller(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        example_input: Any,
        args: TrainingArguments,
        state: TrainerState,
        wrapper: DistributedDataParallel | None = None,
    ) -> FreezeController:
        """The controller for this run: the one place that chooses it. With ``wrapper`` (the
        Trainer's DDP wrapper of ``model``, from ``_ddp_wrapper``) a
        ``DistributedFreezeController`` on the unwrapped model, built on every rank at this
        same event, with the communication hook registered on ``wrapper`` (``attach_ddp``)."""
        arguments: dict[str, Any] = {
            "total_steps": state.max_steps,
            "decisions": self.decisions,
            "interval_steps": self.interval_steps,
            "safety_net": self.safety_net,
            **self.controller_kwargs,
        }
        # under DDP a collective: every rank reaches on_train_begin together
        return build_controller(
            self.policy, model, optimizer, example_input, wrapper=wrapper, **arguments
        )

    def _resolve_metric(self, args: TrainingArguments) -> tuple[str, bool]:
        """The metric that feeds the safety net, and whether higher is better."""
        name = self.metric or args.metric_for_best_model or "eval_loss"
        if self.greater_is_better is not None:
            return name, self.greater_is_better
        if (
            self.metric is None
            and args.metric_for_best_model
            and args.greater_is_better is not None
        ):
            return name, bool(args.greater_is_better)
        return name, not name.endswith("loss")

    def _restore(
        self,
        controller: FreezeController,
        args: TrainingArguments,
        state: TrainerState,
        resumed_from: str | None,
    ) -> None:
        """Load the controller's state saved with the checkpoint being resumed."""
        candidates = [
            Path(folder)
            for folder in (resumed_from, args.resume_from_checkpoint)
            if isinstance(folder, (str, os.PathLike))
        ]
        candidates.append(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = next(
            (c / CHECKPOINT_FILE for c in candidates if (c / CHECKPOINT_FILE).is_file()), None
        )
        if path is None:
            searched = ", ".join(dict.fromkeys(str(c) for c in candidates))
            raise FileNotFoundError(
                f"FreezePolicyCallback: the Trainer resumes at step {state.global_step}, but no "
                f"{CHECKPOINT_FILE} is in the checkpoint ({searched}): it was saved without the "
                "callback, so the policy's decisions cannot continue; resume without the "
                "callback or from a checkpoint saved with it"
            )
        saved = torch.load(path, weights_only=True)
        if (
            saved.get("format") != _CHECKPOINT_FORMAT
            or saved.get("global_step") != state.global_step
        ):
            raise ValueError(
                f"{path} holds the controller at step {saved.get('global_step')}, the Trainer "
                f"resumes at step {state.global_step}: not this checkpoint's controller state"
            )
        controller.load_state_dict(saved["controller"])

    def _lead_callbacks(self, trainer: Trainer | None) -> None:
        """Move this callback to the front of the Trainer's callback list.

        ``Trainer.log`` hands one ``logs`` dict to every callback's ``on_log`` in list order, and
        the reporting callbacks (W&B, TensorBoard...) come before the user's; running first,
        this callback adds its metrics before any of them reads the dict. The move happens
        inside the handler's loop over the list: the callbacks after this one keep their
        positions, so none is skipped or called twice.
        """
        handler = trainer.callback_handler if trainer is not None else _calling_handler()
        if handler is None or self not in handler.callbacks:
            self._warn_once(
                "lead",
                "FreezePolicyCallback could not find the Trainer's callback list: its metrics "
                "reach only the callbacks after it in the list",
            )
            return
        handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)

    def _shut_down(self) -> None:
        """Remove the hooks and the cache feed, and close the controller if it is running."""
        if self._feed is not None:
            self._feed.remove()
            self._feed = None
        if self._watch is not None:
            self._watch.remove()
            self._watch = None
        if self._controller is not None and self._active:
            self._controller.close()
        self._active = False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------- the Trainer's objects


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``.

    The controller registers step hooks (per-unit learning-rate scales) and reads the parameter
    groups; the wrapper never runs ``torch.optim.Optimizer.__init__`` (it has no hook tables) and
    its ``step`` calls the inner optimizer's, where the hooks fire.
    """
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"the Trainer's optimizer is a {type(optimizer).__name__}, not a torch optimizer"
        )
    return optimizer


def _ddp_wrapper(
    trainer: Trainer | None, model: nn.Module, args: TrainingArguments
) -> DistributedDataParallel | None:
    """The Trainer's DDP wrapper of ``model`` (``trainer.model_wrapped``, set in
    ``_prepare_for_training`` before ``on_train_begin``) when the run is distributed, checked
    for what freezing needs (``check_ddp_wrapper``: above all ``find_unused_parameters=True``,
    ``TrainingArguments(ddp_find_unused_parameters=...)``); None for a single process that is
    not wrapped in DDP."""
    wrapped = getattr(trainer, "model_wrapped", None)
    if isinstance(wrapped, DistributedDataParallel):
        check_ddp_wrapper(wrapped, model)
        return wrapped
    if args.world_size <= 1:
        return None
    if trainer is None:
        raise RuntimeError(
            f"FreezePolicyCallback could not find the Trainer above on_train_begin, so not its "
            f"DDP wrapper of the model either, in a run of {args.world_size} processes: call it "
            "from Trainer.train()"
        )
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            f"FreezePolicyCallback: the Trainer runs {args.world_size} processes without an "
            "initialized torch.distributed process group; freeze-agent runs distributed under "
            "DDP only (torchrun, or accelerate launch, with the Trainer's DDP backend)"
        )
    raise RuntimeError(
        f"FreezePolicyCallback runs distributed under DistributedDataParallel only; this "
        f"Trainer runs {args.world_size} processes with the model wrapped in "
        f"{type(wrapped).__name__} (FSDP, DeepSpeed and other wrappers are not supported)"
    )


def _example_input(loader: Any, model: nn.Module, label_names: Sequence[str]) -> dict[str, Any]:
    """One training batch as the Trainer feeds the model, on the model's device, without its
    labels (see ``FreezePolicyCallback``)."""
    base = _base_loader(loader)
    batch = example_batch(base, _batch_size(base))
    if not isinstance(batch, Mapping):
        raise TypeError(
            "the Trainer's collator made a "
            f"{type(batch).__name__}, not a dict of the model's keyword arguments"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = dict(send_to_device({k: v for k, v in batch.items() if k not in label_names}, device))
    if len(inputs) < len(batch) and not _runs(model, inputs):
        # a sequence-to-sequence model (T5, BART, Whisper) builds its decoder inputs from the
        # labels: without them the example does not run, so it keeps them
        return dict(send_to_device(dict(batch), device))
    return inputs


def _runs(model: nn.Module, inputs: Mapping[str, Any]) -> bool:
    """Does ``model(**inputs)`` run? (Leaving no trace: buffers, flags and RNGs restored.)"""
    with preserved_state(model), torch.no_grad():
        try:
            model(**inputs)
        except Exception:
            return False
    return True


def _label_names(trainer: Trainer | None, args: TrainingArguments, model: nn.Module) -> list[str]:
    """The batch keys that hold labels, as the Trainer names them."""
    if trainer is not None and getattr(trainer, "label_names", None) is not None:
        return list(trainer.label_names)
    return list(args.label_names or find_labels(type(model)))


def _base_loader(loader: Any) -> Any:
    """The torch ``DataLoader`` inside accelerate's ``DataLoaderShard`` (the loader itself
    otherwise): the one whose batch sampler draws the batches."""
    return getattr(loader, "base_dataloader", loader)


def _batch_size(loader: Any) -> int | None:
    """Samples per batch: accelerate builds its loader from a batch sampler, which leaves the
    ``DataLoader``'s own ``batch_size`` None."""
    return getattr(loader, "batch_size", None) or getattr(
        getattr(loader, "batch_sampler", None), "batch_size", None
    )


def _calling_trainer() -> tuple[Trainer | None, str | None]:
    """The Trainer whose training loop raised the current event, and the checkpoint it resumes
    from (``train(resume_from_checkpoint=...)``, a folder; None when it does not resume).

    A callback gets neither from the Trainer: its events carry the model, optimizer, scheduler
    and loaders only. ``_inner_training_loop``, a few frames up, holds both.
    """
    found = _caller(Trainer)
    if found is None:
        return None, None
    trainer, local = found
    resumed = local.get("resume_from_checkpoint")
    return trainer, resumed if isinstance(resumed, (str, os.PathLike)) else None


def _calling_handler() -> CallbackHandler | None:
    """The ``CallbackHandler`` calling the current event, when no Trainer is found above it."""
    found = _caller(CallbackHandler)
    return found[0] if found is not None else None


_Owner = TypeVar("_Owner")


def _caller(kind: type[_Owner]) -> tuple[_Owner, dict[str, Any]] | None:
    """The nearest method call up the stack whose ``self`` is a ``kind``, with its locals."""
    frame = sys._getframe(1)
    try:
        for _ in range(_STACK_DEPTH):
            frame = frame.f_back
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, kind):
                return owner, dict(frame.f_locals)
    finally:
        del frame
    return None


# --------------------------------------------------------------------------- the loss


class _ForwardWatch:
    """Hooks on the model's outermost forward: the losses of the optimizer step in progress,
    and, with the cache, the call that announces each training batch.

    Only the outermost call counts: the activation cache calls the model again inside its own
    forward (the plain forward, a prefix-only pass, a verification), and those calls are no
    micro-batches. A prefix-only pass ends with a ``BaseException`` that skips the forward hooks
    of the calls it leaves, so the open calls are a stack of their keyword dicts (one per call):
    a returning call drops the entries above its own, and the stack is empty when the
    outermost call returns.
    """

    def __init__(self, model: nn.Module) -> None:
        self.losses: list[torch.Tensor] = []
        self.reported: list[torch.Tensor] = []
        self.normalized_over_step = False
        self.on_batch: list[Callable[[tuple, dict], None]] = []  # run before a training forward
        self._open: list[dict] = []
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        ]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        outermost = not self._open
        self._open.append(kwargs)
        if outermost and module.training and torch.is_grad_enabled():
            for announce in self.on_batch:
                announce(args, kwargs)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        while self._open and self._open.pop() is not kwargs:
            pass  # a call inside this one that a BaseException ended
        if self._open or not (module.training and torch.is_grad_enabled()):
            return
        loss = _loss_of(output)
        if loss is None:
            return
        self.losses.append(loss.detach().float())
        # the Trainer then skips its division by the accumulation steps (Trainer.training_step)
        self.normalized_over_step |= kwargs.get("num_items_in_batch") is not None

    def begin_step(self) -> None:
        """No forward runs between optimizer steps: forget calls an exception left open."""
        self._open.clear()

    def take_step_loss(self) -> torch.Tensor | None:
        """The step's loss as the Trainer accounts it, and a fresh start for the next step."""
        reported, losses = self.reported, self.losses
        normalized = self.normalized_over_step
        self.reported, self.losses, self.normalized_over_step = [], [], False
        if reported:
            return torch.stack([r.float().reshape(()) for r in reported]).mean()
        if not losses:
            return None
        total = torch.stack([loss.to(losses[0].device).reshape(()) for loss in losses]).sum()
        return total if normalized else total / len(losses)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss in a model's output: ``output.loss`` / ``output["loss"]``, or the first element
    of a tuple output when it is a scalar (the Trainer's convention for tuple outputs)."""
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss
    return None


# --------------------------------------------------------------------------- the cache


def _with_batch_size(loader: Any) -> Any:
    """``loader``, or a shallow copy of it whose ``batch_size`` is its batch sampler's:
    ``wrap_loader`` reads a DataLoader without ``batch_size`` as one without automatic batching,
    which a DataLoader built from a batch sampler (accelerate's) is not."""
    size = _batch_size(loader)
    if not isinstance(loader, DataLoader) or loader.batch_size is not None or size is None:
        return loader
    view = copy.copy(loader)
    object.__setattr__(view, "batch_size", size)  # DataLoader forbids it once built
    return view


class _CacheFeed:
    """The activation cache fed through the Trainer's own training loader.

    The Trainer iterates its loader itself (accelerate's ``DataLoaderShard`` reads one batch
    ahead, and gradient accumulation fetches a step's micro-batches before running them), so
    the batch sampler of the loader's ``DataLoader`` records every batch it draws in a queue,
    and each training forward takes the oldest: the rows of the batch it runs. A second forward
    of the same inputs takes nothing. The first epoch of a resumed run is not served: the
    Trainer skips its first batches there, drawn but never run.
    """

    def __init__(
        self, controller: FreezeController, loader: Any, watch: _ForwardWatch, resumed: bool
    ) -> None:
        self.drawn: deque[list[int]] = deque()
        self.router: ForwardRouter | None = None
        self._base: DataLoader | None = None
        self._sampler: Any = None
        self._last_input: torch.Tensor | None = None
        self._serving = False
        self._epochs_to_skip = 1 if resumed else 0
        self._watch = watch
        base = _base_loader(loader)
        wrapped = controller.wrap_loader(_with_batch_size(base))
        if wrapped.router is None:
            return  # the summary's cache entry says why
        self.router, self._base, self._sampler = wrapped.router, base, base.batch_sampler
        # DataLoader forbids setting batch_sampler once built
        object.__setattr__(base, "batch_sampler", RecordingBatchSampler(self._sampler, self.drawn))
        watch.on_batch.append(self._announce)

    def begin_epoch(self) -> None:
        self.drawn.clear()
        self._last_input = None
        self._serving = self.router is not None and not self._epochs_to_skip
        self._epochs_to_skip = max(self._epochs_to_skip - 1, 0)

    def _announce(self, args: tuple, kwargs: dict) -> None:
        if self.router is None:
            return
        first = next(tensors_in((args, kwargs)), None)
        if not self._serving or first is None or first is self._last_input:
            self.router.expect(None)
            return
        self._last_input = first  # held, so that no later batch can reuse its memory
        self.router.expect(self.drawn.popleft() if self.drawn else None)

    def remove(self) -> None:
        if self._base is not None:
            object.__setattr__(self._base, "batch_sampler", self._sampler)
            self._base = None
        if self._announce in self._watch.on_batch:
            self._watch.on_batch.remove(self._announce)
        self.router, self._last_input = None, None
