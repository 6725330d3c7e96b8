"""Activation cache of the frozen prefix (as in Egeria, AutoFreeze and PipeTransformer).

When units 0..k-1 are FROZEN, unit k-1 is a cut point and the data pipeline is deterministic,
the activation each training sample produces at that boundary never changes. ``PrefixCache``
stores it once per sample (``freeze_agent.core.activation_store``: in memory up to a budget, in a
memmap file beyond it) and from then on skips the prefix's forward pass, feeding the stored
activation into unit k (``freeze_agent.core.prefix_forward``: the prefix modules' forwards are
replaced by stand-ins while a cached batch runs). The first time a boundary is used, one batch
runs both ways and the outputs are compared (``freeze_agent.core.cache_verification``). A
mismatch or an exception retires that depth for good and the cache falls back to a shallower
cut point, if any.

Per batch, rows not yet stored at the target boundary get it from a prefix-only pass (a hook
ends the forward right after the boundary module, so nothing beyond the cut runs), computed from
a shallower stored boundary when one holds them (incremental growth: only the newly frozen units
run), and stored; then the whole batch runs with the prefix skipped. So the first epoch after a
freeze fills the store at about the cost of a normal epoch and later batches are served, even
when freezing starts mid-epoch (the few rows a trainer's dropped ragged batch never showed are
filled whenever they do come).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from freeze_agent.core.activation_layout import ActivationLayout
from freeze_agent.core.activation_store import ActivationStore, cpu_index
from freeze_agent.core.cache_verification import preserved_rng, verify_skip
from freeze_agent.core.modes import Mode
from freeze_agent.core.prefix_forward import PrefixRunner, take_rows
from freeze_agent.core.units import ModelInput, Unit, call_model


@dataclass
class CacheStats:
    """What the prefix cache is doing, for logs and timing reports."""

    depth: int
    """Frozen units the cache is for (the target boundary); 0 when off."""
    state: str
    """"off", "filling" (not every sample stored yet) or "serving" (every sample stored)."""
    hits: int
    """Samples whose prefix forward was skipped (fed from a stored boundary)."""
    misses: int
    """Samples whose boundary was computed (the prefix, or its newly frozen part, ran) or
    whose batch checked a new boundary against a normal forward."""
    bytes_in_memory: int
    bytes_on_disk: int
    reason_off: str | None
    """Why the cache is off (None while filling or serving)."""


@dataclass(eq=False)
class _Level:
    """One cached boundary: the output of unit ``depth - 1`` for every stored sample."""

    depth: int
    store: ActivationStore
    verified: bool = False
    layout: ActivationLayout | None = None
    """How the boundary output (a tensor, tuple or ``ModelOutput``) maps to a stored row; set
    by the first fill."""

    def rows(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.store.fetch(index).to(device, non_blocking=True)

    def output(self, rows: torch.Tensor) -> Any:
        """The boundary output, in its exit module's structure, from stored rows."""
        assert self.layout is not None
        return self.layout.unpack(rows)


