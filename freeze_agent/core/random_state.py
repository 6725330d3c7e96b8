"""Running code that draws from the global random generators without disturbing anyone's stream."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def preserved_global_rngs() -> Iterator[None]:
    """Put Python's, NumPy's and torch's global CPU generators back as they were on the way out."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def forked_torch_rngs(module: nn.Module | None = None) -> Iterator[None]:
    """Put torch's CPU generator back on the way out, and the generator of every CUDA device
    ``module``'s tensors live on: dropout in a probe forward on the GPU draws from the device's
    own generator, which the CPU's alone would leave advanced."""
    devices: set[int] = set()
    if module is not None:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "cuda":
                devices.add(tensor.device.index or 0)
    with torch.random.fork_rng(devices=sorted(devices)):
        yield
