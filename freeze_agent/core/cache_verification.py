"""The one-time check that skipping a cached prefix leaves the model's output unchanged.

Skipping the prefix runs the parent-level code between prefix modules on stand-ins (see
``freeze_agent.core.prefix_forward``), which could change the result for exotic models. So the
first time a boundary is used, ``verify_skip`` runs one batch both ways (RNG, parameters and
buffers restored in between) and compares the outputs, within a tolerance per dtype.
``preserved_rng`` also keeps the prefix-only passes that fill a store from using up the training
run's random numbers (torch's, NumPy's and Python's: Wav2Vec2's SpecAugment masks come from
NumPy), and says whether they drew any: a prefix that does holds randomness outside its frozen
units (dropout in parent code, LayerDrop, masking), so its output differs every epoch.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from freeze_agent.core.units import ModelInput, call_model, tensors_in

# (rtol, atol) of the one-time check that skipping the prefix leaves the output unchanged; loose
# enough for the float noise of a different batch composition, tight enough to catch real changes.
_TOLERANCE = {torch.float16: (1e-2, 1e-3), torch.bfloat16: (5e-2, 1e-2)}
_DEFAULT_TOLERANCE = (1e-4, 1e-5)


def verify_skip(
    model: nn.Module, inputs: ModelInput, run_skipped: Callable[[], Any], device: torch.device
) -> tuple[Any, str | None]:
    """Run the batch skipping the prefix (without gradients), put back the RNG, parameters
    and buffers it changed, then run it normally and compare the two.

    Args:
        model: the model; ``inputs`` go to it as ``call_model`` sends them.
        inputs: the model input of the batch.
        run_skipped: runs the batch with the prefix skipped and returns the model's output.
        device: the model's device (whose CUDA RNG is restored too).

    Returns:
        The normal forward's output (the last thing run, so nothing touches its autograd graph
        afterwards) and how skipping changed it, or None when it did not.
    """
    tensors = [*model.parameters(), *model.buffers()]
    before = [t.detach().clone() for t in tensors]
    skipped, problem = None, None
    with preserved_rng(device):
        try:
            with torch.no_grad():
                skipped = run_skipped()
        except Exception as error:  # a model the stand-ins break: say so and stop skipping it
            problem = f"{type(error).__name__}: {error}"
        finally:
            _assign(tensors, before)  # norm statistics, local-rule weights
    output = call_model(model, inputs)
    return output, problem or _mismatch(output, skipped)


@dataclass
class RandomDraws:
    """Set when a ``preserved_rng`` block ends: whether it drew from any global generator."""

    drew: bool = False


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[RandomDraws]:
    """Put the CPU RNG (and ``device``'s, when it is a GPU), NumPy's and Python's global
    generators back as they were on the way out; the yielded ``RandomDraws`` then says whether
    the block drew from any of them."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    cpu = torch.get_rng_state()
    numpy_state, python_state = np.random.get_state(), random.getstate()
    draws = RandomDraws()
    try:
        yield draws
    finally:
        draws.drew = (
            not torch.equal(torch.get_rng_state(), cpu)
            or (cuda is not None and not torch.equal(torch.cuda.get_rng_state(device), cuda))
            or not _same_numpy_state(np.random.get_state(), numpy_state)
            or random.getstate() != python_state
        )
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _same_numpy_state(a: tuple, b: tuple) -> bool:
    return all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
        for x, y in zip(a, b, strict=True)
    )


def _assign(tensors: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Copy ``values`` into ``tensors`` where they differ (untouched tensors keep their version)."""
    with torch.no_grad():
        for tensor, value in zip(tensors, values, strict=True):
            if not torch.equal(tensor, value):
                tensor.copy_(value)


def _mismatch(expected: Any, got: Any) -> str | None:
    """How ``got`` differs from ``expected`` (every tensor in them), or None if it does not."""
    want, have = list(tensors_in(expected)), list(tensors_in(got))
    if len(want) != len(have):
        return f"the output holds {len(have)} tensors instead of {len(want)}"
    for a, b in zip(want, have, strict=True):
        a = a.detach()
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"an output is {tuple(b.shape)} {b.dtype} instead of {tuple(a.shape)} {a.dtype}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return "an integer output changed"
            continue
        rtol, atol = _TOLERANCE.get(a.dtype, _DEFAULT_TOLERANCE)
        if not torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            diff = float((a.float() - b.float()).abs().nan_to_num(float("inf")).max())
            return f"the output changed (largest difference {diff:.3g})"
    return None
