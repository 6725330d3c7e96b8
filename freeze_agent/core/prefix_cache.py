"""Activation cache of the frozen prefix (as in Egeria, AutoFreeze and PipeTransformer).

When units 0..k-1 are FROZEN, unit k-1 is a cut point and the data pipeline is deterministic,
the activation each training sample produces at that boundary never changes. ``PrefixCache``
stores it once per sample (``ActivationStore``: in memory up to a budget, in a memmap file beyond
it) and from then on skips the prefix's forward pass, feeding the stored activation into unit k.

How the prefix is skipped, for any model (not only ``nn.Sequential``): while a cached batch runs,
the ``forward`` of the prefix units' top modules is replaced. The exit module of unit k-1 returns
the cached activation; every other prefix module returns a cheap stand-in, its first input when
that has the shape the module's real output had, else zeros of that shape (so parent-level code
between prefix modules, such as ``x.flatten(2) + pos``, still runs). That code runs on stand-ins,
which could change the result for exotic models; so the first time a boundary is used, one batch
runs both ways (RNG, parameters and buffers restored in between) and the outputs are compared.
A mismatch or an exception retires that depth for good and the cache falls back to a shallower
cut point, if any.

Per batch, rows not yet stored at the target boundary get it from a prefix-only pass (a hook
ends the forward right after the boundary module, so nothing beyond the cut runs), computed from
a shallower stored boundary when one holds them (incremental growth: only the newly frozen units
run), and stored; then the whole batch runs with the prefix skipped. So the first epoch after a
freeze fills the store at about the cost of a normal epoch and later batches are served, even
when freezing starts mid-epoch (the few rows a trainer's dropped ragged batch never showed are
filled whenever they do come).

Stores hold activations detached on the CPU (prefetched into pinned memory for CUDA): one
boundary row per training sample, i.e. the boundary's bytes per sample × the training set size.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from freeze_agent.core.modes import Mode
from freeze_agent.core.units import ModelInput, Unit, call_model, tensors_in

PREFETCH_BATCHES = 4  # batches the prefetch thread reads ahead of use
_MISSING = object()
_WORDS = {
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.uint8: np.uint8,
}
# (rtol, atol) of the one-time check that skipping the prefix leaves the output unchanged; loose
# enough for the float noise of a different batch composition, tight enough to catch real changes.
_TOLERANCE = {torch.float16: (1e-2, 1e-3), torch.bfloat16: (5e-2, 1e-2)}
_DEFAULT_TOLERANCE = (1e-4, 1e-5)


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


def _cpu_index(indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Row indices as a contiguous 1-D int64 CPU tensor (what indexing and keys need)."""
    return torch.as_tensor(indices).to("cpu", torch.long).reshape(-1).contiguous()


def _key(index: torch.Tensor) -> bytes:
    return index.numpy().tobytes()


def _remove(path: Path, folder: Path | None) -> None:
    """Delete a spill file and, when the store created it, its folder."""
    path.unlink(missing_ok=True)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


class _Prefetcher:
    """A daemon thread that reads ``batches`` in order, at most ``PREFETCH_BATCHES`` ahead."""

    def __init__(
        self, read: Callable[[torch.Tensor], torch.Tensor | None], batches: list[torch.Tensor]
    ) -> None:
        self._positions: dict[bytes, int] = {}
        for position, batch in enumerate(batches):
            self._positions.setdefault(_key(batch), position)
        self._next = 0
        self._queue: queue.Queue[tuple[int, torch.Tensor | None]] = queue.Queue(PREFETCH_BATCHES)
        self._stop = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(read, batches), name="activation-prefetch", daemon=True
        )
        self.thread.start()

    def _run(
        self, read: Callable[[torch.Tensor], torch.Tensor | None], batches: list[torch.Tensor]
    ) -> None:
        for position, batch in enumerate(batches):
            try:
                data = read(batch)
            except Exception:  # the consumer then reads directly and sees the error itself
                data = None
            while not self._stop.is_set():
                try:
                    self._queue.put((position, data), timeout=0.05)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set():
                return

    def take(self, index: torch.Tensor) -> torch.Tensor | None:
        """The prefetched rows of batch ``index`` if it is a batch still ahead in the order
        (earlier batches in the queue are skipped), else None."""
        position = self._positions.get(_key(index))
        if position is None or position < self._next:
            return None
        self._next = position + 1
        while True:
            try:
                found, data = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self.thread.is_alive():
                    return None
                continue
            if found == position:
                return data

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


