"""The reference model's int8 snapshot: per-output-channel symmetric int8 quantization of a
state dict (``quantize_state_dict``) and its inverse (``dequantize_state_dict``).

int8 kernels: the snapshot is stored as per-output-channel symmetric int8 and *dequantized in the
worker*, which then runs in float32. torchao 0.18 (the maintained int8 path; it imports against
torch 2.13 on the CPU without pulling another torch) was measured here: its int8 weight-only
linear was no faster than float32 on the CPU, its dynamic int8 activation path was ~10× slower,
and it has no int8 convolution at all. Dequantizing keeps int8's numerics (what the reference
model is about: a slightly perturbed, cheaply stored snapshot) and its 4× smaller transfer, at
float32 speed, with no extra dependency.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["SCALE_SUFFIX", "dequantize_state_dict", "quantize_state_dict"]

SCALE_SUFFIX = ".scale"
_QUANTIZED_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag)


def quantize_state_dict(model: nn.Module) -> dict[str, Any]:
    """An int8 snapshot of ``model``'s state dict, as independent CPU tensors.

    The weights of conv, linear and embedding modules become symmetric int8 with one float32
    scale per row of their first axis (the output channel of a conv or linear layer, the token
    of an embedding): ``{name: int8 tensor, name + ".scale": float32 scale}``, with
    ``weight ≈ int8 · scale``. Every other entry (biases, norm parameters and statistics, other
    weights) is kept unquantized. Quantization runs on the weights' own device, so only int8
    crosses to the CPU. The result is a copy: safe to keep while training goes on.
    """
    state = model.state_dict(keep_vars=False)
    quantized: set[str] = set()
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not isinstance(module, _QUANTIZED_TYPES):
            continue
        key = f"{name}.weight" if name else "weight"
        weight = state.get(key)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            continue  # e.g. a parametrized or uninitialized (lazy) weight
        if weight.dim() < 1 or weight.numel() == 0 or key in quantized:
            continue
        q, scale = _quantize_rows(weight.detach())
        out[key], out[key + SCALE_SUFFIX] = q, scale
        quantized.add(key)
    for key, value in state.items():
        if key in quantized:
            continue
        out[key] = value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
    return out


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = weight.reshape(weight.shape[0], -1).float()
    if rows.device.type == "cpu":
        # numpy is single-threaded: small torch ops on a busy multi-threaded CPU pool can stall
        # for milliseconds each (measured: 60x slower than this for the mnist1d CNN)
        r = rows.numpy()
        scale = np.abs(r).max(axis=1) / np.float32(127.0)
        scale[scale == 0] = 1.0
        q = np.rint(r / scale[:, None]).clip(-127, 127).astype(np.int8)
        return torch.from_numpy(q).reshape(weight.shape), torch.from_numpy(scale)
    scale = rows.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (rows / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.reshape(weight.shape).cpu(), scale.cpu()


def dequantize_state_dict(q: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The float state dict of an int8 snapshot from ``quantize_state_dict``: each int8
    entry with a ``.scale`` companion becomes float32 ``int8 · scale``; the rest is passed on."""

    def is_int8(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.dtype == torch.int8

    out: dict[str, Any] = {}
    for key, value in q.items():
        if key.endswith(SCALE_SUFFIX) and is_int8(q.get(key[: -len(SCALE_SUFFIX)])):
            continue  # consumed with its weight
        scale = q.get(key + SCALE_SUFFIX)
        if is_int8(value) and scale is not None:
            rows = value.reshape(value.shape[0], -1).float() * scale.float()[:, None]
            out[key] = rows.reshape(value.shape)
        else:
            out[key] = value
    return out
