"""One stored row per sample for a boundary output of any structure: a tensor, a tuple, a
``ModelOutput``.

Transformer blocks often return more than a tensor: a tuple ``(hidden_states,)``, a tuple with
``None`` where attention weights would be, a T5 block's ``(hidden_states, position_bias)``, a
``ModelOutput``. ``ActivationLayout`` flattens such an output with ``torch.utils._pytree`` (which
knows tuples, lists, dicts and, once transformers is imported, every ``ModelOutput``) and sorts
its leaves in two kinds:

* *per-sample* leaves, tensors whose first dimension is the batch: they are packed, as raw bytes,
  into one ``uint8`` row per sample, which is what ``ActivationStore`` keeps;
* *constant* leaves, everything else (``None``, numbers, tensors without the batch dimension such
  as a broadcast ``(1, heads, T, T)`` position bias): kept once, in the layout. A batch whose
  constant leaves differ from the layout's cannot be served from the store, and ``matches`` says
  how.

A boundary that is a single tensor keeps its own dtype and shape in the store (no packing), as the
common case costs nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class _Leaf:
    shape: torch.Size  # per sample
    dtype: torch.dtype
    nbytes: int  # per sample


class ActivationLayout:
    """How one boundary's output maps to a stored row per sample, and back.

    Build it with ``ActivationLayout.of(output, batch)`` from the first output seen.
    """

    def __init__(
        self, spec: pytree.TreeSpec, leaves: list[_Leaf | None], constants: list[Any]
    ) -> None:
        self._spec = spec
        self._leaves = leaves  # None where the leaf is a constant
        self._constants = constants  # the constant leaves, in order
        self.single_tensor = spec.is_leaf() and leaves[0] is not None

    @classmethod
    def of(cls, output: Any, batch: int) -> ActivationLayout | str:
        """The layout of ``output`` for a batch of ``batch`` samples, or why it cannot be
        stored (no per-sample tensor in it)."""
        values, spec = pytree.tree_flatten(output)
        leaves: list[_Leaf | None] = []
        constants = []
        for value in values:
            if _per_sample(value, batch):
                row = value[0]
                leaves.append(_Leaf(row.shape, value.dtype, row.numel() * value.element_size()))
            else:
                leaves.append(None)
                constants.append(_detached(value))
        if not any(leaf is not None for leaf in leaves):
            return f"its output ({type(output).__name__}) holds no tensor with the batch first"
        return cls(spec, leaves, constants)

    def leaf(self, i: int) -> _Leaf:
        """The ``i``-th per-sample leaf (a single-tensor layout has only leaf 0)."""
        return [leaf for leaf in self._leaves if leaf is not None][i]

    def zeros(self, batch: int, device: torch.device) -> Any:
        """An output of this layout for ``batch`` samples with every per-sample leaf zero."""
        if self.single_tensor:
            leaf = self._leaves[0]
            return torch.zeros((batch, *leaf.shape), dtype=leaf.dtype, device=device)
        return self.unpack(
            torch.zeros(batch, self.bytes_per_sample, dtype=torch.uint8, device=device)
        )

    @property
    def bytes_per_sample(self) -> int:
        return sum(leaf.nbytes for leaf in self._leaves if leaf is not None)

    def matches(self, output: Any, batch: int) -> str | None:
        """None when ``output`` has this layout (same structure, per-sample shapes and dtypes,
        equal constants), else how it differs."""
        values, spec = pytree.tree_flatten(output)
        if spec != self._spec:
            return "its output's structure changed between batches"
        constants = iter(self._constants)
        for value, leaf in zip(values, self._leaves, strict=True):
            if leaf is None:
                if not _same(value, next(constants)):
                    return "a part of its output that is not per sample changed between batches"
            elif not _per_sample(value, batch) or (value.shape[1:], value.dtype) != (
                leaf.shape,
                leaf.dtype,
            ):
                return "the shape or dtype of its output changed between batches"
        return None

    def pack(self, output: Any) -> torch.Tensor:
        """The per-sample rows of ``output``: the tensor itself for a single-tensor layout, else
        a ``(batch, bytes_per_sample)`` uint8 tensor of every per-sample leaf's bytes."""
        if self.single_tensor:
            return output
        values = pytree.tree_leaves(output)
        parts = [
            value.detach().contiguous().reshape(value.shape[0], -1).view(torch.uint8)
            for value, leaf in zip(values, self._leaves, strict=True)
            if leaf is not None
        ]
        return torch.cat(parts, dim=1)

    def unpack(self, rows: torch.Tensor) -> Any:
        """The output structure back from ``pack``'s rows (on the rows' device)."""
        if self.single_tensor:
            return rows
        batch, offset = rows.shape[0], 0
        constants = iter(self._constants)
        values = []
        for leaf in self._leaves:
            if leaf is None:
                values.append(_on(next(constants), rows.device))
                continue
            chunk = rows[:, offset : offset + leaf.nbytes]
            offset += leaf.nbytes
            values.append(chunk.contiguous().view(leaf.dtype).reshape(batch, *leaf.shape))
        return pytree.tree_unflatten(values, self._spec)


def _per_sample(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _on(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.detach().to(b.device), b)
        )
    return a is b or a == b
