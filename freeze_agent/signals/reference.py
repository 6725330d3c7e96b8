"""The Egeria-style reference model: an int8 snapshot of the training model, run on the CPU in a
separate process, whose per-unit outputs on a fixed probe batch measure each unit's *plasticity*
(``freeze_agent.signals.plasticity`` compares them with the training model's own through the SP
loss of ``freeze_agent.signals.similarity``). The snapshot is run off the training path so the
accelerator never waits for it.

``ReferenceWorker`` owns one CPU child process at a time. ``submit()`` quantizes the
model's weights (``freeze_agent.signals.quantization``) and hands them to a background sender
thread; the child (``freeze_agent.signals.reference_child``) dequantizes them, loads them into
its own copy of the architecture and returns every unit's exit-module output
(``freeze_agent.signals.unit_outputs``). ``poll()`` picks a result up if one is there. Neither
waits for the child. A child that dies, reports an error or keeps a job past ``timeout_s`` costs
the training process one ``warnings.warn``: the worker is restarted up to ``max_restarts`` times,
after which ``available`` is False and ``submit``/``poll`` return False/None.

Children are started (forked where safe) and pooled across workers by
``freeze_agent.signals.reference_pool`` (which also holds ``warm_pool``); what crosses the pipes
is ``freeze_agent.signals.wire``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing.connection
import os
import signal
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from freeze_agent.core.units import ModelInput
from freeze_agent.signals.quantization import quantize_state_dict
from freeze_agent.signals.reference_pool import (
    Incarnation,
    ReferenceWorkerWarning,
    pool_put,
    pool_take,
    shut_down,
    shutting_down,
)
from freeze_agent.signals.wire import architecture_bytes, to_wire

__all__ = ["ReferenceOutputs", "ReferenceWorker", "ReferenceWorkerWarning"]

CLOSE_GRACE_S = 2.0
"""How long ``ReferenceWorker.close`` waits for a job in flight before it kills the child
rather than pooling it (a job takes milliseconds to a fraction of a second)."""


@dataclass
class ReferenceOutputs:
    """One answer of the reference worker."""

    step: int
    """The training step the snapshot was taken at."""
    outputs: list[torch.Tensor]
    """One per unit, float32, shape (probe_batch, features)."""
    seconds: float
    """The worker's compute time (dequantize, load, forward)."""


_LIVE_WORKERS: weakref.WeakSet[ReferenceWorker] = weakref.WeakSet()
_TOKENS = itertools.count(1)


@atexit.register
def _close_live_workers() -> None:
    """At interpreter exit: kill every child, in use or pooled (from now on a closing worker
    kills its child instead of pooling it)."""
    shut_down()  # kills the pooled children, and makes a closing worker kill its child
    for worker in list(_LIVE_WORKERS):
        worker.close()


