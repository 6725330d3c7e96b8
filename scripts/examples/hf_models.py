"""Hugging Face `transformers` models as freeze-agent task factories, so that a task spec can
train, bench or measure the signal overhead on them (`tasks/vit-digits.yaml`):

    PYTHONPATH=scripts/examples freeze-agent overhead scripts/examples/tasks/vit-digits.yaml

A task's model is called as `model(x)` and must return logits; a `transformers` classifier takes
`pixel_values=` and returns a `ModelOutput`, so `Logits` adapts one to the other.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

transformers.logging.set_verbosity_error()


class Logits(nn.Module):
    """``model(pixel_values=x).logits`` as ``forward(x)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def vit(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden_size: int = 128,
    layers: int = 4,
    patch_size: int = 2,
    **_facts,
) -> nn.Module:
    """A transformers ViT (random init) for (channels, side, side) images."""
    channels, side = input_shape[0], input_shape[-1]
    config = transformers.ViTConfig(
        image_size=side,
        patch_size=patch_size,
        num_channels=channels,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        num_labels=num_classes,
    )
    return Logits(transformers.ViTForImageClassification(config))
