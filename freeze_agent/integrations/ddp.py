"""freeze-agent under ``torch.distributed`` with ``DistributedDataParallel`` (DDP).

Every rank applies the same modes, and frozen parameters leave the gradient all-reduce.

**Rank 0 decides, every rank applies.** ``DistributedFreezeController`` makes the two calls
that may change modes collectives, which every rank makes at the same point:

* ``decide()``: ``step(loss)`` calls it at the planned steps, and the schedule counts optimizer
  steps, so the ranks reach it together. Rank 0 observes (it alone measures the signals and runs
  the int8 reference worker: the other ranks are built with ``signals=False, reference=False``),
  runs the safety net's loss check on *its* interval losses, lets the policy decide and applies
  the modes; then it broadcasts the outcome (modes, their start steps, the safety net's holds,
  the per-unit learning-rate scales, the timeline and the validation record) with
  ``dist.broadcast_object_list`` and the other ranks adopt it. Their own losses and their copy
  of the policy are never consulted.
* ``report_validation(metric)``: every rank calls it, as DDP validation loops run on every
  rank; rank 0's metric is the one the safety net judges, and its outcome (an unfreeze, a hold)
  is broadcast the same way. A loop that validates on rank 0 alone must still call it on every
  rank (with any value), or rank 0 waits in the broadcast.

An error on rank 0 while deciding is broadcast too, so every rank raises instead of the others
waiting. Under NCCL each rank must have set its device (``torch.cuda.set_device``), as for any
object collective. ``set_modes`` and ``load_state_dict`` stay per-rank: call them on every rank
with the same arguments (every rank loads the same checkpoint).

**Gradients: a DDP communication hook.** A frozen (or LOCAL) unit's parameters have
``requires_grad=False``. With ``find_unused_parameters=True`` DDP's reducer finds, after every
forward, the parameters that take no part in the graph and marks them ready itself, so no rank
waits for them, and a parameter that no rank used keeps ``grad=None``; one that trains again is
reduced again (the reducer keeps the gradient accumulator it hooked at construction, which
``requires_grad_(True)`` brings back; both directions are tested). But torch's reducer (2.13)
still all-reduces the frozen parameters' slices of each bucket, as zeros. ``allreduce_trainable``,
the hook registered here, all-reduces only the slices of parameters that require gradients (in
place when they are contiguous, packed into one tensor otherwise) and leaves the frozen slices
out; every rank holds the same modes, so every rank packs the same layout. The other ways were
rejected: re-wrapping DDP at each mode change cannot work where a framework holds the wrapper
(Lightning's ``DDPStrategy`` keeps ``trainer.strategy.model``, the Hugging Face Trainer keeps it
in a local variable of its training loop); ``static_graph=True`` records the unused parameters
of the first iteration and assumes they never change, which every mode change breaks (it is
refused, as is ``skip_all_reduce_unused_params=True``, which assumes the same).
``distributed_stats()`` (also ``summary()["ddp"]``) counts the bytes each rank all-reduced
against the bytes plain DDP would (its bucket buffers), per step and in total. These are payload
bytes (a ring all-reduce over n ranks sends 2(n-1)/n times as much per rank);
``find_unused_parameters`` adds DDP's own all-reduce of one int per parameter tensor, uncounted.

The hook can be registered at any point between two optimizer steps, also after the first
forward/backward (torch's docs ask for before; its reducer does not require it, and the hook
reads each bucket's layout at every call, so a bucket rebuild would not matter either), but at
the same step on every rank, and not inside a ``no_sync`` accumulation: registering resets the
reducer's per-iteration record of used parameters, which the controller's partitioning (a
backward outside DDP's forward) has filled. DDP takes one communication hook: a wrapper that
already has one (``ddp_comm_hook=``, accelerate's ``comm_hook``) is refused with the reason.

**LOCAL units: averaged after every optimizer step.** A LOCAL unit's weights are updated by the
local rule inside the forward pass, from each rank's own batch, and get no gradient, so DDP never
syncs them. After every optimizer step (an ``optimizer`` step post-hook: all ranks step
together) each LOCAL unit's parameters are all-reduced and averaged. The local rule's update of
a layer is ``ΔW = Yᵀ X / rows``, so the mean of the ranks' updates (equal batches) is the
update of the global batch; averaging the ranks' results (each rescaled by the rule to the rows'
previous norms) is that to first order in the local learning rate. The mean of the rescaled
rows is a little shorter than they were (second order: the square of the ranks' spread), and
the rule's next rescale keeps that norm. The sum is the collective's and the division
elementwise, so all ranks hold the same bits. Making LOCAL units FROZEN under DDP was the other
way; averaging keeps what LOCAL is for. The LOCAL parameters' bytes are sent here instead of in
the gradient all-reduce, so the bytes saved are exactly the FROZEN parameters' gradient bytes.

**Activation cache: kept on.** ``wrap_loader`` over a loader with a ``DistributedSampler`` works
per rank: each rank's cache stores the boundary activations of the rows its sampler gives it
(indexed by dataset row, as without DDP) and serves them when they come back; all ranks freeze
the same prefix, so a stored activation is the one a normal forward would compute on any rank.
The hit rate is lower than single-process while the sampler reshuffles which rows a rank sees;
the results are not affected: parameters only change through all-reduced gradients and
averaged LOCAL units.

Use it in a plain loop (under ``torchrun``; see ``scripts/examples/ddp.py``)::

    ddp_model = DistributedDataParallel(model, find_unused_parameters=True)
    controller = DistributedFreezeController.from_pretrained(
        "default", ddp_model, optimizer, example, total_steps=epochs * len(loader)
    )

or, for a controller already built (a framework callback) and its framework's wrapper::

    controller = attach_ddp(controller, ddp_model)  # on every rank, between two iterations
"""

