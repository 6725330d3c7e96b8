"""How far a unit's output has moved: Egeria's similarity-preserving (SP) loss and the slope of
its recent values (pure maths on tensors and floats).

Egeria (EuroSys 2023) compares a layer's output in the training model with its output in a
quantized snapshot taken a little earlier (``freeze_agent.signals.reference``); the SP loss
between the two (``sp_loss``) shrinks as the layer stops moving, and the least-squares
``slope`` of the last few values tells when it has flattened out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["gram_distance", "normalized_gram", "slope", "sp_loss"]


def sp_loss(a: torch.Tensor, b: torch.Tensor) -> float:
    """Egeria's similarity-preserving loss between two activations of the same probe batch.

    Both are flattened to (batch, features) (the feature counts may differ). With
    G(X) = row-normalize(X Xᵀ) (each row of the batch Gram matrix scaled to unit L2 norm), the
    loss is ‖G(A) − G(B)‖²_F / batch². It compares how the batch's samples relate to each other,
    so it is invariant to a global scale of either side and to any rotation of the features.
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a.shape[0]} vs {b.shape[0]}")
    if a.shape[0] == 0:
        return 0.0
    return gram_distance(normalized_gram(a), normalized_gram(b))


def normalized_gram(x: torch.Tensor) -> torch.Tensor:
    """G(X) of ``sp_loss``, float64 on the CPU. For a side that is compared many times (the
    reference outputs), compute it once and compare with ``gram_distance``."""
    # float64: the Gram matrix is small (batch²) and sums over many features
    flat = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    gram = flat @ flat.T
    return gram / gram.norm(dim=1, keepdim=True).clamp_min(1e-12)


def gram_distance(ga: torch.Tensor, gb: torch.Tensor) -> float:
    """``sp_loss`` from two ``normalized_gram`` results: ‖G(A) − G(B)‖²_F / batch²."""
    if ga.shape != gb.shape:
        raise ValueError(f"batch sizes differ: {ga.shape[0]} vs {gb.shape[0]}")
    n = ga.shape[0]
    return float(((ga - gb) ** 2).sum() / (n * n)) if n else 0.0


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against their index 0..n-1 (0.0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    y = np.asarray(values, dtype=np.float64)
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    return float((x * (y - y.mean())).sum() / (x * x).sum())
