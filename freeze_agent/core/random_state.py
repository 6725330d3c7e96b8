"""Running code that draws from the global random generators without disturbing anyone's stream."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


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
