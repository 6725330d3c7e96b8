"""Per-sample activation store of one boundary: memory first, a disk memmap beyond a budget.

``ActivationStore`` holds one activation row per training sample, detached on the CPU: the lowest
sample indices in memory up to a byte budget, the rest spilled to a ``np.memmap`` file (removed on
close). It takes the boundary's bytes per sample × the training set size in all. Since an epoch's
batch order is known in advance, a daemon thread (``_Prefetcher``) reads the batches ahead of use,
into pinned memory when they go to a GPU. ``PrefixCache`` (``freeze_agent.core.prefix_cache``)
keeps one store per cached boundary.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

PREFETCH_BATCHES = 4  # batches the prefetch thread reads ahead of use
_WORDS = {
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.uint8: np.uint8,
}


def cpu_index(indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
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
        index = cpu_index(indices)
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
        return self._stored[cpu_index(indices)]

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
        index = cpu_index(indices)
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
        batches = list(cpu_index(order).split(batch_size))
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
