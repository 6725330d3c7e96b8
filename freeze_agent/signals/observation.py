"""The observation a policy decides from: one versioned, bounded feature spec.

An observation is a dict of numpy arrays:

* ``units``: (max_units, len(UNIT_FEATURES)) float32, one row per unit in forward order, zero
  rows for padded slots;
* ``mask``: (max_units,) int8, 1 for real units;
* ``global``: (len(GLOBAL_FEATURES),) float32.

Every value is finite and lies in [-1, 1]. Magnitudes are log-scaled; signals whose scale
depends on the model (gradient norms, plasticity) are divided by their running maximum over the
real units of this run, never by statistics that include padded slots. A signal not available
yet (no reference result, a unit that received no gradient) is 0 with a ``*_missing`` flag set,
and every measured signal carries its age. A policy records ``OBSERVATION_VERSION`` and refuses
observations of another version: the meaning of each column is fixed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from gymnasium import spaces

from freeze_agent.core.modes import Mode
from freeze_agent.core.units import UNIT_KINDS, Unit
from freeze_agent.signals.dynamics import UnitDynamics
from freeze_agent.signals.similarity import slope

OBSERVATION_VERSION = "1.0"

UNIT_FEATURES: tuple[str, ...] = (
    # static
    "relative_depth",  # index / (n_units - 1)
    "param_fraction",  # unit parameters / model parameters
    "flop_fraction",  # unit training FLOPs / model training FLOPs
    *(f"kind_{kind.value}" for kind in UNIT_KINDS),
    "supports_local",
    "is_cut_point",
    "is_head",
    # mode
    *(f"mode_{mode.name.lower()}" for mode in Mode),
    "time_in_mode",  # steps in the current mode / planned steps
    # Egeria plasticity (int8 reference model)
    "plasticity",  # log-scaled SP loss per step, relative to this run's maximum
    "plasticity_trend",  # tanh of the least-squares slope relative to the mean
    "plasticity_age",  # checks since the reference result in use arrived, /10, clipped
    "plasticity_missing",
    # AutoFreeze / LoCal+SGD gradient and weight dynamics
    "grad_l1",  # log-scaled accumulated gradient L1, relative to this run's maximum
    "grad_change",  # AutoFreeze r_l squashed: r / (1 + r)
    "weight_change",  # log-scaled ‖ΔW‖/‖W‖ over the interval
    "grad_to_weight",  # log-scaled mean gradient norm / weight norm
    "dynamics_age",  # intervals since the unit last received a gradient, /10, clipped
    "dynamics_missing",
    # SmartFRZ
    "attention_score",  # predictor's probability that the unit can freeze
    "attention_missing",
)
GLOBAL_FEATURES: tuple[str, ...] = (
    "progress",  # steps done / planned steps
    "lr_ratio",  # current learning rate / initial learning rate, clipped to [0, 1]
    "loss_ratio",  # last interval's mean loss / first interval's, /2, clipped to [0, 1]
    "loss_trend",  # tanh(10 · slope of recent interval losses / first loss)
    "cost_ratio",  # modeled cost of the current modes / all-TRAIN cost
    "fraction_frozen",
    "fraction_local",
    "reference_available",  # the int8 reference worker is alive
    "predictor_available",  # SmartFRZ weights were found
)

_IS_HEAD = UNIT_FEATURES.index("is_head")
_PLASTICITY_MISSING = UNIT_FEATURES.index("plasticity_missing")
_SUPPORTS_LOCAL = UNIT_FEATURES.index("supports_local")
_LOG_DECADES = 6.0  # log scaling maps [1e-6, 1] of a ratio onto [0, 1]


def log_scaled(value: float, reference: float = 1.0) -> float:
    """log10(value / reference) mapped from [-6, 0] onto [0, 1]; 0 for non-positive values."""
    if not (_finite(value) and _finite(reference) and value > 0 and reference > 0):
        return 0.0
    ratio = value / reference
    if not (math.isfinite(ratio) and ratio > 0):  # over- or underflow
        return 1.0 if ratio > 0 else 0.0
    return min(max(1.0 + math.log10(ratio) / _LOG_DECADES, 0.0), 1.0)


def observation_space(max_units: int) -> spaces.Dict:
    """The Gymnasium space of an observation for models of up to ``max_units`` units."""
    return spaces.Dict(
        {
            "units": spaces.Box(-1.0, 1.0, (max_units, len(UNIT_FEATURES)), np.float32),
            "mask": spaces.Box(0, 1, (max_units,), np.int8),
            "global": spaces.Box(-1.0, 1.0, (len(GLOBAL_FEATURES),), np.float32),
        }
    )


def action_mask(observation: dict[str, np.ndarray]) -> np.ndarray:
    """Which modes each unit slot may take, from the observation alone: a boolean
    (max_units, len(Mode)) array. Padded slots and the head may only TRAIN; LOCAL only where the
    local rule applies. A policy deployed on a new model needs nothing else to stay legal."""
    units, real = observation["units"], observation["mask"].astype(bool)
    allowed = np.zeros((len(real), len(Mode)), dtype=bool)
    allowed[:, Mode.TRAIN] = True
    movable = real & (units[:, _IS_HEAD] < 0.5)
    allowed[:, Mode.FROZEN] = movable
    allowed[:, Mode.LOCAL] = movable & (units[:, _SUPPORTS_LOCAL] > 0.5)
    return allowed


def has_plasticity(observation: dict[str, np.ndarray]) -> bool:
    """Whether the observation carries plasticity values (a reference result was in when it
    was built)."""
    real = observation["mask"].astype(bool)
    return bool((observation["units"][real, _PLASTICITY_MISSING] < 0.5).any())


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _bounded(features: np.ndarray) -> np.ndarray:
    """Features as the observation space holds them: finite, in [-1, 1], float32."""
    return np.clip(np.nan_to_num(features, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0).astype(
        np.float32
    )


@dataclass
class Signals:
    """The raw signals of one check, as the controller measured them."""

    steps_in_mode: list[int]
    dynamics: list[UnitDynamics]
    plasticity: list[float] | None = None
    plasticity_trend: list[float] | None = None
    plasticity_age: int = 0
    attention: list[float] | None = None
    reference_available: bool = False
    predictor_available: bool = False
    interval_losses: list[float] = field(default_factory=list)


class ObservationBuilder:
    """Turns the controller's raw signals into the bounded observation, keeping the per-run
    statistics (running maxima, first loss) that normalization needs."""

    def __init__(self, units: Sequence[Unit], max_units: int, total_steps: int | None) -> None:
        if len(units) > max_units:
            raise ValueError(f"{len(units)} units do not fit max_units={max_units}")
        self.units, self.max_units, self.total_steps = list(units), max_units, total_steps
        self._max_grad = 0.0
        self._max_plasticity = 0.0
        self._static = self._static_features()

    def state_dict(self) -> dict:
        return {"max_grad": self._max_grad, "max_plasticity": self._max_plasticity}

    def load_state_dict(self, state: dict) -> None:
        self._max_grad, self._max_plasticity = state["max_grad"], state["max_plasticity"]

    def _static_features(self) -> np.ndarray:
        n = len(self.units)
        total_params = max(sum(u.num_params for u in self.units), 1)
        total_flops = max(sum(u.flops_train for u in self.units), 1.0)
        rows = []
        for i, unit in enumerate(self.units):
            rows.append(
                [
                    i / (n - 1) if n > 1 else 1.0,
                    unit.num_params / total_params,
                    unit.flops_train / total_flops,
                    *(float(unit.kind is kind) for kind in UNIT_KINDS),
                    float(unit.supports_local),
                    float(unit.is_cut_point),
                    float(i == n - 1),
                ]
            )
        return np.asarray(rows, dtype=np.float32)

    def build(
        self,
        modes: Sequence[Mode],
        signals: Signals,
        *,
        progress: float,
        lr_ratio: float,
        cost_ratio: float,
    ) -> dict[str, np.ndarray]:
        n = len(self.units)
        grads = [d.grad_l1 for d in signals.dynamics if _finite(d.grad_l1)]
        self._max_grad = max([self._max_grad, *grads])
        if signals.plasticity is not None:
            finite = [p for p in signals.plasticity if _finite(p)]
            self._max_plasticity = max([self._max_plasticity, *finite])

        # float64 until clipped: a huge signal must not overflow the float32 cast
        matrix = np.zeros((self.max_units, len(UNIT_FEATURES)), dtype=np.float64)
        for i in range(n):
            matrix[i] = [
                *self._static[i],
                *(float(modes[i] is m) for m in Mode),
                min(signals.steps_in_mode[i] / self.total_steps, 1.0) if self.total_steps else 0.0,
                *self._plasticity(signals, i),
                *self._dynamics(signals.dynamics[i]),
                *self._attention(signals, i),
            ]
        mask = np.zeros(self.max_units, dtype=np.int8)
        mask[:n] = 1
        global_vector = np.array(
            [
                progress,
                min(max(lr_ratio, 0.0), 1.0),
                *self._loss_features(signals.interval_losses),
                cost_ratio,
                sum(m is Mode.FROZEN for m in modes) / n,
                sum(m is Mode.LOCAL for m in modes) / n,
                float(signals.reference_available),
                float(signals.predictor_available),
            ],
            dtype=np.float64,
        )
        return {
            "units": _bounded(matrix),
            "mask": mask,
            "global": _bounded(global_vector),
        }

    def _plasticity(self, signals: Signals, i: int) -> list[float]:
        if signals.plasticity is None or not _finite(signals.plasticity[i]):
            return [0.0, 0.0, 0.0, 1.0]
        values = signals.plasticity[i]
        trend = signals.plasticity_trend[i] if signals.plasticity_trend else 0.0
        scale = max(values, 1e-12)
        return [
            log_scaled(values, self._max_plasticity),
            math.tanh(trend / scale) if _finite(trend) else 0.0,
            min(signals.plasticity_age / 10, 1.0),
            0.0,
        ]

    def _dynamics(self, d: UnitDynamics) -> list[float]:
        if not _finite(d.grad_l1):
            return [0.0, 0.0, 0.0, 0.0, min(d.age / 10, 1.0), 1.0]
        change = max(d.grad_change, 0.0) if _finite(d.grad_change) else 0.0  # r_l >= 0
        return [
            log_scaled(d.grad_l1, self._max_grad),
            change / (1.0 + change),
            log_scaled(d.weight_change),
            log_scaled(d.grad_to_weight),
            min(d.age / 10, 1.0),
            0.0,
        ]

    @staticmethod
    def _attention(signals: Signals, i: int) -> list[float]:
        if signals.attention is None:
            return [0.0, 1.0]
        return [float(signals.attention[i]), 0.0]

    @staticmethod
    def _loss_features(losses: Sequence[float]) -> list[float]:
        finite = [x for x in losses if _finite(x)]
        if not finite or finite[0] <= 0:
            return [0.0, 0.0]
        first, recent = finite[0], finite[-5:]
        ratio = min(max(finite[-1] / first / 2.0, 0.0), 1.0)
        if len(recent) < 2:
            return [ratio, 0.0]
        return [ratio, math.tanh(10.0 * slope(recent) / first)]
