"""How many torch threads the small per-decision signal computations use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

SMALL_WORK_FLOPS = 1e9
"""A per-decision signal computation on the CPU below this many FLOPs runs on one torch thread
(see ``one_thread_if``)."""


@contextlib.contextmanager
def one_thread_if(small: bool) -> Iterator[None]:
    """Run the block's torch CPU ops on one intra-op thread when ``small``, then restore the
    count. Why: on a busy machine (training's own threads, the reference worker, other jobs)
    every multi-threaded op waits for its slowest thread. Measured on 2 shared cores, the
    mnist1d-cnn probe forward took a median 97-550 ms with 2 threads and 30-34 ms with one;
    work this small gains little from a second thread even on an idle machine."""
    threads = torch.get_num_threads()
    if not small or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
