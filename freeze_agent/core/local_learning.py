"""LoCal+SGD's localized learning rule (Frontiers in Neuroscience 2022). A reconstruction: the
paper describes the rule's shape (one forward GEMM, Hebbian, weakly supervised), not its exact
form.

A LOCAL unit learns during its forward pass: for every conv or linear layer in it,

    ΔW = η · Yᵀ X / rows

the weight-gradient GEMM with the layer's output Y in place of the error (for convolutions the
same product through the convolution's weight-gradient), after which each output row of W is
rescaled to its previous norm so that the Hebbian update cannot blow the weights up. One GEMM per
layer, no backward through the unit; the unit's output is detached.

*Weak supervision*: the local learning rate is scaled by the trend of the overall training loss,
kept while the loss falls and cut when it rises.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from freeze_agent.core.units import Unit

_CONV_WEIGHT_GRAD = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


def hebbian_update(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
    """Apply the local rule to ``layer`` in place, given its input ``x`` and output ``y``."""
    weight = layer.weight
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            delta = y2.t().to(weight.dtype) @ x2.to(weight.dtype) / x2.shape[0]
        else:
            delta = _conv_hebbian(layer, x, y) / x.shape[0]
        norms = weight.flatten(1).norm(dim=1)
        weight.add_(delta, alpha=lr)
        scale = norms / weight.flatten(1).norm(dim=1).clamp_min(1e-12)
        weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))


def _conv_hebbian(conv: nn.modules.conv._ConvNd, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dims = conv.weight.dim() - 2
    padding = conv.padding
    if padding == "valid":
        padding = 0
    elif padding == "same":
        padding = tuple(
            d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size, strict=True)
        )
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"the local rule supports zero-padded convolutions, not {conv.padding_mode!r}"
        )
    return _CONV_WEIGHT_GRAD[dims](
        x, conv.weight.shape, y, conv.stride, padding, conv.dilation, conv.groups
    )


class LocalLearning:
    """Puts units into LOCAL mode: hooks that update their weights in the forward pass and
    detach their output. ``lr`` is set by the controller before each iteration."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self._handles: dict[int, list[RemovableHandle]] = {}

    def attach(self, unit: Unit) -> None:
        if not unit.supports_local:
            raise ValueError(f"unit {unit.index} ({unit.name}) cannot be trained by the local rule")
        handles = [
            layer.register_forward_hook(self._update_hook)
            for module in unit.modules
            for layer in module.modules()
            if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd))
        ]
        handles.append(unit.exit_module.register_forward_hook(_detach_output))
        self._handles[unit.index] = handles

    def detach(self, unit: Unit) -> None:
        for handle in self._handles.pop(unit.index, []):
            handle.remove()

    def _update_hook(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if layer.training and self.lr > 0:
            hebbian_update(layer, args[0], output, self.lr)


def _detach_output(_module: nn.Module, _args: tuple, output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return type(output)(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
    return output


class WeakSupervision:
    """Scale for the local learning rate from the training-loss trend.

    Losses are averaged over windows of ``window`` steps; when a window's mean is above the
    previous window's, the scale is multiplied by ``cut`` (kept otherwise).
    """

    def __init__(self, window: int = 20, cut: float = 0.5, floor: float = 1e-3) -> None:
        if window < 1 or not 0 < cut < 1:
            raise ValueError("window must be >= 1 and cut in (0, 1)")
        self.window, self.cut, self.floor = window, cut, floor
        self.scale = 1.0
        self._current: deque[float] = deque()
        self._previous_mean: float | None = None

    def update(self, loss: float) -> float:
        self._current.append(float(loss))
        if len(self._current) == self.window:
            mean = sum(self._current) / self.window
            if self._previous_mean is not None and mean > self._previous_mean:
                self.scale = max(self.scale * self.cut, self.floor)
            self._previous_mean = mean
            self._current.clear()
        return self.scale

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "current": list(self._current),
            "previous": self._previous_mean,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale, self._previous_mean = state["scale"], state["previous"]
        self._current = deque(state["current"])
