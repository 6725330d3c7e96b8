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

Beside them, ``freeze_agent.signals.plasticity`` (Egeria's plasticity against the int8 reference
model) and ``freeze_agent.signals.attention`` (SmartFRZ's predictor) measure each unit once per
decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from freeze_agent.core.units import Unit


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
        device = flat[0].device if flat else torch.device("cpu")
        self._unit_index = torch.tensor(self._unit_of, dtype=torch.long, device=device)
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
        """Close the interval: update each unit's signals and start a new interval.

        Every norm comes from four fused ``_foreach_norm`` calls over the parameters of the
        units that received a gradient (weights, weight change, gradient sum in L2 and L1),
        summed per unit in float64 and read back in one transfer, so the cost is a few passes
        over the training weights whatever their count; FROZEN and LOCAL units only have their
        start weights moved on."""
        measured = [u for u, steps in enumerate(self._steps_with_grad) if steps]
        for u, d in enumerate(self.dynamics):
            if not self._steps_with_grad[u]:
                d.age += 1
        if measured:
            self._measure(measured)
        weights = [p.detach() for p in self._flat]
        torch._foreach_copy_(self._start_weights, weights)
        return self.dynamics

    def _measure(self, measured: list[int]) -> None:
        """Update the signals of the ``measured`` units and clear their gradient sums."""
        live = set(measured)
        rows = [i for i, u in enumerate(self._unit_of) if u in live]
        weights = [self._flat[i].detach() for i in rows]
        change = [self._start_weights[i] for i in rows]
        grad_sum = [self._grad_sum[i] for i in rows]
        torch._foreach_sub_(change, weights)  # start - now: the change, negated
        squares = torch.stack(
            [
                _tensor_norms(weights) ** 2,
                _tensor_norms(change) ** 2,
                _tensor_norms(grad_sum) ** 2,
                _tensor_norms(grad_sum, 1),
            ]
        )
        index = self._unit_index if len(rows) == len(self._flat) else self._unit_index[rows]
        per_unit = torch.zeros(4, len(self.units), dtype=torch.float64, device=squares.device)
        per_unit.index_add_(1, index, squares)
        weight_sq, delta_sq, grad_sq, grad_l1s = per_unit.cpu().tolist()
        for u in measured:
            d, steps = self.dynamics[u], self._steps_with_grad[u]
            weight_norm = max(math.sqrt(weight_sq[u]), 1e-12)
            previous, grad_l1 = d.grad_l1, grad_l1s[u]
            d.grad_change = (
                abs(previous - grad_l1) / previous
                if math.isfinite(previous) and previous > 0
                else math.nan
            )
            d.grad_l1 = grad_l1
            d.weight_change = math.sqrt(delta_sq[u]) / weight_norm
            d.grad_to_weight = math.sqrt(grad_sq[u]) / steps / weight_norm
            d.age = 0
            self._steps_with_grad[u] = 0
        torch._foreach_zero_(grad_sum)

    def state_dict(self) -> dict:
        """The signals so far and the open interval's sums, for a resumed run to continue
        exactly (the sums and start weights are as large as the parameters)."""
        return {
            "dynamics": [asdict(d) for d in self.dynamics],
            "steps_with_grad": list(self._steps_with_grad),
            "grad_sum": [t.detach().cpu().clone() for t in self._grad_sum],
            "start_weights": [t.detach().cpu().clone() for t in self._start_weights],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.dynamics = [UnitDynamics(**d) for d in state["dynamics"]]
        self._steps_with_grad = list(state["steps_with_grad"])
        for mine, saved in zip(self._grad_sum, state["grad_sum"], strict=True):
            mine.copy_(saved)
        for mine, saved in zip(self._start_weights, state["start_weights"], strict=True):
            mine.copy_(saved)


def _tensor_norms(tensors: Sequence[torch.Tensor], order: float = 2.0) -> torch.Tensor:
    """The ``order``-norm of each tensor, as one float64 vector on the first tensor's device."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    norms = torch._foreach_norm(list(tensors), order)
    return torch.stack([n.to(device, torch.float64) for n in norms])
