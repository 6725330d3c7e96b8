"""What crosses the pipes between the training process and the reference worker's child: tensors
as plain bytes (``to_wire``, ``from_wire``) and the model's architecture pickled without
the hooks the training process added (``architecture_bytes``).

Transport: snapshots and results travel as plain bytes through pipes, not as torch shared-memory
tensors, so a small ``/dev/shm`` (containers) cannot break the worker and a killed child leaks no
shared segments.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from freeze_agent.signals.unit_outputs import map_tensors

__all__ = ["architecture_bytes", "from_wire", "restore_parametrizations", "to_wire"]

_PARAMETRIZATIONS = "_freeze_agent_parametrizations"

_HOOK_ATTRIBUTES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


@dataclass(frozen=True)
class _WireTensor:
    """A tensor as raw bytes: pickles as plain bytes, never as a torch shared-memory handle."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _WireTensor:
        t = tensor.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        return cls(str(t.dtype).removeprefix("torch."), tuple(t.shape), raw)

    def tensor(self) -> torch.Tensor:
        raw = torch.from_numpy(np.ascontiguousarray(self.data))
        return raw.view(getattr(torch, self.dtype)).reshape(self.shape)


def to_wire(value: Any) -> Any:
    """``value`` with every tensor in it (through tuples, lists and dicts) as raw bytes."""
    return map_tensors(value, _WireTensor.of)


def from_wire(value: Any) -> Any:
    """The inverse of ``to_wire``: every raw-bytes tensor in ``value`` as a tensor again."""
    if isinstance(value, _WireTensor):
        return value.tensor()
    if isinstance(value, Mapping):
        return {k: from_wire(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(from_wire(v) for v in value)
    if isinstance(value, list):
        return [from_wire(v) for v in value]
    return value


@contextlib.contextmanager
def _foreign_hooks_removed(model: nn.Module) -> Iterator[None]:
    """Hide hooks not defined by torch itself (a controller's, a profiler's) while the model is
    pickled: they belong to the training process, and pickling a bound method would drag its
    whole owner along. Torch's own (weight norm, spectral norm) are part of the architecture."""
    # Filtered in place: a hook's RemovableHandle holds a reference to this very dict, and a
    # model may keep the handle as an attribute (transformers' ``enable_input_require_grads``,
    # called by ``gradient_checkpointing_enable``), so the handle pickles the dict with it.
    saved: list[tuple[OrderedDict, list[tuple[Any, Any]]]] = []
    for module in model.modules():
        for attr in _HOOK_ATTRIBUTES:
            hooks = module.__dict__.get(attr)
            if not hooks:
                continue
            items = list(hooks.items())
            kept = [(k, h) for k, h in items if _is_torch_hook(h)]
            if len(kept) != len(items):
                saved.append((hooks, items))
                hooks.clear()
                hooks.update(kept)
    try:
        yield
    finally:
        for hooks, items in saved:
            hooks.clear()
            hooks.update(items)


def _is_torch_hook(hook: Any) -> bool:
    owner = getattr(hook, "__module__", None) or type(hook).__module__
    return isinstance(owner, str) and owner.split(".")[0] == "torch"


@contextlib.contextmanager
def _parametrizations_unrolled(model: nn.Module) -> Iterator[None]:
    """Torch refuses to pickle a module with parametrizations (``torch.nn.utils.parametrizations
    .weight_norm``: Wav2Vec2's and HuBERT's positional conv). While the model is pickled, each
    such module is swapped for a plain one of its own class holding the parametrized tensors'
    current values and the parametrizations themselves; ``restore_parametrizations`` puts them
    back in the child, so the state dict keys (``parametrizations.weight.original0``...) match
    the snapshots'. The training model's module is never modified (parametrize gives each
    parametrized module a class of its own, which a deep copy would share)."""
    swaps = []
    for name, module in list(model.named_modules()):
        if not name or not parametrize.is_parametrized(module):
            continue
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        own_class = type(module).__bases__[0]  # parametrize derived its class from this one
        plain = own_class.__new__(own_class)
        plain.__dict__.update(module.__dict__)
        plain._parameters = dict(module._parameters)
        plain._modules = {k: m for k, m in module._modules.items() if k != "parametrizations"}
        for hooks in _HOOK_ATTRIBUTES:  # weight_norm's state-dict compat hook is a closure
            kept = [(k, h) for k, h in module.__dict__.get(hooks, {}).items() if _picklable(h)]
            plain.__dict__[hooks] = OrderedDict(kept)
        entries = []
        for tensor, plist in module.parametrizations.items():
            with torch.no_grad():
                plain._parameters[tensor] = nn.Parameter(getattr(module, tensor).detach())
            entries.append((tensor, list(plist)))
        plain.__dict__[_PARAMETRIZATIONS] = entries
        swaps.append((owner, attr, module))
        setattr(owner, attr, plain)
    try:
        yield
    finally:
        for owner, attr, module in reversed(swaps):
            setattr(owner, attr, module)


def _picklable(hook: Any) -> bool:
    return "<locals>" not in getattr(hook, "__qualname__", "")


def restore_parametrizations(model: nn.Module) -> nn.Module:
    """The inverse of the swap in ``architecture_bytes``, on the unpickled model."""
    for module in model.modules():
        for tensor, parametrizations in module.__dict__.pop(_PARAMETRIZATIONS, []):
            for p in parametrizations:
                parametrize.register_parametrization(module, tensor, p)
    return model


def architecture_bytes(model: nn.Module) -> bytes:
    """The model pickled with ``torch.save``: tensors are copied to the CPU one at a time (no
    second copy of the model on the accelerator), the child loads with ``map_location='cpu'``."""
    buffer = io.BytesIO()
    with (
        _foreign_hooks_removed(model),
        _parametrizations_unrolled(model),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # "backward hooks will not be serialized"
        torch.save(model, buffer)
    return buffer.getvalue()
