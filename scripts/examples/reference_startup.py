"""Time the reference worker's first result on a `transformers` model, with its child forked and
with it spawned: the wait that a run's first plasticity observation would otherwise have.

    python scripts/examples/reference_startup.py
"""

from __future__ import annotations

import time

import torch
from plain_loop import build_model

from freeze_agent.core.units import partition
from freeze_agent.signals.reference import ReferenceWorker
from freeze_agent.signals.reference_pool import drain_pool
from freeze_agent.signals.unit_outputs import exit_module_paths


def main() -> None:
    model = build_model("resnet")
    probe = {"pixel_values": torch.randn(32, 1, 32, 32)}
    paths = exit_module_paths(model, partition(model, probe))
    for method in ("fork", "spawn"):
        drain_pool()  # a new child, not a pooled one
        started = time.perf_counter()
        worker = ReferenceWorker(model, paths, probe, start_method=method)
        assert worker.submit(model, step=0) and worker.wait(120.0) is not None
        first = time.perf_counter() - started
        started = time.perf_counter()
        assert worker.submit(model, step=1) and worker.wait(120.0) is not None
        print(
            f"{method}: first result after {first:.2f} s, "
            f"the next after {1000 * (time.perf_counter() - started):.0f} ms"
        )
        worker.close()
    drain_pool()


if __name__ == "__main__":
    main()
