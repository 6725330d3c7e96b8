"""Per-unit training dynamics, measured from what training computes anyway.

Per unit and per decision interval, with no extra forward or backward pass:

* ``grad_l1``: AutoFreeze's G_l, the L1 norm of the gradient accumulated over the interval's
  steps, G_l = ‖Σ_steps ∇p‖₁ (one in-place add per parameter per step);
* ``grad_change``: AutoFreeze's r_l = |G_l(prev) − G_l| / G_l(prev);
* ``weight_change``: LoCal+SGD's dynamic rule, ‖ΔW‖ / ‖W‖ over the interval;
* ``grad_to_weight``: the norm of the interval's mean gradient over the weight norm (an
  effective learning speed, comparable across units of different size).

A unit that received no gradient during the interval (FROZEN or LOCAL) keeps its last values;
``age`` counts the intervals since they were measured.

Beside them, :class:`PlasticityMonitor` (Egeria's plasticity against the int8 reference model) and
:class:`AttentionScore` (SmartFRZ's predictor) measure each unit once per decision.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from freeze_agent.predictor import WeightHistory, WeightSampler, load_predictor
from freeze_agent.reference import (
    ReferenceOutputs,
    ReferenceWorker,
    exit_module_paths,
    gram_distance,
    normalized_gram,
    slope,
    unit_outputs,
)
from freeze_agent.units import Unit, batch_size_of

SMALL_WORK_FLOPS = 1e9
"""A per-decision signal computation on the CPU below this many FLOPs runs on one torch thread
(see :func:`one_thread_if`)."""


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


@dataclass
class UnitDynamics:
    """The latest gradient and weight signals of one unit (NaN until first measured)."""

    grad_l1: float = math.nan
    grad_change: float = math.nan
    weight_change: float = math.nan
    grad_to_weight: float = math.nan
    age: int = 0  # intervals since these values were measured


class DynamicsTracker:
    """Accumulates gradients after each optimizer step and summarizes them per interval.

    The per-step work is one fused ``_foreach_add`` over all parameters with a gradient; every
    norm is taken once per interval.
    """

    def __init__(self, units: Sequence[Unit]) -> None:
        self.units = list(units)
        self.params = [[p for p in u.parameters()] for u in self.units]
        self.dynamics = [UnitDynamics() for _ in self.units]
        flat = [p for ps in self.params for p in ps]
        self._flat = flat
        self._unit_of = [u for u, ps in enumerate(self.params) for _ in ps]
        self._grad_sum = [torch.zeros_like(p) for p in flat]
        self._steps_with_grad = [0] * len(self.units)
        self._start_weights = self._copy_weights()

    def _copy_weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self._flat]

    @torch.no_grad()
    def after_step(self) -> None:
        """Add this step's gradients to the interval's sums (call after ``optimizer.step``)."""
        live = [i for i, p in enumerate(self._flat) if p.grad is not None]
        if not live:
            return
        torch._foreach_add_([self._grad_sum[i] for i in live], [self._flat[i].grad for i in live])
        for u in {self._unit_of[i] for i in live}:
            self._steps_with_grad[u] += 1

    @torch.no_grad()
    def end_interval(self) -> list[UnitDynamics]:
        """Close the interval: update each unit's signals and start a new interval."""
        offset = 0
        for u, params in enumerate(self.params):
            span = range(offset, offset + len(params))
            offset += len(params)
            d = self.dynamics[u]
            steps = self._steps_with_grad[u]
            if steps == 0:
                d.age += 1
                continue
            weights = [self._flat[i].detach() for i in span]
            weight_norm = _norm(weights)
            delta = torch._foreach_sub(weights, [self._start_weights[i] for i in span])
            grad_l1 = float(sum(self._grad_sum[i].abs().sum() for i in span))
            previous = d.grad_l1
            d.grad_change = (
                abs(previous - grad_l1) / previous
                if math.isfinite(previous) and previous > 0
                else math.nan
            )
            d.grad_l1 = grad_l1
            d.weight_change = _norm(delta) / max(weight_norm, 1e-12)
            grad_sum = [self._grad_sum[i] for i in span]
            d.grad_to_weight = _norm(grad_sum) / steps / max(weight_norm, 1e-12)
            d.age = 0
            self._steps_with_grad[u] = 0
        torch._foreach_zero_(self._grad_sum)
        self._start_weights = self._copy_weights()
        return self.dynamics


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors)))))


class PlasticityMonitor:
    """Egeria's plasticity: how far each unit's output on a fixed probe batch has moved away from
    the int8 reference model's, as the similarity-preserving (SP) loss.

    The reference snapshot is taken at the first check and refreshed every ``refresh`` checks; its
    outputs are computed in a CPU worker process (``freeze_agent.reference``) while training goes
    on. Each check compares the training model's unit outputs (one no-grad forward of the probe
    batch) with the latest reference outputs. Values are reported as a rate per training step since
    the reference snapshot, so a refresh does not make the signal jump; ``age`` counts the checks
    since the reference result being used arrived.

    The worker's child process is reused across runs of one process: :meth:`close` hands it
    back to ``freeze_agent.reference``'s pool and the next monitor takes it, so only the first
    run of a process pays for the child's start-up (``freeze_agent.reference.warm_pool`` can
    pay it ahead of time).
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


class AttentionScore:
    """SmartFRZ's attention score: the trained predictor's probability that each unit can freeze,
    from a history of sampled weight snapshots (one per check)."""

    def __init__(self, units: Sequence[Unit], predictor_dir=None) -> None:
        try:
            self.predictor = load_predictor(predictor_dir) if predictor_dir else load_predictor()
        except FileNotFoundError:
            self.predictor = None
        self.history = WeightHistory(WeightSampler(units))

    @property
    def available(self) -> bool:
        return self.predictor is not None

    @torch.no_grad()
    def check(self) -> list[float] | None:
        if self.predictor is None:
            return None
        self.history.record()
        with one_thread_if(True):  # a small network on a short history
            return self.predictor.freeze_probability(self.history.tensor()).tolist()


def _on_cpu(model: torch.nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())
