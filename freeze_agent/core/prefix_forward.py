"""Running a model only up to a unit boundary, or with the units before a boundary skipped.

This works for any model (not only ``nn.Sequential``): while a call runs, the ``forward`` of the
prefix units' top modules is replaced. The exit module of unit k-1 returns the given activation
(a tensor, or a tuple / ``ModelOutput`` for blocks that return one); every other prefix module
returns a cheap stand-in, its first input when that has the shape the module's real output had,
else zeros in the structure of that output (so parent-level code between prefix modules, such as
``x.flatten(2) + pos`` or ``layer(x)[0]``, still runs). That code runs on stand-ins, which could
change the result for exotic models; ``freeze_agent.core.cache_verification`` checks it once
per boundary.

A prefix-only pass ends the forward with a hook right after the boundary module, so nothing beyond
the cut runs; it may itself skip the units before a shallower boundary whose activation is known
(so only the newly frozen units run). ``take_rows`` picks the rows of a model input such a pass
needs. ``PrefixCache`` (``freeze_agent.core.prefix_cache``) runs every cached batch through here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from freeze_agent.core.activation_layout import ActivationLayout
from freeze_agent.core.units import ModelInput, Unit, batch_size_of, call_model, tensors_in

_MISSING = object()


class PrefixRunner:
    """Runs ``model``, partitioned into ``units``, up to a unit boundary or from one on.

    Prefix modules' forwards are replaced only while a call runs. The runner remembers what it
    needs across calls: each prefix module's per-sample output shape (seen in prefix-only passes,
    for the stand-ins) and the stand-ins' zero buffers.
    """

    def __init__(self, model: nn.Module, units: Sequence[Unit]) -> None:
        self.model = model
        self.units = list(units)
        self._out_layout: dict[nn.Module, ActivationLayout | None] = {}
        # outputs with no batch dimension (a position table, a relative-position bias): their
        # zeros, whole, for the stand-ins
        self._shared_out: dict[nn.Module, Any] = {}
        self._zeros: dict[tuple[nn.Module, int], Any] = {}

    def run_to_boundary(
        self,
        inputs: ModelInput,
        depth: int,
        device: torch.device,
        *,
        start: int = 0,
        cached: Any = None,
    ) -> Any:
        """The output of unit ``depth - 1`` for ``inputs``: the forward stops right after it
        (nothing beyond the cut runs). Also records each prefix module's output shape, for the
        stand-ins.

        Args:
            inputs: the model input of the batch.
            depth: the boundary: units 0..depth-1 run (or are skipped, see ``start``).
            device: where the stand-ins' zeros go.
            start: units 0..start-1 are skipped, with ``cached`` as their output.
            cached: the boundary output of unit ``start - 1`` for the batch, in the structure
                its exit module returns (needed when ``start`` > 0).

        Returns:
            The exit module's output as it is (the caller checks it can be stored), or a
            string saying why there is none.
        """
        batch = batch_size_of(inputs)
        record = functools.partial(self._record_layout, batch)
        handles = [
            m.register_forward_hook(record, with_kwargs=True)
            for unit in self.units[start:depth]
            for m in unit.modules
            if m not in self._out_layout
        ]
        handles.append(self.units[depth - 1].exit_module.register_forward_hook(_stop_forward))
        try:
            with self._skipping(start, cached, device, batch_size_of(inputs)):
                call_model(self.model, inputs)
        except _BoundaryReached as reached:
            return reached.output
        finally:
            for handle in handles:
                handle.remove()
        return f"unit {depth - 1}'s exit module did not run"

    def run_skipping(
        self, inputs: ModelInput, depth: int, cached: Any, device: torch.device
    ) -> Any:
        """The model's output with units 0..depth-1 skipped and ``cached`` (the boundary output
        for the batch, in its exit module's structure) as their output; stand-in zeros go to
        ``device``."""
        with self._skipping(depth, cached, device, batch_size_of(inputs)):
            return call_model(self.model, inputs)

    def release(self) -> None:
        """Drop the stand-ins' zero buffers."""
        self._zeros.clear()

    def _record_layout(
        self, batch: int, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> None:
        """Remember the layout of a prefix module's output for a model batch of ``batch``
        samples (None: it holds no batch tensor; then zeros of the whole output, when it holds
        a tensor, for the stand-in). The batch is the model's, not the first dimension of the
        module's first input: MPNet's relative-position bias reads a (T, T) bucket table and
        Whisper's position table a (T,) range, and a stand-in shaped (batch, ...) broke the
        parent code that reads them."""
        if module in self._out_layout:
            return
        layout = ActivationLayout.of(output, batch)
        self._out_layout[module] = layout if isinstance(layout, ActivationLayout) else None
        if not isinstance(layout, ActivationLayout) and any(True for _ in tensors_in(output)):
            self._shared_out[module] = pytree.tree_map_only(
                torch.Tensor, lambda t: torch.zeros_like(t.detach()), output
            )

    @contextlib.contextmanager
    def _skipping(
        self, depth: int, cached: Any, device: torch.device, batch: int
    ) -> Iterator[None]:
        """Replace the forwards of units 0..depth-1's top modules with stand-ins, the exit
        module of unit depth-1 returning ``cached`` (depth 0: nothing is replaced)."""
        if depth == 0:
            yield
            return
        assert cached is not None
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
        first input if that is shaped like the real output was, else zeros in the real output's
        structure (one buffer per module and batch size, reused: allocating it every step costs
        more than the rest of a small skip)."""
        layout = self._out_layout.get(module)
        shared = self._shared_out.get(module)
        like = None  # (dtype, shape) of a single-tensor output, which the input may stand in for
        if layout is not None and layout.single_tensor:
            leaf = layout.leaf(0)
            like = (leaf.dtype, (batch, *leaf.shape))

        def forward(*args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else next(iter(kwargs.values()), None)
            if layout is None:
                return first if shared is None else shared
            is_tensor = isinstance(first, torch.Tensor)
            if like is not None and is_tensor and (first.dtype, first.shape) == like:
                return first
            zeros = self._zeros.get((module, batch))
            if zeros is None:
                zeros = self._zeros[module, batch] = layout.zeros(batch, device)
            return zeros

        return forward


class _BoundaryReached(BaseException):
    """Raised by a hook right after the boundary module to end a prefix-only forward (a
    BaseException, so that a model's own ``except Exception`` does not swallow it)."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output


def _stop_forward(_module: nn.Module, _args: Any, output: Any) -> None:
    raise _BoundaryReached(output)


def take_rows(value: Any, positions: torch.Tensor, batch: int) -> Any:
    """``value`` (a model input) with only the rows ``positions`` of every batch tensor."""
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == batch:
            return value[positions.to(value.device)]
        return value
    if isinstance(value, Mapping):
        return {k: take_rows(v, positions, batch) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(v, positions, batch) for v in value)
    return value
