"""The reference worker's child process: its main loop (``worker_main``), which loads an
owner's model, then answers each int8 snapshot with every unit's exit-module output on the probe
batch.

The child dequantizes a snapshot (``freeze_agent.signals.quantization``), loads it into its own
copy of the architecture and returns every unit's exit-module output
(``freeze_agent.signals.unit_outputs``, the same function the training side calls on its own
model, so both sides compute identically). The parent side (spawning, the pipes, the pool of
idle children) is ``freeze_agent.signals.reference_pool``.

This module is what runs in the child, and only that: ``multiprocessing``'s spawn start method
(used where forking is unsafe) pickles the child's target by module path, so ``worker_main``
must stay a module-level function here.
"""

from __future__ import annotations

import contextlib
import io
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from freeze_agent.signals.quantization import dequantize_state_dict
from freeze_agent.signals.unit_outputs import map_tensors, unit_outputs
from freeze_agent.signals.wire import from_wire, restore_parametrizations

__all__ = ["worker_main"]


def worker_main(commands, results) -> None:
    """Entry point of the child: answer snapshots for one owner after another, until the parent
    closes its end of the pipe (it exited, or killed the child).

    Messages in: ("init", token, model bytes, unit paths, probe inputs, threads, sys.path),
    ("job", step, snapshot), ("release",).
    Messages out: ("started",) once, when the interpreter is up (torch imported);
    ("ready", token) after each init; ("result", token, step, [arrays], seconds);
    ("error", text), after which the child exits.

    A child is reused across runs (see ``freeze_agent.signals.reference_pool.pool_put``): each
    "init" replaces the model, unit paths and probe batch of the previous owner, and "release"
    drops them while the child waits in the pool. The token tags every answer with the owner it
    was computed for.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        results.send(("started",))
        model: nn.Module | None = None
        paths: list[str] = []
        probe: Any = None
        token: int | None = None
        while True:
            try:
                message = commands.recv()
            except EOFError:
                return
            kind = message[0]
            if kind == "init":
                _, token, model_bytes, paths, wire_probe, threads, sys_path = message
                model = probe = None  # free the previous owner's model before loading
                _extend_sys_path(sys_path)
                torch.set_num_threads(threads)
                model = torch.load(io.BytesIO(model_bytes), map_location="cpu", weights_only=False)
                restore_parametrizations(model)
                model.float().eval()
                probe = map_tensors(
                    from_wire(wire_probe), lambda t: t.float() if t.is_floating_point() else t
                )
                results.send(("ready", token))
            elif kind == "job":
                if model is None:
                    raise RuntimeError("a snapshot arrived before any model")
                _, step, snapshot = message
                started = time.perf_counter()
                model.load_state_dict(dequantize_state_dict(from_wire(snapshot)))
                outputs = unit_outputs(model, paths, probe)
                seconds = time.perf_counter() - started
                results.send(("result", token, step, [o.numpy() for o in outputs], seconds))
            elif kind == "release":
                model, paths, probe, token = None, [], None, None
    except Exception as error:  # report why, then exit non-zero
        with contextlib.suppress(Exception):
            results.send(("error", f"{type(error).__name__}: {error}"))
        raise SystemExit(1) from error


def _extend_sys_path(entries: Sequence[str]) -> None:
    """Append the parent's import-path entries the child lacks: a pooled child was started
    with the parent's ``sys.path`` of back then, and a later model's class may live elsewhere."""
    known = set(sys.path)
    sys.path.extend(e for e in entries if e not in known)