import functools
import time
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from freeze_agent.controller import FreezeController
from freeze_agent.core.modes import Mode
from freeze_agent.core.units import ModelInput
from freeze_agent.policies.base import Policy

__all__ = [
    "DistributedFreezeController",
    "FreezeCommState",
    "allreduce_trainable",
    "attach_ddp",
    "check_ddp_wrapper",
    "trainable_spans",
]

# DDP's own error is quoted only in part: Lightning's DDPStrategy.on_exception replaces any
# message holding "Expected to have finished reduction in the prior iteration" with its advice
# about parameters training_step does not use, which would hide this one
FIND_UNUSED_PARAMETERS = (
    "freeze-agent under DistributedDataParallel needs find_unused_parameters=True: frozen units' "
    "parameters get no gradient, and without it DDP waits for them ('Expected to have finished "
    "reduction ...'). Plain PyTorch: DistributedDataParallel(model, "
    "find_unused_parameters=True); Lightning: Trainer(strategy=DDPStrategy("
    'find_unused_parameters=True)) or Trainer(strategy="ddp_find_unused_parameters_true"); '
    "Hugging Face Trainer: TrainingArguments(ddp_find_unused_parameters=True)"
)


# --------------------------------------------------------------------------- the gradient hook


class FreezeCommState:
    """The communication hook's state: the process group, and the payload bytes all-reduced
    (``sent``) against those plain DDP would all-reduce (``full``), in total and for the last
    synchronized backward."""

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.syncs = 0
        self.bytes_full = 0
        self.gradient_bytes_sent = 0
        self.local_sync_bytes = 0
        self.last_full = self.last_sent = self.last_local = 0
        self._step_full = self._step_sent = 0

    def count_bucket(self, full: int, sent: int, last: bool) -> None:
        self._step_full += full
        self._step_sent += sent
        if last:
            self.syncs += 1
            self.bytes_full += self._step_full
            self.gradient_bytes_sent += self._step_sent
            self.last_full, self.last_sent = self._step_full, self._step_sent
            self._step_full = self._step_sent = 0

    def count_local_sync(self, sent: int) -> None:
        self.local_sync_bytes += sent
        self.last_local = sent


def trainable_spans(bucket: dist.GradBucket) -> list[tuple[int, int]] | None:
    """The ``[start, stop)`` element ranges of ``bucket``'s flat buffer that belong to
    parameters requiring gradients, adjacent ones merged; None when the parameters do not tile
    the buffer as the reducer lays them out (one after the other, in ``parameters()`` order)."""
    spans: list[tuple[int, int]] = []
    offset = 0
    for parameter, gradient in zip(bucket.parameters(), bucket.gradients(), strict=True):
        stop = offset + gradient.numel()
        if parameter.requires_grad:
            if spans and spans[-1][1] == offset:
                spans[-1] = (spans[-1][0], stop)
            else:
                spans.append((offset, stop))
        offset = stop
    return spans if offset == bucket.buffer().numel() else None


