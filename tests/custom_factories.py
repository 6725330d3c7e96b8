"""Model and dataset factories that the tests' task specs name by import path
(``"custom_factories:blobs"``): working ones, as a user would write them, and ones broken in
each way the spec loader must report clearly."""

from __future__ import annotations

import dataclasses
import math
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from freeze_agent.tasks.data import Dataset, DatasetUnavailableError, Split

CALLS: list[dict[str, Any]] = []  # the arguments every tiny_net call received, for the tests
NOT_CALLABLE = 42


def blobs(*, rows: int = 320, features: int = 8, classes: int = 3, spread: float = 0.5) -> Dataset:
    """Gaussian blobs, one per class, as one-channel signals (1, features), split 60/20/20.

    Drawn from torch's global generator, which the task seeds with its ``split_seed``.
    """
    centers = 2.0 * torch.randn(classes, features)
    labels = torch.randint(0, classes, (rows,))
    inputs = (centers[labels] + spread * torch.randn(rows, features))[:, None, :]
    cuts = [0, rows * 6 // 10, rows * 8 // 10, rows]
    train, val, test = (Split(inputs[a:b], labels[a:b]) for a, b in pairwise(cuts))
    return Dataset(
        name="blobs",
        train=train,
        val=val,
        test=test,
        task_type="classification",
        num_classes=classes,
        input_shape=(1, features),
        info={"source": "custom_factories.blobs"},
    )


class TinyNet(nn.Module):
    """A stem, a ``ModuleList`` of blocks and a head with its own forward: not a ``ChainModel``,
    so the partitioner's general path is what finds its units."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int, depth: int):
        super().__init__()
        self.stem = nn.Linear(math.prod(input_shape), width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x.flatten(1)))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny_net(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    vocab_size: int | None = None,
    width: int = 16,
    depth: int = 3,
) -> nn.Module:
    """A ``TinyNet`` for the dataset's shape facts; records what it was given in ``CALLS``."""
    CALLS.append(
        {
            "input_shape": input_shape,
            "num_classes": num_classes,
            "vocab_size": vocab_size,
            "width": width,
            "depth": depth,
        }
    )
    return TinyNet(input_shape, num_classes, width, depth)


# ------------------------------------------------------------------ broken on purpose


def strict_net(*, width: int) -> nn.Module:
    """Takes none of the dataset facts a model factory is given."""
    return nn.Linear(width, width)


def raising(**_: Any) -> Any:
    raise RuntimeError("the factory broke on purpose")


def returns_dict(**_: Any) -> dict:
    return {"model": None}


def frozen_net(*, input_shape, num_classes, vocab_size=None) -> nn.Module:
    """A model without a parameter left to train."""
    return nn.Linear(input_shape[-1], num_classes).requires_grad_(False)


def needs_package(**_: Any) -> Any:
    """Imports an optional package that this machine lacks, as ``minilm`` may."""
    import a_package_that_is_not_installed  # noqa: F401

    return None


def missing_data(**_: Any) -> Dataset:
    raise DatasetUnavailableError("the blob files are not installed; run: apt-get install blobs")


def flawed_blobs(*, flaw: str) -> Any:
    """``blobs()`` broken in one way, named by ``flaw``."""
    good = blobs()
    val, test = good.val, good.test
    flaws = {
        "not_a_dataset": lambda: (good.train, val, test),
        "missing_split": lambda: dataclasses.replace(good, val=None),
        "numpy_inputs": lambda: dataclasses.replace(
            good, test=Split(test.inputs.numpy(), test.targets)
        ),
        "float_targets": lambda: dataclasses.replace(
            good, val=Split(val.inputs, val.targets.float())
        ),
        "labels_out_of_range": lambda: dataclasses.replace(
            good, val=Split(val.inputs, val.targets + good.num_classes)
        ),
        "input_shape": lambda: dataclasses.replace(good, input_shape=(2, 4)),
        "empty_test": lambda: dataclasses.replace(
            good, test=Split(test.inputs[:0], test.targets[:0])
        ),
        "dtype_mismatch": lambda: dataclasses.replace(
            good, val=Split(val.inputs.double(), val.targets)
        ),
        "task_type": lambda: dataclasses.replace(good, task_type="regression"),
        "rows": lambda: Split(val.inputs, val.targets[:-1]),  # Split refuses it
        "small_train": lambda: dataclasses.replace(
            good, train=Split(good.train.inputs[:8], good.train.targets[:8])
        ),
    }
    return flaws[flaw]()