class ReferenceWorker:
    """Owns a CPU child process (torch.multiprocessing; forked where safe, else spawned, see
    ``reference_pool.default_start_method``) holding a copy of the model architecture; each
    ``submit`` sends an int8 snapshot; the process loads it (dequantized), runs the probe batch
    in eval mode under ``no_grad`` with ``torch.set_num_threads(threads)``, and sends back
    every unit's exit-module output (hooks registered by module path in the child).

    Children outlive their worker: ``close`` hands a healthy, idle child to a process-wide
    pool (at most ``reference_pool.POOL_MAX_IDLE``), and a new worker takes one from there and
    sends it its own model, instead of paying for a fresh interpreter and torch import on every
    run. ``reference_pool.warm_pool`` starts one ahead of time. A child still busy after a short
    grace (:data:`CLOSE_GRACE_S`), hung or failed is killed instead; pooled children die at
    interpreter exit, and a forked process never touches its parent's.

    Args:
        model: the model being trained. It is sent to the child once, pickled with
            ``torch.save`` (a CPU copy; hooks not defined by torch are left out), so its class
            must be defined at module level. A spawned child (CUDA initialized, or no fork on
            the platform) must also be able to import it in a fresh interpreter: from an
            importable module, not the ``__main__`` script (the child does not re-run it) or a
            notebook cell. The pickled copy
            is kept to restart the worker. The child runs it in float32.
        unit_module_paths: the qualified path of each unit's exit module ("" = the root); see
            ``freeze_agent.signals.unit_outputs.exit_module_paths``.
        probe_inputs: the fixed probe batch (tensor, tuple or dict, as the model is called).
        threads: torch threads of the child.
        timeout_s: a submitted job not answered within this many seconds of the child being
            ready counts as a hang.
        max_restarts: restarts after a failure before the worker gives up.
        startup_timeout_s: a child not ready (torch imported, model loaded) within this many
            seconds of being spawned (or, for a pooled child, of being handed the model) counts
            as a failure.
        start_method: how a new child starts, "fork" or "spawn" (default:
            ``reference_pool.default_start_method()``); a pooled child is reused however it
            started.

    Failures (death, hang, an error in the child, an unpicklable model) never raise in the
    training process: each gives one ``ReferenceWorkerWarning`` saying why.
    """

    def __init__(
        self,
        model: nn.Module,
        unit_module_paths: list[str],
        probe_inputs: ModelInput,
        *,
        threads: int = 1,
        timeout_s: float = 60.0,
        max_restarts: int = 1,
        startup_timeout_s: float = 120.0,
        start_method: str | None = None,
    ) -> None:
        self.unit_module_paths = list(unit_module_paths)
        self.threads = threads
        self.timeout_s = timeout_s
        self.max_restarts = max_restarts
        self.startup_timeout_s = startup_timeout_s
        self.start_method = start_method
        self.restarts = 0
        self._owner_pid = os.getpid()
        self._failure: str | None = None
        self._closed = False
        self._worker: Incarnation | None = None
        self._job: tuple[int, float] | None = None  # (step, submitted at)
        self._latest: ReferenceOutputs | None = None
        self._token: int | None = None  # tags the child's answers meant for this worker
        _LIVE_WORKERS.add(self)
        modules = dict(model.named_modules())
        unknown = [p for p in self.unit_module_paths if p not in modules]
        if unknown:
            raise KeyError(f"no module at path(s) {unknown} in {type(model).__name__}")
        try:
            model_bytes = architecture_bytes(model)
        except Exception as error:
            self._give_up(f"the model cannot be pickled for the worker ({error})")
            return
        self._init_message = (
            "init",
            model_bytes,
            self.unit_module_paths,
            to_wire(probe_inputs),
            self.threads,
        )
        self._launch()

    # ------------------------------------------------------------------ public

    def submit(self, model: nn.Module, step: int) -> bool:
        """Send an int8 snapshot of ``model`` taken at ``step`` if the worker is idle; never
        waits for the child (the cost is one pass over the weights to quantize them).
        Returns whether a snapshot was sent."""
        self._check()
        if self._worker is None or self._job is not None:
            return False
        snapshot = to_wire(quantize_state_dict(model))
        self._job = (int(step), time.monotonic())
        self._worker.send(("job", int(step), snapshot))
        return True

    def poll(self) -> ReferenceOutputs | None:
        """The newest finished result not yet returned, else None; never waits."""
        self._check()
        result, self._latest = self._latest, None
        return result

    def wait(self, timeout_s: float) -> ReferenceOutputs | None:
        """Block until the submitted job's result arrives (or a failure, or ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check()
            if self._latest is not None or self._job is None or self._worker is None:
                return self.poll()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(OSError, ValueError):
                multiprocessing.connection.wait(
                    [self._worker.results, self._worker.process.sentinel],
                    timeout=min(remaining, 0.1),
                )

    @property
    def available(self) -> bool:
        """False once the worker failed beyond ``max_restarts`` (or was closed)."""
        self._check()
        return self._worker is not None

    @property
    def status(self) -> str:
        """One of "idle", "busy", "restarting" or "failed: <reason>"."""
        self._check()
        if self._worker is None:
            return f"failed: {self._failure or 'closed'}"
        if self._job is not None:
            return "busy"
        if self.restarts and self._worker.ready_at is None:
            return "restarting"
        return "idle"

    @property
    def pid(self) -> int | None:
        """The child's process id (None when there is none)."""
        return self._worker.process.pid if self._worker is not None else None

    def close(self) -> None:
        """Hand the child back to the process-wide pool when it is healthy and idle, else kill
        it (still busy after a grace of at most :data:`CLOSE_GRACE_S`, hung, failed, or the
        interpreter is exiting); bounded in time, safe to call twice, never warns."""
        if self._closed:
            return
        self._closed = True
        worker = self._worker
        if worker is not None and os.getpid() == self._owner_pid:
            if self._settle(worker) and worker.healthy():
                pool_put(worker)
            else:
                worker.stop()
        self._worker, self._job = None, None
        if self._failure is None:
            self._failure = "closed"
        _LIVE_WORKERS.discard(self)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> ReferenceWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _settle(self, worker: Incarnation) -> bool:
        """Whether ``worker``'s child can be reused: it has reported no error, and a job still in
        flight finishes within the grace. (A run that ends right after a snapshot, as a
        Gymnasium episode does, would otherwise never hand its child on.) A child still loading
        this worker's model counts as reusable: its late "ready" is told apart by the token."""
        grace = 0.0 if shutting_down() else min(CLOSE_GRACE_S, self.timeout_s)
        deadline = time.monotonic() + grace
        while True:
            try:
                if self._handle(worker.receive()) is not None:
                    return False
            except (EOFError, OSError):
                return False
            if self._job is None:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False  # busy: possibly hung, so not reused
            with contextlib.suppress(OSError, ValueError):
                multiprocessing.connection.wait(
                    [worker.results, worker.process.sentinel], timeout=min(remaining, 0.1)
                )

    def _launch(self) -> None:
        """Take an idle child from the pool, or spawn one, and send it this worker's model."""
        worker = pool_take()
        if worker is None:
            try:
                worker = Incarnation(self.start_method)
            except Exception as error:
                self._worker = None
                self._failure = f"could not start ({type(error).__name__}: {error})"
                self._warn(self._failure, gave_up=True)
                return
        self._token = next(_TOKENS)
        worker.init(self._token, self._init_message)
        self._worker = worker

    def _check(self) -> None:
        """Collect what the child sent; detect death, errors and timeouts (never blocks)."""
        worker = self._worker
        if worker is None or os.getpid() != self._owner_pid:
            return
        try:
            messages = worker.receive()
            eof = False
        except (EOFError, OSError):
            messages, eof = [], True
        problem = self._handle(messages)
        if problem is None:
            exitcode = worker.process.exitcode
            if eof or exitcode is not None:
                with contextlib.suppress(Exception):
                    worker.process.join(timeout=1.0)
                problem = _describe_exit(worker.process.pid, worker.process.exitcode)
        if problem is None:
            problem = self._timed_out(worker)
        if problem is not None:
            self._on_failure(problem)

    def _handle(self, messages: list[Any]) -> str | None:
        worker = self._worker
        assert worker is not None
        for message in messages:
            kind = message[0]
            if kind in ("ready", "result") and message[1] != self._token:
                continue  # an answer to the child's previous owner
            if kind == "ready":
                worker.ready_at = time.monotonic()
            elif kind == "result":
                _, _token, step, arrays, seconds = message
                if self._job is not None and self._job[0] == step:
                    self._job = None
                self._latest = ReferenceOutputs(
                    step=step,
                    outputs=[torch.from_numpy(a) for a in arrays],
                    seconds=float(seconds),
                )
            elif kind == "error":
                return f"process {worker.process.pid} raised {message[1]}"
        return None

    def _timed_out(self, worker: Incarnation) -> str | None:
        now = time.monotonic()
        if worker.ready_at is None:
            if now - worker.started_at > self.startup_timeout_s:
                return (
                    f"process {worker.process.pid} did not start within "
                    f"{self.startup_timeout_s:g} s"
                )
            return None
        if self._job is not None and now - max(self._job[1], worker.ready_at) > self.timeout_s:
            return (
                f"process {worker.process.pid} timed out: no result within "
                f"{self.timeout_s:g} s (step {self._job[0]})"
            )
        return None

    def _on_failure(self, reason: str) -> None:
        worker, self._worker = self._worker, None
        self._job = None
        if worker is not None:
            worker.stop()
        if self.restarts < self.max_restarts:
            self.restarts += 1
            self._warn(reason, gave_up=False)
            self._launch()
        else:
            self._give_up(reason)

    def _give_up(self, reason: str) -> None:
        self._worker, self._job = None, None
        self._failure = reason
        self._warn(reason, gave_up=True)

    def _warn(self, reason: str, *, gave_up: bool) -> None:
        if gave_up:
            tail = "giving up: reference-model plasticity is unavailable for the rest of the run"
        else:
            tail = f"restarting it (restart {self.restarts} of {self.max_restarts})"
        warnings.warn(f"reference worker: {reason}; {tail}", ReferenceWorkerWarning, stacklevel=5)


def _describe_exit(pid: int | None, exitcode: int | None) -> str:
    if exitcode is None:
        return f"process {pid} closed its pipe"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            name = signal.Signals(-exitcode).name
            return f"process {pid} was killed by {name} (exit code {exitcode})"
    return f"process {pid} exited with code {exitcode}"