def allreduce_trainable(
    state: FreezeCommState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average the gradients of the bucket's trainable parameters over
    the ranks, and send nothing for frozen ones (their slices stay zero and their ``grad``
    None: the reducer leaves a parameter no rank used untouched). Register it with
    ``ddp_model.register_comm_hook(FreezeCommState(group), allreduce_trainable)``;
    ``attach_ddp`` does."""
    buffer = bucket.buffer()
    spans = trainable_spans(bucket)
    if spans is None:  # an unknown layout: reduce everything, as plain DDP does
        spans = [(0, buffer.numel())]
    size = buffer.element_size()
    sent = sum(stop - start for start, stop in spans)
    state.count_bucket(buffer.numel() * size, sent * size, bucket.is_last())
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if not spans:
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done
    if len(spans) == 1:  # the whole buffer (also a sparse one), or a view reduced in place
        start, stop = spans[0]
        part = buffer if (start, stop) == (0, buffer.numel()) else buffer[start:stop]
        work = dist.all_reduce(part.div_(world), group=group, async_op=True)
        return work.get_future().then(lambda _: buffer)
    packed = torch.cat([buffer[start:stop] for start, stop in spans]).div_(world)

    def unpack(future: torch.futures.Future) -> torch.Tensor:
        reduced = future.value()[0]
        offset = 0
        for start, stop in spans:
            buffer[start:stop].copy_(reduced[offset : offset + stop - start])
            offset += stop - start
        return buffer

    work = dist.all_reduce(packed, group=group, async_op=True)
    return work.get_future().then(unpack)


def check_ddp_wrapper(ddp_model: nn.Module, model: nn.Module | None = None) -> None:
    """Raise, saying what to change, unless ``ddp_model`` is a DDP wrapper freeze-agent can
    change modes under: ``find_unused_parameters=True``, no static graph, and every parameter
    reduced (DDP leaves out the parameters that did not require gradients when it was built,
    and a rank would train those alone once a unit returns to TRAIN). With ``model``, also that
    the wrapper holds its parameters."""
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"expected a torch.nn.parallel.DistributedDataParallel wrapper, got "
            f"{type(ddp_model).__name__}"
        )
    if not ddp_model.find_unused_parameters:
        raise ValueError(FIND_UNUSED_PARAMETERS)
    if getattr(ddp_model, "static_graph", False):
        raise ValueError(
            "the DDP wrapper was built with static_graph=True, which assumes the set of "
            "parameters without gradient never changes; freeze-agent changes it at every "
            "freeze: build it with static_graph=False and find_unused_parameters=True"
        )
    if getattr(ddp_model, "skip_all_reduce_unused_params", False):
        raise ValueError(
            "the DDP wrapper was built with skip_all_reduce_unused_params=True, which assumes "
            "the unused parameters never change; freeze-agent changes them: leave it False"
        )
    ignored = getattr(ddp_model, "parameters_to_ignore", set())
    params = [p for name, p in ddp_model.module.named_parameters() if name not in ignored]
    reduced = _logging_data(ddp_model).get("num_parameter_tensors")
    if reduced is not None and reduced < len(params):
        raise ValueError(
            f"the DDP wrapper reduces {reduced} of the model's {len(params)} parameter tensors: "
            "DDP leaves out parameters that did not require gradients when it was built, and "
            "once freeze-agent trains them again each rank would update them alone. Wrap the "
            "model with every parameter trainable, before the controller freezes anything"
        )
    if model is not None:
        held = {id(p) for p in params}
        if any(id(p) not in held for p in model.parameters()):
            raise ValueError(
                "the DDP wrapper does not hold the controller's model: pass the wrapper of the "
                "model the controller was built on"
            )


# --------------------------------------------------------------------------- the controller


class DistributedFreezeController(FreezeController):
    """A ``FreezeController`` for DDP training: rank 0 decides and every rank applies its
    modes; frozen parameters leave the gradient all-reduce; LOCAL units are averaged over the
    ranks after every optimizer step (see the module docstring for each mechanism).

    Args:
        model: the DDP wrapper (``find_unused_parameters=True``; its ``module`` is partitioned
            and the communication hook is registered now), or the model itself, under an
            initialized process group: then decisions are synchronized from the start and
            ``attach_ddp(controller, ddp_model)`` adds the hook once the wrapper exists (see
            there for when).
        optimizer, example_input, max_units: as for ``FreezeController``.
        process_group: the group the ranks train in (default: the wrapper's, or the world).
        **kwargs: ``FreezeController``'s other arguments; on ranks other than 0 ``signals``
            and ``reference`` are turned off, as only rank 0 observes.
    """

    process_group: dist.ProcessGroup
    rank: int
    world_size: int
    ddp_model: DistributedDataParallel | None
    comm: FreezeCommState

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        example_input: ModelInput,
        max_units: int = 32,
        *,
        process_group: dist.ProcessGroup | None = None,
        **kwargs: Any,
    ) -> None:
        wrapper = model if isinstance(model, DistributedDataParallel) else None
        if wrapper is not None:
            check_ddp_wrapper(wrapper)
            model = wrapper.module
            if process_group is None:
                process_group = wrapper.process_group
        group = _resolve_group(process_group)
        if dist.get_rank(group) != 0:
            kwargs.update(signals=False, reference=False)
        super().__init__(model, optimizer, example_input, max_units, **kwargs)
        try:
            self._init_distributed(group)
            if wrapper is not None:
                self._attach_wrapper(wrapper)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_pretrained(
        cls,
        policy: str | Policy,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        example_input: ModelInput,
        **kwargs: Any,
    ) -> "DistributedFreezeController":
        """``FreezeController.from_pretrained`` (same arguments) for DDP: call it on every rank
        with the DDP wrapper (or the model, see the class) and the same arguments; every rank
        loads the policy, and rank 0's copy alone decides. ``process_group`` may be passed."""
        controller = super().from_pretrained(policy, model, optimizer, example_input, **kwargs)
        return cast(DistributedFreezeController, controller)

    def _init_distributed(self, group: dist.ProcessGroup) -> None:
        """Set up the synchronization; on ranks other than 0, drop the signals (and stop the
        reference worker) that a controller built before ``attach_ddp`` may have."""
        self.process_group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._source = dist.get_global_rank(group, 0)
        self.ddp_model = None
        self.comm = FreezeCommState(group)
        self._local_sync: RemovableHandle | None = self.optimizer.register_step_post_hook(
            self._average_local_units
        )
        if self.rank != 0:
            if self.plasticity is not None:
                self.plasticity.close()
                self.plasticity = None
            self.use_reference = False
            self.dynamics = None
            self.attention = None

    def _attach_wrapper(self, ddp_model: DistributedDataParallel) -> None:
        if self.ddp_model is ddp_model:
            return
        if self.ddp_model is not None:
            raise ValueError("this controller's hook is registered on another DDP wrapper already")
        check_ddp_wrapper(ddp_model, self.model)
        # Partitioning ran a backward of the model outside DDP's forward, and the reducer
        # (find_unused_parameters) counts those gradients as this iteration's until its next
        # synchronized backward, in which a unit frozen by then fails its check ("Encountered
        # gradient which is undefined, but still allreduced"): start its iteration afresh, as
        # DDP's own _update_process_group does.
        reducer = getattr(ddp_model, "reducer", None)
        if reducer is not None:
            reducer._reset_state()
        name = _logging_data(ddp_model).get("comm_hook")  # read first: registering renames it
        try:
            ddp_model.register_comm_hook(self.comm, allreduce_trainable)
        except RuntimeError as error:
            if "only be called once" not in str(error):
                raise
            raise ValueError(
                f"the DDP wrapper has a communication hook already ({name}); freeze-agent's "
                "hook, which leaves frozen parameters out of the all-reduce, must be its only "
                "one: drop ddp_comm_hook= (Lightning's DDPStrategy) or comm_hook (accelerate's "
                "DistributedDataParallelKwargs)"
            ) from error
        self.ddp_model = ddp_model

    # ------------------------------------------------------------------ synchronized decisions

    def decide(self) -> list[Mode]:
        """Rank 0 observes, decides and applies; every rank then adopts its outcome. A
        collective: ``step`` calls it at the same steps on every rank (see the module
        docstring); the safety net's loss check sees rank 0's losses only."""
        started, before = time.perf_counter(), self.decision_seconds
        self._on_rank_zero(super().decide, "decide")
        self.decision_seconds = before + time.perf_counter() - started
        return self.modes

    def report_validation(
        self, metric: float, higher_is_better: bool = True, tolerance: float | None = None
    ) -> None:
        """``FreezeController.report_validation`` as a collective: call it on every rank (with
        that rank's metric, or any value); rank 0's metric is the one recorded and judged, and
        an unfreeze it causes applies on every rank."""
        report = functools.partial(
            FreezeController.report_validation, self, metric, higher_is_better, tolerance
        )
        self._on_rank_zero(report, "report_validation")

    def _on_rank_zero(self, action: Callable[[], object], what: str) -> None:
        """Run ``action`` (which may change modes) on rank 0 and give every rank its outcome."""
        failure: Exception | None = None
        payload: dict[str, Any] | None = None
        if self.rank == 0:
            with warnings.catch_warnings(record=True) as caught:
                try:
                    action()
                except Exception as error:
                    failure = error
                    payload = {"error": f"{type(error).__name__}: {error}"}
                else:
                    payload = self._decision_state()
            for warning in caught:  # the safety net's, said at the caller's line, not here
                warnings.warn(warning.message, warning.category, stacklevel=3)
        box = [payload]
        dist.broadcast_object_list(box, src=self._source, group=self.process_group)
        if failure is not None:
            raise failure
        state = cast(dict[str, Any], box[0])
        if "error" in state:
            raise RuntimeError(f"freeze-agent: {what} failed on rank 0: {state['error']}")
        if self.rank != 0:
            self._adopt(state)

    def _sync_from_rank_zero(self) -> None:
        """Every rank takes rank 0's modes and decision record (a collective)."""
        self._on_rank_zero(lambda: None, "attach_ddp")

    def _decision_state(self) -> dict[str, Any]:
        return {
            "modes": [int(m) for m in self._modes],
            "mode_since": list(self._mode_since),
            "held_until": dict(self._held_until),
            "lr_scales": self._lr_scales,
            "timeline": [dict(entry) for entry in self.timeline],
            "validation": [list(entry) for entry in self.validation],
        }

    def _adopt(self, state: dict[str, Any]) -> None:
        self._held_until = dict(state["held_until"])
        self._set_modes([Mode(m) for m in state["modes"]])
        self._mode_since = list(state["mode_since"])
        self.set_learning_rate_scales(state["lr_scales"])
        self.timeline = state["timeline"]
        self.validation = [(step, value) for step, value in state["validation"]]

    # ------------------------------------------------------------------ LOCAL units

    @torch.no_grad()
    def _average_local_units(self, _optimizer: torch.optim.Optimizer, _args, _kwargs) -> None:
        """Optimizer step post-hook: average the LOCAL units' parameters over the ranks."""
        params = [
            p
            for unit, mode in zip(self.units, self._modes, strict=True)
            if mode is Mode.LOCAL
            for p in unit.parameters()
        ]
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for p in params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        sent = 0
        for tensors in groups.values():
            flat = torch.cat([p.reshape(-1) for p in tensors])
            dist.all_reduce(flat, group=self.process_group)
            flat.div_(self.world_size)
            offset = 0
            for p in tensors:
                p.copy_(flat[offset : offset + p.numel()].view(p.shape))
                offset += p.numel()
            sent += flat.numel() * flat.element_size()
        self.comm.count_local_sync(sent)

    # ------------------------------------------------------------------ reporting

    def distributed_stats(self) -> dict[str, Any]:
        """What DDP communication cost under freeze-agent, per rank, in payload bytes:
        ``bytes_full`` what plain DDP would all-reduce (every bucket, every synchronized
        backward: ``syncs``), ``bytes_sent`` what was all-reduced (trainable gradients,
        ``gradient_bytes_sent``, plus the LOCAL units' averaging, ``local_sync_bytes``),
        ``bytes_saved`` the difference (the FROZEN parameters' gradient bytes), and the same
        three for the last step (``last_step``). Gradient bytes count once the hook is
        registered (``comm_hook``)."""
        comm = self.comm
        sent = comm.gradient_bytes_sent + comm.local_sync_bytes
        last_sent = comm.last_sent + comm.last_local
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "comm_hook": self.ddp_model is not None,
            "syncs": comm.syncs,
            "bytes_full": comm.bytes_full,
            "bytes_sent": sent,
            "bytes_saved": comm.bytes_full - sent,
            "gradient_bytes_sent": comm.gradient_bytes_sent,
            "local_sync_bytes": comm.local_sync_bytes,
            "last_step": {
                "bytes_full": comm.last_full,
                "bytes_sent": last_sent,
                "bytes_saved": comm.last_full - last_sent,
            },
        }

    def summary(self) -> dict[str, Any]:
        """``FreezeController.summary`` plus ``"ddp"``: ``distributed_stats()``. Rank 0's
        holds the record (signals, the safety net's interventions); every rank's holds the
        same timeline."""
        summary = super().summary()
        summary["ddp"] = self.distributed_stats()
        return summary

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """``FreezeController.load_state_dict`` on every rank, from the same checkpoint; ranks
        other than 0 skip the signals' part, which only rank 0 measures."""
        if isinstance(state, dict) and self.rank != 0:
            state = dict(state)
            for part, owner in (("dynamics", self.dynamics), ("plasticity", self.plasticity)):
                if owner is None:
                    state[part] = None
        super().load_state_dict(state)

    def close(self) -> None:
        """``FreezeController.close``, and stop averaging LOCAL units. The hook stays on the
        wrapper (DDP cannot remove one) and, with every unit back in TRAIN, reduces as plain
        DDP does."""
        handle = getattr(self, "_local_sync", None)
        if handle is not None:
            handle.remove()
            self._local_sync = None
        super().close()


def attach_ddp(
    controller: FreezeController,
    ddp_model: DistributedDataParallel | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> DistributedFreezeController:
    """Synchronize ``controller`` over the ranks and, with ``ddp_model``, register the hook
    that leaves frozen parameters out of its all-reduce; returns the controller. This is what
    a framework callback calls, once it holds both.

    A plain ``FreezeController`` becomes a ``DistributedFreezeController`` in place (its class
    is swapped, as ``torch.nn.utils.parametrize`` does to modules), every rank adopting rank 0's
    modes and decision record now; ranks other than 0 drop their signals and reference worker
    (build them with ``reference=False`` not to start one). Without ``ddp_model`` only the
    decisions are synchronized: call it again with the wrapper once it exists.

    A collective: call it on every rank at the same point, between two optimizer steps. The
    hook may come after the first forward/backward, but a controller built after its wrapper
    (its partitioning ran a backward DDP counts) must get it before the first training step in
    which a unit is frozen (at once, for a resumed run), and a plain controller before the
    ranks' own decisions could differ (before its first decision interval ends).
    """
    if ddp_model is not None:
        check_ddp_wrapper(ddp_model, controller.model)
        if process_group is None:
            process_group = ddp_model.process_group
    if not isinstance(controller, DistributedFreezeController):
        group = _resolve_group(process_group)
        controller.__class__ = DistributedFreezeController
        distributed = cast(DistributedFreezeController, controller)
        distributed._init_distributed(group)
        distributed._sync_from_rank_zero()
    else:
        distributed = controller
    if ddp_model is not None:
        distributed._attach_wrapper(ddp_model)
    return distributed


def _resolve_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialized: start the ranks with torchrun (or a "
            "framework's DDP strategy) and call dist.init_process_group before building a "
            "DistributedFreezeController"
        )
    return process_group if process_group is not None else dist.group.WORLD


def _logging_data(ddp_model: DistributedDataParallel) -> dict[str, Any]:
    """DDP's own record of the wrapper (reduced parameter count, hook name); empty where a
    torch version lacks it."""
    read = getattr(ddp_model, "_get_ddp_logging_data", None)
    return dict(read()) if read is not None else {}
