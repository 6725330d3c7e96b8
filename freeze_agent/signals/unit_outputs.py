"""Each unit's output on a probe batch: the exit-module path of each unit and one eval-mode,
no-grad forward that captures every exit module's output, flattened to (batch, features).

Both sides of the reference model call ``unit_outputs``: the training side on its own
model (``freeze_agent.signals.plasticity``) and the reference worker's child process on the
dequantized snapshot (``freeze_agent.signals.reference_child``), so both compute identically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from freeze_agent.core.random_state import forked_torch_rngs
from freeze_agent.core.units import ModelInput, Unit, batch_size_of, call_model

__all__ = ["exit_module_paths", "map_tensors", "unit_outputs"]


def exit_module_paths(model: nn.Module, units: Sequence[Unit]) -> list[str]:
    """The qualified module path of each unit's exit module ("" for the root), the form
    ``freeze_agent.signals.reference.ReferenceWorker`` and ``unit_outputs`` take."""
    names = {id(module): name for name, module in model.named_modules()}
    try:
        return [names[id(unit.exit_module)] for unit in units]
    except KeyError:
        raise ValueError("a unit's exit module is not a sub-module of this model") from None


def unit_outputs(
    model: nn.Module, unit_module_paths: Sequence[str], probe_inputs: ModelInput
) -> list[torch.Tensor]:
    """Each unit's exit-module output on ``probe_inputs``, flattened to (batch, features), as
    float32 CPU tensors.

    The model runs once in eval mode under ``no_grad``; its train/eval flags and the RNG state are
    restored afterwards, so calling this in the middle of training changes nothing. Tensor
    inputs are moved to the model's device. A module output that is a tuple, list or dict
    contributes its first tensor; a module that runs more than once contributes its last call.
    """
    modules = dict(model.named_modules())
    unknown = [path for path in unit_module_paths if path not in modules]
    if unknown:
        raise KeyError(f"no module at path(s) {unknown} in {type(model).__name__}")
    captured: dict[int, torch.Tensor] = {}

    def make_hook(i: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                captured[i] = tensor.detach()

        return hook

    device = _device_of(model)
    inputs = map_tensors(probe_inputs, lambda t: t.to(device))
    batch = batch_size_of(inputs)
    handles = [
        modules[path].register_forward_hook(make_hook(i))
        for i, path in enumerate(unit_module_paths)
    ]
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with forked_torch_rngs(model), torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in training.items():
            m.training = flag
    missing = [p for i, p in enumerate(unit_module_paths) if i not in captured]
    if missing:
        raise RuntimeError(f"module(s) {missing} produced no tensor output on the probe batch")
    return [_flatten(captured[i], batch) for i in range(len(unit_module_paths))]


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value
    if isinstance(value, (Mapping, tuple, list)):
        for item in items:
            tensor = _first_tensor(item)
            if tensor is not None:
                return tensor
    return None


def _flatten(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, features) float32 on the CPU; the batch axis is the first axis of size ``batch``."""
    out = tensor.detach().to("cpu", torch.float32)
    if out.dim() == 0:
        return out.reshape(1, 1)
    if out.shape[0] != batch and batch in out.shape:
        out = out.movedim(list(out.shape).index(batch), 0)
    rows = batch if out.shape[0] == batch else 1
    return out.reshape(rows, -1).contiguous()


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def map_tensors(value: Any, fn) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, through tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    return value
