"""Egeria's plasticity (Wang et al., EuroSys 2023): how far each unit's output still moves,
against an int8 reference model computed in a CPU worker process."""

from __future__ import annotations

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

    The reference snapshot is taken at the first check and refreshed every ``refresh`` checks; its
    outputs are computed in a CPU worker process (``freeze_agent.signals.reference``) while
    training goes on. Each check compares the training model's unit outputs (one no-grad forward
    of the probe batch) with the latest reference outputs. Values are reported as a rate per
    training step since the reference snapshot, so a refresh does not make the signal jump;
    ``age`` counts the checks since the reference result being used arrived.

    The worker's child process is reused across runs of one process: ``close`` hands it back to
    the pool (``freeze_agent.signals.reference_pool``) and the next monitor takes it, so only the
    first run of a process pays for the child's start-up (``reference_pool.warm_pool`` can pay
    it ahead of time).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        units: Sequence[Unit],
        probe_input,
        *,
        refresh: int = 5,
        window: int = 5,
        threads: int = 1,
    ) -> None:
        self.model, self.units, self.probe = model, list(units), probe_input
        self.paths = exit_module_paths(model, self.units)
        self.refresh, self.window = refresh, window
        self.worker = ReferenceWorker(model, self.paths, probe_input, threads=threads)
        probe_flops = sum(u.flops_forward for u in self.units) * batch_size_of(probe_input)
        self._small = probe_flops < SMALL_WORK_FLOPS and _on_cpu(model)
        self.reference = None
        self._reference_grams: list[torch.Tensor] = []  # G(reference output), once per result
        self.history: list[list[float]] = [[] for _ in self.units]
        self.checks = 0
        self.reference_age = 0  # checks since the reference in use arrived
        self._submitted_at_check = -(10**9)

    @property
    def available(self) -> bool:
        return self.worker.available

    def wait_for_reference(self, timeout_s: float) -> bool:
        """Block until a reference result is in (for tests and the end of a run)."""
        result = self.worker.wait(timeout_s)
        if result is not None:
            self._use_reference(result)
        return self.reference is not None

    def _use_reference(self, result: ReferenceOutputs) -> None:
        self.reference, self.reference_age = result, 0
        with one_thread_if(self._small):
            self._reference_grams = [normalized_gram(o) for o in result.outputs]

    def check(self, step: int) -> tuple[list[float], list[float], int] | None:
        """Update plasticity; returns (values, trends, age) or None while no reference exists."""
        self.checks += 1
        self.reference_age += 1
        result = self.worker.poll()
        if result is not None:
            self._use_reference(result)
        if self.checks - self._submitted_at_check >= self.refresh and self.worker.submit(
            self.model, step
        ):
            self._submitted_at_check = self.checks
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
        return values, trends, self.reference_age

    def close(self) -> None:
        """Release the reference worker: its child goes back to the pool if idle, else dies."""
        self.worker.close()


def _on_cpu(model: torch.nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())