class ActivationStore:
    """Per-sample activations of one boundary for a dataset of ``num_samples`` rows.

    Rows are kept in memory up to ``memory_budget_bytes`` (the lowest sample indices) and spilled
    beyond it to a ``np.memmap`` file in ``spill_dir`` (a temporary folder by default, removed on
    close). The per-sample shape and dtype are fixed by the first ``store()``; rows are kept as raw
    words, so any dtype (bfloat16 included) works. A stored row is never rewritten, which lets the
    prefetch thread read while the main thread fills other rows.

    ``pin_memory`` makes prefetched batches page-locked, for asynchronous copies to a GPU.
    """

    def __init__(
        self,
        num_samples: int,
        memory_budget_bytes: int,
        spill_dir: Path | None = None,
        *,
        pin_memory: bool = False,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {memory_budget_bytes}")
        self.num_samples = num_samples
        self.memory_budget_bytes = memory_budget_bytes
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.pin_memory = pin_memory
        self.prefetched = 0
        """Fetches answered from the prefetch queue (the rest read directly)."""
        self._stored = torch.zeros(num_samples, dtype=torch.bool)
        self._count = 0
        self._shape: torch.Size | None = None
        self._dtype: torch.dtype | None = None
        self._row_bytes = 0
        self._memory_rows = 0
        self._word = torch.uint8  # rows are moved as words of this type (see _allocate)
        self._memory = torch.empty(0, 0, dtype=torch.uint8)  # (memory rows, words per row)
        self._disk: np.memmap | None = None  # (num_samples - memory rows, row bytes)
        self._cleanup: weakref.finalize | None = None
        self._prefetcher: _Prefetcher | None = None
        self._closed = False

    # ------------------------------------------------------------------ writing

    def store(self, indices: torch.Tensor, activations: torch.Tensor) -> None:
        """Store ``activations[i]`` as the row of sample ``indices[i]`` (detached, off the device).

        Rows already stored are left as they are. Raises ValueError when the per-sample shape or
        dtype differs from the first stored batch.
        """
        if self._closed:
            raise RuntimeError("the activation store is closed")
        index = _cpu_index(indices)
        activations = activations.detach()
        if activations.dim() == 0 or activations.shape[0] != index.numel():
            raise ValueError(
                f"got {index.numel()} indices for activations of shape {tuple(activations.shape)}"
            )
        if self._shape is None:
            self._allocate(activations.shape[1:], activations.dtype)
        elif activations.shape[1:] != self._shape or activations.dtype != self._dtype:
            raise ValueError(
                f"per-sample activation {tuple(activations.shape[1:])} {activations.dtype} differs "
                f"from the stored {tuple(self._shape)} {self._dtype}"
            )
        new = ~self._stored[index]
        if not bool(new.any()):
            return
        index = index[new]
        rows = activations[new.to(activations.device)].to("cpu").reshape(index.numel(), -1)
        raw = rows.contiguous().view(self._word)
        in_memory, on_disk = self._split(index)
        if in_memory.numel():
            self._memory.index_copy_(0, index[in_memory], raw[in_memory])
        if on_disk.numel():
            assert self._disk is not None
            self._disk[(index[on_disk] - self._memory_rows).numpy()] = raw[on_disk].numpy()
        self._stored[index] = True  # after the data: the prefetch thread trusts this flag
        self._count += int(torch.unique(index).numel())

    def _allocate(self, shape: torch.Size, dtype: torch.dtype) -> None:
        numel = shape.numel()
        if numel == 0:
            raise ValueError(f"cannot store empty per-sample activations of shape {tuple(shape)}")
        self._shape, self._dtype = shape, dtype
        self._row_bytes = numel * dtype.itemsize
        # Rows move as the widest word dividing them: byte-wise row copies are ~10x slower.
        self._word = next(w for w in _WORDS if self._row_bytes % w.itemsize == 0)
        words = self._row_bytes // self._word.itemsize
        self._memory_rows = min(self.num_samples, self.memory_budget_bytes // self._row_bytes)
        self._memory = torch.empty(self._memory_rows, words, dtype=self._word)
        disk_rows = self.num_samples - self._memory_rows
        if disk_rows == 0:
            return
        own_folder = None
        if self.spill_dir is None:
            own_folder = Path(tempfile.mkdtemp(prefix="freeze-agent-cache-"))
            folder = own_folder
        else:
            folder = self.spill_dir
            folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=folder)
        os.close(handle)
        self._cleanup = weakref.finalize(self, _remove, Path(name), own_folder)
        np_word = _WORDS[self._word]
        self._disk = np.memmap(name, dtype=np_word, mode="w+", shape=(disk_rows, words))

    # ------------------------------------------------------------------ reading

    def stored(self, indices: torch.Tensor) -> torch.Tensor:
        """Which samples of ``indices`` are stored (a bool CPU tensor)."""
        return self._stored[_cpu_index(indices)]

    def contains(self, indices: torch.Tensor) -> bool:
        """Whether every sample of ``indices`` is stored."""
        return bool(self.stored(indices).all())

    @property
    def complete(self) -> bool:
        """Every sample is stored."""
        return self._count == self.num_samples

    @property
    def num_stored(self) -> int:
        return self._count

    @property
    def bytes_in_memory(self) -> int:
        return int(self._stored[: self._memory_rows].sum()) * self._row_bytes

    @property
    def bytes_on_disk(self) -> int:
        return self._count * self._row_bytes - self.bytes_in_memory

    def fetch(self, indices: torch.Tensor) -> torch.Tensor:
        """The stored rows of ``indices`` as one CPU tensor (the next expected batch of a
        prefetch comes from its queue). Raises KeyError if a sample is not stored."""
        index = _cpu_index(indices)
        if self._prefetcher is not None:
            data = self._prefetcher.take(index)
            if data is not None:
                self.prefetched += 1
                return data
        return self._read(index)

    def _split(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions in ``index`` of the rows kept in memory and of those on disk. (Rows move
        with ``index_select``/``index_copy_``: advanced indexing is many times slower.)"""
        in_memory = index < self._memory_rows
        return in_memory.nonzero().squeeze(1), (~in_memory).nonzero().squeeze(1)

    def _read(self, index: torch.Tensor) -> torch.Tensor:
        if self._closed:
            raise RuntimeError("the activation store is closed")
        if not self.contains(index):
            missing = int((~self._stored[index]).sum())
            raise KeyError(f"{missing} of the {index.numel()} requested samples are not stored")
        assert self._shape is not None and self._dtype is not None
        in_memory, on_disk = self._split(index)
        if not on_disk.numel():
            raw = self._memory.index_select(0, index)
        else:
            assert self._disk is not None
            raw = torch.empty(index.numel(), self._memory.shape[1], dtype=self._word)
            raw.index_copy_(0, in_memory, self._memory.index_select(0, index[in_memory]))
            rows = (index[on_disk] - self._memory_rows).numpy()
            raw.index_copy_(0, on_disk, torch.from_numpy(np.asarray(self._disk[rows])))
        return raw.view(self._dtype).reshape(index.numel(), *self._shape)

    def _read_ahead(self, index: torch.Tensor) -> torch.Tensor | None:
        """The prefetch thread's read: None for a batch not (yet) fully stored."""
        if not self.contains(index):
            return None
        data = self._read(index)
        return data.pin_memory() if self.pin_memory else data

    # ------------------------------------------------------------------ prefetch

    def prefetch(self, order: torch.Tensor, batch_size: int) -> None:
        """Read the batches of ``order`` (consecutive chunks of ``batch_size``) in a background
        thread ahead of use; ``fetch`` of one of them takes it from the queue. Replaces any
        running prefetch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.stop_prefetch()
        if self._closed:
            raise RuntimeError("the activation store is closed")
        batches = list(_cpu_index(order).split(batch_size))
        if batches:
            self._prefetcher = _Prefetcher(self._read_ahead, batches)

    def stop_prefetch(self) -> None:
        """Stop the prefetch thread (if any) and wait for it to end."""
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None

    def close(self) -> None:
        """Stop prefetching, free the memory and delete the spill file (idempotent)."""
        self.stop_prefetch()
        self._closed = True
        self._memory = torch.empty(0, 0, dtype=torch.uint8)
        self._disk = None
        if self._cleanup is not None:
            self._cleanup()


@dataclass(eq=False)
class _Level:
    """One cached boundary: the output of unit ``depth - 1`` for every stored sample."""

    depth: int
    store: ActivationStore
    verified: bool = False


class PrefixCache:
    """Caches the frozen prefix's boundary activation and skips the prefix's forward.

    Args:
        model: the model being trained; ``forward`` calls it as ``call_model`` does.
        units: its partition (``freeze_agent.units.partition``).
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
        self._out_meta: dict[nn.Module, tuple[torch.Size, torch.dtype] | None] = {}
        self._zeros: dict[tuple[nn.Module, int], torch.Tensor] = {}
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
        cuts = [k for k in range(frozen, 0, -1) if self.units[k - 1].is_cut_point]
        for k in cuts:
            if k not in self._failed:
                return k, None
        if cuts:
            return 0, self._failed[cuts[0]]
        earlier = " (nor is any unit before it)" if frozen > 1 else ""
        return 0, f"unit {frozen - 1} is not a cut point{earlier}"

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

    def _fail(self, depth: int, reason: str) -> None:
        """Retire ``depth`` for good and fall back to the next usable boundary."""
        self._failed[depth] = reason
        self.update(self._modes)

    # ------------------------------------------------------------------ epochs and prefetch

    def begin_epoch(self, order: torch.Tensor, batch_size: int) -> None:
        """The epoch will visit the rows of ``order`` in batches of ``batch_size``; read the
        stored activations ahead in that order."""
        self._order = _cpu_index(order)
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
        index = _cpu_index(indices)
        missing = ~target.store.stored(index)
        computed = None
        if bool(missing.any()):
            computed = self._fill(target, inputs, index, missing)
            if computed is None:  # the target failed and was retired: follow the new plan
                self._position -= 1
                return self.forward(inputs, indices)
        cached = self._boundary(target, index, missing, computed)
        if target.verified:
            output = self._run(inputs, index, target.depth, cached)
            self.misses += int(missing.sum())
            self.hits += index.numel() - int(missing.sum())
            self.last_batch = (target.depth, 1.0 - int(missing.sum()) / index.numel())
        else:
            output = self._verify(inputs, index, target, cached)
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
            rows, sub_index = _take_rows(inputs, positions, index.numel()), index[positions]
        base = self._base
        if base is None or not base.verified or not base.store.contains(sub_index):
            base = None
        unit = target.depth - 1
        rng = _rng_state(device)
        try:
            with torch.no_grad():
                output = self._prefix_only(rows, sub_index, base, target.depth)
        except Exception as error:  # the model's own errors resurface in the plain forward
            output = f"the prefix could not be run on its own: {type(error).__name__}: {error}"
        finally:
            _set_rng_state(rng, device)
        if isinstance(output, torch.Tensor):
            if output.dim() == 0 or output.shape[0] != sub_index.numel():
                output = f"unit {unit}'s output has no batch dimension first"
            else:
                try:
                    target.store.store(sub_index, output)
                    return output
                except ValueError as error:
                    output = f"unit {unit}'s output cannot be stored: {error}"
        elif not isinstance(output, str):
            output = f"unit {unit}'s output is a {type(output).__name__}, not a single tensor"
        self._fail(target.depth, output)
        return None

    def _prefix_only(
        self, inputs: ModelInput, index: torch.Tensor, base: _Level | None, depth: int
    ) -> Any:
        """The output of unit ``depth - 1`` for ``inputs``: the forward stops right after it
        (nothing beyond the cut runs), skipping the units before ``base``'s boundary if given.
        Also records each prefix module's output shape, for the stand-ins."""
        start = 0 if base is None else base.depth
        handles = [
            m.register_forward_hook(self._record_shape)
            for unit in self.units[start:depth]
            for m in unit.modules
            if m not in self._out_meta
        ]
        handles.append(self.units[depth - 1].exit_module.register_forward_hook(_stop_forward))
        cached = None
        if base is not None:
            cached = base.store.fetch(index).to(self._device(), non_blocking=True)
        try:
            with self._skipping(start, cached, index.numel()):
                call_model(self.model, inputs)
        except _BoundaryReached as reached:
            return reached.output
        finally:
            for handle in handles:
                handle.remove()
        return f"unit {depth - 1}'s exit module did not run"

    def _record_shape(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Remember a prefix module's per-sample output shape (None: not a batch tensor)."""
        batch = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim()), None)
        ok = isinstance(output, torch.Tensor) and output.dim() > 0
        ok = ok and (batch is None or output.shape[0] == batch)
        self._out_meta.setdefault(module, (output.shape[1:], output.dtype) if ok else None)

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
            return target.store.fetch(index).to(device, non_blocking=True)
        if bool(missing.all()):
            return computed
        stored = target.store.fetch(index[~missing]).to(device, non_blocking=True)
        boundary = computed.new_empty((index.numel(), *computed.shape[1:]))
        on_device = missing.to(device)
        boundary[on_device] = computed
        boundary[~on_device] = stored
        return boundary

    def _run(
        self, inputs: ModelInput, index: torch.Tensor, depth: int, cached: torch.Tensor
    ) -> Any:
        """The model's output with units 0..depth-1 skipped and ``cached`` as their output."""
        with self._skipping(depth, cached, index.numel()):
            return call_model(self.model, inputs)

    @contextlib.contextmanager
    def _skipping(self, depth: int, cached: torch.Tensor | None, batch: int) -> Iterator[None]:
        """Replace the forwards of units 0..depth-1's top modules with stand-ins, the exit
        module of unit depth-1 returning ``cached`` (depth 0: nothing is replaced)."""
        if depth == 0:
            yield
            return
        device = self._device()
        exit_module = self.units[depth - 1].exit_module
        modules = [m for unit in self.units[:depth] for m in unit.modules]
        saved = [(m, m.__dict__.get("forward", _MISSING)) for m in modules]
        try:
            for m in modules:
                if m is exit_module:
                    m.forward = lambda *_args, **_kwargs: cached
                else:
                    m.forward = self._stand_in(m, batch, device)
            yield
        finally:
            for m, forward in saved:
                if forward is _MISSING:
                    del m.forward
                else:
                    m.forward = forward

    def _stand_in(self, module: nn.Module, batch: int, device: torch.device) -> Callable[..., Any]:
        """A forward for a skipped prefix module whose output is unused beyond the cut: its
        first input if that is shaped like the real output was, else zeros of that shape (one
        buffer per module and batch size, reused: allocating it every step costs more than the
        rest of a small skip)."""
        meta = self._out_meta.get(module)

        def forward(*args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else next(iter(kwargs.values()), None)
            if meta is None:
                return first
            shape, dtype = (batch, *meta[0]), meta[1]
            if isinstance(first, torch.Tensor) and (first.dtype, first.shape) == (dtype, shape):
                return first
            zeros = self._zeros.get((module, batch))
            if zeros is None or zeros.device != device:
                zeros = self._zeros[module, batch] = torch.zeros(shape, dtype=dtype, device=device)
            return zeros

        return forward

    def _verify(
        self, inputs: ModelInput, index: torch.Tensor, level: _Level, cached: torch.Tensor
    ) -> Any:
        """Run the batch skipping the prefix (without gradients), put back the RNG, parameters
        and buffers it changed, then run it normally (this output is returned, so nothing
        touches its autograd graph afterwards) and compare the two."""
        device = self._device()
        tensors = [*self.model.parameters(), *self.model.buffers()]
        before = [t.detach().clone() for t in tensors]
        rng = _rng_state(device)
        skipped, problem = None, None
        try:
            with torch.no_grad():
                skipped = self._run(inputs, index, level.depth, cached)
        except Exception as error:  # a model the stand-ins break: say so and stop skipping it
            problem = f"{type(error).__name__}: {error}"
        finally:
            _assign(tensors, before)  # norm statistics, local-rule weights
            _set_rng_state(rng, device)
        output = call_model(self.model, inputs)
        problem = problem or _mismatch(output, skipped)
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
        self._zeros.clear()
        self._reason_off = "closed"


# ---------------------------------------------------------------------- helpers


class _BoundaryReached(BaseException):
    """Raised by a hook right after the boundary module to end a prefix-only forward (a
    BaseException, so that a model's own ``except Exception`` does not swallow it)."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output


def _stop_forward(_module: nn.Module, _args: Any, output: Any) -> None:
    raise _BoundaryReached(output)


def _take_rows(value: Any, positions: torch.Tensor, batch: int) -> Any:
    """``value`` (a model input) with only the rows ``positions`` of every batch tensor."""
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == batch:
            return value[positions.to(value.device)]
        return value
    if isinstance(value, Mapping):
        return {k: _take_rows(v, positions, batch) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(v, positions, batch) for v in value)
    return value


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _assign(tensors: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Copy ``values`` into ``tensors`` where they differ (untouched tensors keep their version)."""
    with torch.no_grad():
        for tensor, value in zip(tensors, values, strict=True):
            if not torch.equal(tensor, value):
                tensor.copy_(value)


def _mismatch(expected: Any, got: Any) -> str | None:
    """How ``got`` differs from ``expected`` (every tensor in them), or None if it does not."""
    want, have = list(tensors_in(expected)), list(tensors_in(got))
    if len(want) != len(have):
        return f"the output holds {len(have)} tensors instead of {len(want)}"
    for a, b in zip(want, have, strict=True):
        a = a.detach()
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"an output is {tuple(b.shape)} {b.dtype} instead of {tuple(a.shape)} {a.dtype}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return "an integer output changed"
            continue
        rtol, atol = _TOLERANCE.get(a.dtype, _DEFAULT_TOLERANCE)
        if not torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            diff = float((a.float() - b.float()).abs().nan_to_num(float("inf")).max())
            return f"the output changed (largest difference {diff:.3g})"
    return None
