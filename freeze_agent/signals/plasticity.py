"""Egeria's plasticity (Wang et al., EuroSys 2023): how far each unit's output still moves,
against an int8 reference model computed in a CPU worker process."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from freeze_agent.core.units import Unit, batch_size_of
from freeze_agent.signals.reference import ReferenceOutputs, ReferenceWorker
from freeze_agent.signals.similarity import gram_distance, normalized_gram, slope
from freeze_agent.signals.threads import SMALL_WORK_FLOPS, one_thread_if
from freeze_agent.signals.unit_outputs import exit_module_paths, unit_outputs


class PlasticityMonitor:
    """Egeria's plasticity: how far each unit's output on a fixed probe batch has moved away from
    the int8 reference model's, as the similarity-preserving (SP) loss.

    A reference snapshot is requested at check 0 and every ``refresh`` checks after; its outputs
    are computed in a CPU worker process (``freeze_agent.signals.reference``) while training goes
    on, and the snapshot requested at check ``k`` is used from check ``k + lag`` on. A result
    that is late at its check is waited for (the waits are counted: ``waits``,
    ``wait_seconds``), so what a policy sees never depends on when results happen to arrive: the
    same seed and decisions give the same observations on an idle machine and a busy one, in
    policy training and in deployment alike. Each check compares the training model's unit
    outputs (one no-grad forward of the probe batch) with the reference outputs in use. Values
    are a rate per training step since the reference snapshot, so a refresh does not make the
    signal jump; ``age`` counts the checks since the reference in use became due.

    The worker starts with the monitor (so a fresh process pays the child's start-up while the
    first interval trains), and its child process is reused across runs of one process:
    ``close`` hands it back to the pool (``freeze_agent.signals.reference_pool``) and the next
    monitor takes it.

    Args:
        model: the model being trained.
        units: its units.
        probe_input: the fixed probe batch.
        refresh: checks between two reference snapshots.
        lag: checks between requesting a snapshot and using it, 1 to ``refresh``.
        window: plasticity values per unit the trend is fitted over.
        threads: torch threads of the worker's child.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        units: Sequence[Unit],
        probe_input,
        *,
        refresh: int = 5,
        lag: int = 1,
        window: int = 5,
        threads: int = 1,
    ) -> None:
        if not 1 <= lag <= refresh:
            raise ValueError(f"lag must lie in 1..refresh={refresh}, got {lag}")
        self.model, self.units, self.probe = model, list(units), probe_input
        self.paths = exit_module_paths(model, self.units)
        self.refresh, self.lag, self.window = refresh, lag, window
        self.worker = ReferenceWorker(model, self.paths, probe_input, threads=threads)
        probe_flops = sum(u.flops_forward for u in self.units) * batch_size_of(probe_input)
        self._small = probe_flops < SMALL_WORK_FLOPS and _on_cpu(model)
        self.reference: ReferenceOutputs | None = None
        self._arrived: ReferenceOutputs | None = None  # the requested result, taken already
        self._reference_grams: list[torch.Tensor] = []  # G(reference output), once per result
        self._due_at: int | None = None  # the check at which the requested snapshot is used
        self._in_use_since = 0  # the check at which the reference in use became due
        self.history: list[list[float]] = [[] for _ in self.units]
        self.checks = 0
        self.waits = 0  # checks that had to wait for a late reference result
        self.wait_seconds = 0.0

    @property
    def available(self) -> bool:
        return self.worker.available

    @property
    def _longest_wait(self) -> float:
        """How long a submitted job can take: a child that fails or hangs ends it sooner."""
        return self.worker.startup_timeout_s + self.worker.timeout_s

    def wait_for_reference(self, timeout_s: float) -> bool:
        """Block until the requested reference result is in and use it (tests, end of a run)."""
        result = self.worker.wait(timeout_s)
        if result is not None:
            self._use_reference(result, self.checks)
        return self.reference is not None

    def _use_reference(self, result: ReferenceOutputs, check: int) -> None:
        self.reference, self._in_use_since, self._due_at = result, check, None
        with one_thread_if(self._small):
            self._reference_grams = [normalized_gram(o) for o in result.outputs]

    def _take_due_reference(self, check: int) -> None:
        """Use the snapshot requested ``lag`` checks ago, waiting for it if it is late."""
        if self._due_at is None or check < self._due_at:
            return
        result, self._arrived = self._arrived or self.worker.poll(), None
        if result is None and self.worker.available:
            self.waits += 1
            started = time.perf_counter()
            # bounded by the worker itself: a child that fails or hangs ends the wait
            result = self.worker.wait(self._longest_wait)
            self.wait_seconds += time.perf_counter() - started
        if result is None:  # the worker failed: this snapshot is lost, the next one is requested
            self._due_at = None
            return
        self._use_reference(result, check)

    def check(self, step: int) -> tuple[list[float], list[float], int] | None:
        """Update plasticity; returns (values, trends, age) or None while no reference is due."""
        check, self.checks = self.checks, self.checks + 1
        self._take_due_reference(check)
        if check % self.refresh == 0 and self.worker.submit(self.model, step):
            self._due_at = check + self.lag
        if self.reference is None:
            return None
        with one_thread_if(self._small):
            current = unit_outputs(self.model, self.paths, self.probe)
            grams = [normalized_gram(a) for a in current]
        steps = max(step - self.reference.step, 1)
        values = []
        for u, (ga, gb) in enumerate(zip(grams, self._reference_grams, strict=True)):
            value = gram_distance(ga, gb) / steps
            values.append(value)
            self.history[u] = (self.history[u] + [value])[-self.window :]
        trends = [slope(h) for h in self.history]
        return values, trends, check - self._in_use_since

    def state_dict(self) -> dict:
        """The schedule, history and reference results, for a resumed run to measure exactly
        what the uninterrupted run would: a snapshot still in flight is waited for, so its
        result is saved too."""
        if self._due_at is not None and self._arrived is None and self.worker.available:
            self._arrived = self.worker.wait(self._longest_wait)
        return {
            "checks": self.checks,
            "waits": self.waits,
            "wait_seconds": self.wait_seconds,
            "history": [list(h) for h in self.history],
            "due_at": self._due_at if self._arrived is not None else None,
            "in_use_since": self._in_use_since,
            "reference": _result_state(self.reference),
            "arrived": _result_state(self._arrived),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; a snapshot this process already sent is dropped, as it
        belongs to the run before the checkpoint's step."""
        if self.worker.available:
            self.worker.wait(self._longest_wait)
        reference = _result_from_state(state["reference"])
        if reference is not None:
            self._use_reference(reference, state["in_use_since"])
        else:
            self.reference, self._reference_grams = None, []
        self.checks, self.waits = state["checks"], state["waits"]
        self.wait_seconds = state["wait_seconds"]
        self.history = [list(h) for h in state["history"]]
        self._in_use_since, self._due_at = state["in_use_since"], state["due_at"]
        self._arrived = _result_from_state(state["arrived"])

    def close(self) -> None:
        """Release the reference worker: its child goes back to the pool if idle, else dies."""
        self.worker.close()


def _result_state(result: ReferenceOutputs | None) -> dict | None:
    if result is None:
        return None
    return {"step": result.step, "outputs": list(result.outputs), "seconds": result.seconds}


def _result_from_state(state: dict | None) -> ReferenceOutputs | None:
    return None if state is None else ReferenceOutputs(**state)


def _on_cpu(model: torch.nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())