class PrefixCache:
    """Caches the frozen prefix's boundary activation and skips the prefix's forward.

    Args:
        model: the model being trained; ``forward`` calls it as ``call_model`` does.
        units: its partition (``freeze_agent.core.units.partition``).
        num_samples: rows of the training set; ``forward`` gets row indices into it.
        deterministic_data: whether a row always yields the same input (no random
            augmentation); without it a stored activation would be stale, so the cache stays off.
        memory_budget_bytes: memory per boundary store; rows beyond it spill to disk. While a
            deeper boundary fills from a shallower one, both are held.
        spill_dir: folder of the spill files (a temporary folder by default).
        enabled: False keeps the cache off ("disabled").
        device: where cached activations go (default: the device of the model's parameters).

    Call ``update(modes)`` after every mode change, ``begin_epoch`` before each epoch and run
    every training batch through ``forward``.
    """

    def __init__(
        self,
        model: nn.Module,
        units: list[Unit],
        num_samples: int,
        *,
        deterministic_data: bool,
        memory_budget_bytes: int = 1 << 30,
        spill_dir: Path | None = None,
        enabled: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.units = list(units)
        self.num_samples = num_samples
        self.deterministic_data = deterministic_data
        self.memory_budget_bytes = memory_budget_bytes
        self.spill_dir = spill_dir
        self.enabled = enabled
        self.device = torch.device(device) if device is not None else None
        self.hits = 0
        self.misses = 0
        self.last_batch: tuple[int, float] = (0, 0.0)
        """(depth, fraction of rows served from the store) of the latest ``forward``."""
        self._target: _Level | None = None
        self._base: _Level | None = None
        self._failed: dict[int, str] = {}
        self._reason_off: str | None = None
        self._modes: list[Mode] = [Mode.TRAIN] * len(self.units)
        self._runner = PrefixRunner(model, self.units)
        self._order: torch.Tensor | None = None
        self._batch_size = 0
        self._position = 0
        self.update(self._modes)

    # ------------------------------------------------------------------ planning

    def _levels(self) -> list[_Level]:
        return [level for level in (self._target, self._base) if level is not None]

    def _plan(self, modes: Sequence[Mode]) -> tuple[int, str | None]:
        """The target depth for ``modes`` and, when it is 0, why."""
        if not self.enabled:
            return 0, "disabled"
        if not self.deterministic_data:
            return 0, "random augmentation: a sample's activations differ every epoch"
        frozen = 0
        while frozen < len(self.units) - 1 and modes[frozen] is Mode.FROZEN:
            frozen += 1
        if frozen == 0:
            return 0, "no frozen prefix"
        cuts = [
            k
            for k in range(frozen, 0, -1)
            if self.units[k - 1].is_cut_point and not self._tied_beyond(k)
        ]
        for k in cuts:
            if k not in self._failed:
                return k, None
        if cuts:
            return 0, self._failed[cuts[0]]
        tied = next((u for u in self.units[:frozen] if u.tied_to), None)
        if tied is not None:
            return 0, (
                f"unit {tied.index} uses a parameter tied to unit {tied.tied_to[0]}, which keeps "
                "training, so no frozen prefix holding it has a fixed output"
            )
        earlier = " (nor is any unit before it)" if frozen > 1 else ""
        return 0, f"unit {frozen - 1} is not a cut point{earlier}"

    def _tied_beyond(self, depth: int) -> bool:
        """Does a unit before ``depth`` use a parameter owned by a unit at or after it? That
        parameter keeps training, so the prefix's output keeps changing (GPT-2's input
        embedding, tied to the head)."""
        return any(owner >= depth for unit in self.units[:depth] for owner in unit.tied_to)

    def update(self, modes: Sequence[Mode | int]) -> None:
        """Follow a mode change: target the deepest usable boundary of the frozen prefix.

        A stored boundary stays valid while every unit before it stays FROZEN; one behind a unit
        that left FROZEN is dropped right here. A deeper target keeps the old boundary as its
        base, so only the newly frozen units run while the new one fills.
        """
        if len(modes) != len(self.units):
            raise ValueError(f"got {len(modes)} modes for {len(self.units)} units")
        self._modes = [Mode(int(m)) for m in modes]
        depth, self._reason_off = self._plan(self._modes)
        # depth is the deepest usable cut inside the frozen prefix, so a level no deeper than it
        # still has every unit before it FROZEN; a deeper one lost a unit (or failed).
        kept = {
            level.depth: level
            for level in self._levels()
            if level.depth <= depth and level.depth not in self._failed
        }
        previous = self._target
        target = kept.pop(depth, None) if depth else None
        if depth and target is None:
            pin = self._device().type == "cuda"
            store = ActivationStore(
                self.num_samples, self.memory_budget_bytes, self.spill_dir, pin_memory=pin
            )
            target = _Level(depth, store)
        base = max(kept.values(), key=lambda level: level.depth, default=None)
        if target is not None and target.store.complete:
            base = None
        for level in self._levels():
            if level is not target and level is not base:
                level.store.close()
        self._target, self._base = target, base
        if target is not previous:
            self._restart_prefetch()

    def retire(self, failed: dict[int, str]) -> None:
        """Retire depths known to fail (from a checkpoint of an earlier run), with the reason."""
        self._failed.update(failed)
        self.update(self._modes)

    def _fail(self, depth: int, reason: str) -> None:
        """Retire ``depth`` for good and fall back to the next usable boundary."""
        self._failed[depth] = reason
        self.update(self._modes)

    # ------------------------------------------------------------------ epochs and prefetch

    def begin_epoch(self, order: torch.Tensor, batch_size: int) -> None:
        """The epoch will visit the rows of ``order`` in batches of ``batch_size``; read the
        stored activations ahead in that order."""
        self._order = cpu_index(order)
        self._batch_size = batch_size
        self._position = 0
        self._restart_prefetch()

    def _restart_prefetch(self) -> None:
        """Prefetch the rest of the epoch from the store most batches will come from."""
        for level in self._levels():
            level.store.stop_prefetch()
        if self._order is None or self._target is None:
            return
        target, base = self._target, self._base
        source = base if base is not None and not target.store.complete else target
        remaining = self._order[self._position * self._batch_size :]
        if source.store.num_stored and remaining.numel():
            source.store.prefetch(remaining, self._batch_size)

    # ------------------------------------------------------------------ forward

    def _device(self) -> torch.device:
        if self.device is not None:
            return self.device
        return next(self.model.parameters()).device

    def forward(self, inputs: ModelInput, indices: torch.Tensor) -> Any:
        """Run the model on a training batch whose dataset rows are ``indices``.

        Rows missing from the target store first get their boundary computed by a prefix-only
        pass (from the base boundary when it holds them) and stored; then the batch runs with
        the prefix skipped. The first batch served at a boundary is checked against a normal
        forward.
        """
        self._position += 1
        target = self._target
        self.last_batch = (0, 0.0)
        if target is None:
            return call_model(self.model, inputs)
        index = cpu_index(indices)
        missing = ~target.store.stored(index)
        computed = None
        if bool(missing.any()):
            computed = self._fill(target, inputs, index, missing)
            if computed is None:  # the target failed and was retired: follow the new plan
                self._position -= 1
                return self.forward(inputs, indices)
        cached = self._boundary(target, index, missing, computed)
        if target.verified:
            output = self._runner.run_skipping(
                inputs, target.depth, target.output(cached), self._device()
            )
            self.misses += int(missing.sum())
            self.hits += index.numel() - int(missing.sum())
            self.last_batch = (target.depth, 1.0 - int(missing.sum()) / index.numel())
        else:
            output = self._verify(inputs, target, cached)
            self.misses += index.numel()
        if self._base is not None and self._target is target and target.store.complete:
            self._base.store.close()
            self._base = None
            self._restart_prefetch()
        return output

    def _fill(
        self, target: _Level, inputs: ModelInput, index: torch.Tensor, missing: torch.Tensor
    ) -> torch.Tensor | None:
        """Compute and store the target boundary of the ``missing`` rows of the batch; returns
        it, or None when the boundary cannot be cached (the target is then retired)."""
        device = self._device()
        if bool(missing.all()):
            rows, sub_index = inputs, index
        else:
            positions = missing.nonzero().squeeze(1)
            rows, sub_index = take_rows(inputs, positions, index.numel()), index[positions]
        base = self._base
        if base is None or not base.verified or not base.store.contains(sub_index):
            base = None
        with preserved_rng(device) as draws:
            try:
                with torch.no_grad():
                    if base is None:
                        output = self._runner.run_to_boundary(rows, target.depth, device)
                    else:
                        cached = base.output(base.rows(sub_index, device))
                        output = self._runner.run_to_boundary(
                            rows, target.depth, device, start=base.depth, cached=cached
                        )
            except Exception as error:  # the model's own errors resurface in the plain forward
                output = f"the prefix could not be run on its own: {type(error).__name__}: {error}"
        if draws.drew:  # the frozen units draw nothing (eval): something between them does
            output = (
                f"the frozen prefix up to unit {target.depth - 1} draws random numbers in "
                "training (dropout, LayerDrop or masking outside its units), so its output "
                "differs every epoch"
            )
        if not isinstance(output, str):
            output = self._store(target, sub_index, output)
            if isinstance(output, torch.Tensor):
                return output
        self._fail(target.depth, output)
        return None

    @staticmethod
    def _store(level: _Level, index: torch.Tensor, output: Any) -> torch.Tensor | str:
        """Store a fill's boundary output; returns its rows, or why it cannot be stored."""
        unit = level.depth - 1
        if level.layout is None:
            layout = ActivationLayout.of(output, index.numel())
            if isinstance(layout, str):
                return f"unit {unit}'s output cannot be cached: {layout}"
            level.layout = layout
        else:
            problem = level.layout.matches(output, index.numel())
            if problem is not None:
                return f"unit {unit}'s output cannot be cached: {problem}"
        rows = level.layout.pack(output)
        try:
            level.store.store(index, rows)
        except ValueError as error:
            return f"unit {unit}'s output cannot be stored: {error}"
        return rows

    def _boundary(
        self,
        target: _Level,
        index: torch.Tensor,
        missing: torch.Tensor,
        computed: torch.Tensor | None,
    ) -> torch.Tensor:
        """The target boundary of the whole batch, on the model's device: stored rows from the
        store, just computed ones as they are (no round trip through the store)."""
        device = self._device()
        if computed is None:
            return target.rows(index, device)
        if bool(missing.all()):
            return computed
        stored = target.rows(index[~missing], device)
        boundary = computed.new_empty((index.numel(), *computed.shape[1:]))
        on_device = missing.to(device)
        boundary[on_device] = computed
        boundary[~on_device] = stored
        return boundary

    def _verify(self, inputs: ModelInput, level: _Level, rows: torch.Tensor) -> Any:
        """Run the batch skipping the prefix and normally, compare the two (``verify_skip``) and
        return the normal output; a difference retires the level's depth."""
        device = self._device()
        output, problem = verify_skip(
            self.model,
            inputs,
            lambda: self._runner.run_skipping(inputs, level.depth, level.output(rows), device),
            device,
        )
        if problem is None:
            level.verified = True
        else:
            self._fail(level.depth, f"prefix could not be skipped: {problem}")
        return output

    # ------------------------------------------------------------------ reporting

    @property
    def failed(self) -> dict[int, str]:
        """Depths retired for good, with the reason (e.g. the prefix could not be skipped)."""
        return dict(self._failed)

    def stats(self) -> CacheStats:
        target = self._target
        stores = [level.store for level in self._levels()]
        return CacheStats(
            depth=target.depth if target is not None else 0,
            state="off" if target is None else "serving" if target.store.complete else "filling",
            hits=self.hits,
            misses=self.misses,
            bytes_in_memory=sum(s.bytes_in_memory for s in stores),
            bytes_on_disk=sum(s.bytes_on_disk for s in stores),
            reason_off=self._reason_off if target is None else None,
        )

    def close(self) -> None:
        """Drop every stored boundary (spill files included) and stop prefetching."""
        for level in self._levels():
            level.store.close()
        self._target = self._base = None
        self._runner.release()
        self._reason_off = "closed"
