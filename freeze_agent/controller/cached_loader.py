"""Serving a user's own ``DataLoader`` from the activation cache of the frozen prefix.

The cache (``freeze_agent.core.prefix_cache``) needs, for each training forward, the dataset
rows of the batch. A user's loop only calls ``model(inputs)``. ``CachedLoader`` closes the gap
without changing the loop:

* it iterates a shallow copy of the user's ``DataLoader`` whose batch sampler records the indices
  of every batch it draws (``DataLoader`` yields batches in sampling order, with or without
  worker processes), so each batch comes with its rows;
* ``ForwardRouter`` replaces the model's ``forward`` while the loader is wrapped: the first
  training-mode forward with gradients enabled after a batch is yielded, and whose batch size is
  the batch's, goes through ``PrefixCache.forward`` with those rows; every other call
  (evaluation, ``torch.no_grad``, a second forward of the same batch) runs as it would.

The cache only serves when a sample always reaches the model as the same input. The wrapper
checks it once by collating a few samples twice (random augmentation or a random collate, such
as masked-language-model masking, shows up as a difference); ``deterministic=True`` or ``False``
overrides the check. Batches that change on their way to the model (noise added in the loop)
must be declared with ``deterministic=False``.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, IterableDataset

from freeze_agent.core.prefix_cache import PrefixCache
from freeze_agent.core.random_state import preserved_global_rngs
from freeze_agent.core.units import ModelInput, batch_size_of

_PROBE_SAMPLES = 4


class RecordingBatchSampler:
    """Yields the batches of ``batch_sampler`` and appends each to ``drawn``; any other
    attribute is the wrapped sampler's (a framework's loader may read them)."""

    def __init__(self, batch_sampler: Iterable[list[int]], drawn: deque[list[int]]) -> None:
        self.batch_sampler = batch_sampler
        self.drawn = drawn

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            self.drawn.append(list(batch))
            yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "batch_sampler":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)


def why_not_cacheable(loader: Any, deterministic: bool | None) -> str | None:
    """Why ``loader``'s batches cannot be served from the cache, or None when they can."""
    if not isinstance(loader, DataLoader):
        return (
            f"the loader is a {type(loader).__name__}, not a torch DataLoader (no sample indices)"
        )
    if isinstance(loader.dataset, IterableDataset):
        return "the dataset is iterable-style: its samples have no indices"
    if loader.batch_size is None:
        return "the DataLoader has no automatic batching (batch_size=None)"
    if deterministic is False:
        return "the data was declared non-deterministic (deterministic=False)"
    if deterministic is None and not _collates_identically(loader):
        return "random augmentation: collating the same samples twice gave different batches"
    return None


def _collates_identically(loader: DataLoader) -> bool:
    """Collate a few samples twice and compare, leaving every RNG as it was."""
    n = len(loader.dataset)  # type: ignore[arg-type]
    rows = sorted({0, n // 3, (2 * n) // 3, n - 1})[:_PROBE_SAMPLES]
    with preserved_global_rngs():
        first, second = (loader.collate_fn([loader.dataset[i] for i in rows]) for _ in "ab")
    return _equal(first, second)


def _equal(a: Any, b: Any) -> bool:
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
            if not np.array_equal(x, y):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


class ForwardRouter:
    """Routes the model's training forward of each wrapped batch through the cache.

    Installed by replacing ``model.forward`` with an instance attribute that wraps the original
    (``inspect.signature`` still sees the original's parameters, which the Hugging Face Trainer
    reads); ``remove`` puts it back.
    """

    def __init__(self, model: nn.Module, cache: PrefixCache) -> None:
        self.model = model
        self.cache = cache
        self.routed = 0
        self.passed = 0
        self._pending: torch.Tensor | None = None
        self._inside = False
        self._had_own_forward = "forward" in model.__dict__
        original = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            rows = self._pending
            if self._inside or rows is None or not (model.training and torch.is_grad_enabled()):
                return original(*args, **kwargs)
            self._pending = None  # one routed forward per batch
            inputs = _model_input(args, kwargs)
            if inputs is None or batch_size_of(inputs) != rows.numel():
                self.passed += 1
                return original(*args, **kwargs)
            self._inside = True
            try:
                self.routed += 1
                return self.cache.forward(inputs, rows)
            finally:
                self._inside = False

        forward.__wrapped__ = original  # type: ignore[attr-defined]
        self._original = original
        model.forward = forward

    def expect(self, rows: list[int] | None) -> None:
        """The next training forward is the batch of dataset ``rows`` (None: no batch)."""
        self._pending = None if rows is None else torch.tensor(rows, dtype=torch.long)

    def remove(self) -> None:
        if self._had_own_forward:
            self.model.forward = self._original
        else:
            del self.model.forward


def _model_input(args: tuple, kwargs: dict) -> ModelInput | None:
    """The call's arguments as ``call_model`` takes them; None for a mix of both kinds."""
    if args and kwargs:
        return None
    if kwargs:
        return kwargs
    if len(args) == 1 and isinstance(args[0], torch.Tensor):
        return args[0]
    return args


class CachedLoader:
    """Yields what ``loader`` yields; while ``router`` is set, each batch's training forward is
    served from the activation cache (see the module docstring). Build it with
    ``FreezeController.wrap_loader``."""

    def __init__(self, loader: Iterable, router: ForwardRouter | None, reason_off: str | None):
        self.loader = loader
        self.router = router
        self.reason_off = reason_off
        self._drawn: deque[list[int]] = deque()
        self._recording = loader
        if router is not None:
            recording = copy.copy(loader)
            # DataLoader forbids setting batch_sampler after construction; this copy is ours
            object.__setattr__(
                recording,
                "batch_sampler",
                RecordingBatchSampler(loader.batch_sampler, self._drawn),
            )
            object.__setattr__(recording, "_iterator", None)
            self._recording = recording

    def __iter__(self) -> Iterator[Any]:
        if self.router is None:
            yield from self.loader
            return
        self._drawn.clear()
        try:
            for batch in self._recording:
                self.router.expect(self._drawn.popleft())
                yield batch
        finally:
            self.router.expect(None)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # dataset, batch_size, sampler...: what the user's code may read off its loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)
