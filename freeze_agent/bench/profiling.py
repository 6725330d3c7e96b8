"""Measured against modeled: the time of one training iteration per frozen-prefix depth.

For every depth k (units 0..k-1 FROZEN, the rest TRAIN) the profile times training iterations
on one fixed batch, without and (where unit k-1's output is a cut point) with the activation
cache; and, to test the model off the prefix path, with each unit frozen alone in the middle of
training units (its weight gradient and optimizer step go, the gradient still flows through).
Variants are interleaved within each repetition, so slow drifts hit them all alike, and the
fastest repetition of each variant is kept: on a shared machine noise only ever adds time,
in bursts that can spoil most repetitions of a variant (a median would keep them). A
single-threaded CPU run is timed by the process's CPU time, which other processes taking the
core do not inflate (the wall times are kept too); anything else by the wall clock.

The cost model's device constants (``cost_model.TERMS``) are fitted to all these times at once,
by non-negative least squares on relative error, and each variant's measured time ratio
t / t_all-TRAIN is compared with the modeled one. The fit has seen the variant it is compared
on, so each variant is also predicted by a fit to all the *other* variants (leave-one-out): the
honest figure for a depth that was not measured.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from freeze_agent.core.cost_model import (
    TERMS,
    CostConstants,
    Fit,
    cost_ratio,
    fit_constants,
    iteration_terms,
)
from freeze_agent.core.modes import Mode
from freeze_agent.core.prefix_cache import PrefixCache
from freeze_agent.core.units import call_model
from freeze_agent.tasks.spec import Task
from freeze_agent.tasks.trainer import Trainer, describe_unit

BASE = "0"  # the all-TRAIN variant: every ratio is to its time


def _over(measured: float | None, modeled: float | None) -> float | None:
    """measured / modeled, or None when either is missing (no cached variant, no LOO fit)."""
    return None if measured is None or not modeled else measured / modeled


@dataclass
class DepthTiming:
    """Time per iteration with ``frozen_units`` leading units FROZEN, without and (where the
    boundary allows) with the activation cache. Ratios are to the all-TRAIN time; ``modeled``
    uses the constants fitted to every variant, ``loo`` those fitted to all the others."""

    frozen_units: int
    seconds_per_iteration: float
    measured_ratio: float
    modeled_ratio: float
    flop_ratio: float = 1.0  # the FLOP-only model (default constants)
    loo_modeled_ratio: float | None = None
    cached_seconds_per_iteration: float | None = None
    cached_measured_ratio: float | None = None
    cached_modeled_ratio: float | None = None
    cached_flop_ratio: float | None = None
    cached_loo_modeled_ratio: float | None = None

    @property
    def measured_speedup(self) -> float:
        return 1.0 / self.measured_ratio

    @property
    def cached_measured_speedup(self) -> float | None:
        return None if not self.cached_measured_ratio else 1.0 / self.cached_measured_ratio

    @property
    def measured_over_modeled(self) -> float:
        return self.measured_ratio / self.modeled_ratio

    @property
    def cached_measured_over_modeled(self) -> float | None:
        return _over(self.cached_measured_ratio, self.cached_modeled_ratio)

    @property
    def loo_measured_over_modeled(self) -> float | None:
        return _over(self.measured_ratio, self.loo_modeled_ratio)

    @property
    def cached_loo_measured_over_modeled(self) -> float | None:
        return _over(self.cached_measured_ratio, self.cached_loo_modeled_ratio)


@dataclass
class AloneTiming:
    """Time per iteration with only unit ``frozen_unit`` FROZEN, every other unit in TRAIN."""

    frozen_unit: int
    seconds_per_iteration: float
    measured_ratio: float
    modeled_ratio: float
    flop_ratio: float = 1.0
    loo_modeled_ratio: float | None = None

    @property
    def measured_speedup(self) -> float:
        return 1.0 / self.measured_ratio

    @property
    def measured_over_modeled(self) -> float:
        return self.measured_ratio / self.modeled_ratio

    @property
    def loo_measured_over_modeled(self) -> float | None:
        return _over(self.measured_ratio, self.loo_modeled_ratio)


@dataclass
class Profile:
    task: str
    device: str
    batch_size: int
    repetitions: int
    units: list[dict]
    depths: list[DepthTiming]
    alone: list[AloneTiming] = field(default_factory=list)
    """unit k alone FROZEN in the middle of training units (no cache): its weight gradient and
    optimizer step go, the gradient still flows through it"""
    constants: CostConstants = field(default_factory=CostConstants)
    """the fitted device constants (FLOP-equivalents)"""
    seconds_per_flop: float = 0.0
    """seconds per FLOP-equivalent of the fit"""
    fixed_fraction: float = 0.0
    """the share of the modeled all-TRAIN iteration that no mode removes (the ``fixed`` term)"""
    term_shares: dict[str, float] = field(default_factory=dict)
    """each term's share of the modeled all-TRAIN iteration"""
    clock: str = "wall time"
    """what was timed: the process's CPU time (single-threaded CPU runs) or the wall time"""
    samples: dict[str, list[float]] = field(default_factory=dict)
    """every timed repetition (seconds per iteration by ``clock``), by variant ("k": k leading
    units frozen; "k cached": the same served from the cache; "k alone": only unit k frozen)"""
    wall_samples: dict[str, list[float]] = field(default_factory=dict)
    """the same in wall time"""
    terms: dict[str, dict[str, float]] = field(default_factory=dict)
    """each variant's term counts"""

    def rows(self) -> list[dict]:
        """One row per measured variant: each prefix depth, then its cached variant; then the
        units frozen alone."""
        rows = []

        def row(label, frozen, cached, seconds, speedup, measured, modeled, over, loo) -> dict:
            return {
                "variant": label,
                "frozen": frozen,
                "cached": cached,
                "seconds": seconds,
                "measured_speedup": speedup,
                "measured_ratio": measured,
                "modeled_ratio": modeled,
                "measured_over_modeled": over,
                "loo_measured_over_modeled": loo,
            }

        for d in self.depths:
            k = d.frozen_units
            rows.append(
                row(
                    f"{k} frozen",
                    k,
                    False,
                    d.seconds_per_iteration,
                    d.measured_speedup,
                    d.measured_ratio,
                    d.modeled_ratio,
                    d.measured_over_modeled,
                    d.loo_measured_over_modeled,
                )
            )
            if d.cached_seconds_per_iteration is not None:
                rows.append(
                    row(
                        f"{k} frozen, cached",
                        k,
                        True,
                        d.cached_seconds_per_iteration,
                        d.cached_measured_speedup,
                        d.cached_measured_ratio,
                        d.cached_modeled_ratio,
                        d.cached_measured_over_modeled,
                        d.cached_loo_measured_over_modeled,
                    )
                )
        for a in self.alone:
            rows.append(
                row(
                    f"only unit {a.frozen_unit} frozen",
                    None,
                    False,
                    a.seconds_per_iteration,
                    a.measured_speedup,
                    a.measured_ratio,
                    a.modeled_ratio,
                    a.measured_over_modeled,
                    a.loo_measured_over_modeled,
                )
            )
        return rows

    @property
    def measured_over_modeled_range(self) -> tuple[float, float] | None:
        """Smallest and largest measured/modeled over all variants (fitted on all of them)."""
        values = [r["measured_over_modeled"] for r in self.rows()[1:]]
        return (min(values), max(values)) if values else None

    @property
    def loo_measured_over_modeled_range(self) -> tuple[float, float] | None:
        """The same, each variant predicted by a fit to the others."""
        values = [r["loo_measured_over_modeled"] for r in self.rows()[1:]]
        values = [v for v in values if v is not None]
        return (min(values), max(values)) if values else None

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "device": self.device,
            "batch_size": self.batch_size,
            "repetitions": self.repetitions,
            "clock": self.clock,
            "constants": self.constants.as_dict(),
            "seconds_per_flop": self.seconds_per_flop,
            "fixed_fraction": self.fixed_fraction,
            "term_shares": self.term_shares,
            "measured_over_modeled_range": self.measured_over_modeled_range,
            "loo_measured_over_modeled_range": self.loo_measured_over_modeled_range,
            "units": self.units,
            "depths": [
                {
                    **d.__dict__,
                    "measured_speedup": d.measured_speedup,
                    "cached_measured_speedup": d.cached_measured_speedup,
                    "measured_over_modeled": d.measured_over_modeled,
                    "cached_measured_over_modeled": d.cached_measured_over_modeled,
                    "loo_measured_over_modeled": d.loo_measured_over_modeled,
                    "cached_loo_measured_over_modeled": d.cached_loo_measured_over_modeled,
                }
                for d in self.depths
            ],
            "alone": [
                {
                    **a.__dict__,
                    "measured_over_modeled": a.measured_over_modeled,
                    "loo_measured_over_modeled": a.loo_measured_over_modeled,
                }
                for a in self.alone
            ],
            "terms": self.terms,
            "samples": self.samples,
            "wall_samples": self.wall_samples,
        }


def fit_profile(
    terms: Mapping[str, Mapping[str, float]],
    seconds: Mapping[str, float],
    batch_size: int,
    fit: Sequence[str] = TERMS,
    base: str = BASE,
    prior: float = 1e-3,
) -> tuple[Fit, dict[str, float], dict[str, float]]:
    """Constants fitted to every variant, and each variant's modeled time ratio to the ``base``
    (all-TRAIN) variant: in sample, and leave-one-out (fitted to the other variants, the base
    among them)."""
    variants = list(seconds)

    def fitted(chosen: Sequence[str]) -> Fit:
        # the base is the denominator of every ratio: its squared relative error weighs as
        # much as all the other variants' together
        anchor = max(len(chosen) - 1, 1) ** 0.5
        return fit_constants(
            [terms[v] for v in chosen],
            [seconds[v] for v in chosen],
            batch_size,
            fit,
            [anchor if v == base else 1.0 for v in chosen],
            prior,
        )

    def ratio(chosen: Fit, variant: str) -> float:
        return chosen.seconds(terms[variant]) / chosen.seconds(terms[base])

    whole = fitted(variants)
    in_sample = {v: ratio(whole, v) for v in variants}
    loo = {v: ratio(fitted([w for w in variants if w != v]), v) for v in variants if v != base}
    return whole, in_sample, loo


def profile_task(
    task: Task,
    *,
    seed: int = 0,
    repetitions: int = 5,
    iterations: int = 3,
    device: str | None = None,
    fit: Sequence[str] = TERMS,
    alone: bool = True,
) -> Profile:
    """Time ``iterations`` training iterations per frozen-prefix depth, with and without the
    activation cache, and (``alone``) with each unit but the first frozen alone, ``repetitions``
    times, all variants interleaved in every repetition; fit the cost model's constants (``fit``
    names the terms to fit, the others are held at 0)."""
    trainer = Trainer(task, seed, device=device, signals=False, cache=False)
    controller, model, optimizer = trainer.controller, trainer.model, trainer.optimizer
    rows = torch.arange(task.batch_size, device=trainer.device)
    inputs, targets = trainer.train_split.batch(rows)
    units = controller.units
    n = len(units)
    cache = PrefixCache(
        model, units, task.batch_size, deterministic_data=True, device=trainer.device
    )
    all_train = [Mode.TRAIN] * n
    plans: dict[str, tuple[list[Mode], int]] = {}  # label: (modes, cached prefix)
    for k in range(n):
        plans[str(k)] = ([Mode.FROZEN] * k + [Mode.TRAIN] * (n - k), 0)
    for k in range(1, n):
        if units[k - 1].is_cut_point:
            plans[f"{k} cached"] = (plans[str(k)][0], k)
    for k in range(1, n if alone else 1):  # unit 0 alone is the depth-1 prefix
        plans[f"{k} alone"] = ([Mode.FROZEN if i == k else Mode.TRAIN for i in range(n)], 0)

    def iteration(cached: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        outputs = cache.forward(inputs, rows) if cached else call_model(model, inputs)
        trainer.loss_of(outputs, targets).backward()
        optimizer.step()

    samples: dict[str, list[float]] = {v: [] for v in plans}
    wall_samples: dict[str, list[float]] = {v: [] for v in plans}
    failed: set[str] = set()
    # Single-threaded on the CPU, the process's CPU time is the wall time the iteration would
    # take on a machine of its own: other processes taking the core do not inflate it.
    cpu_clock = trainer.device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.process_time if cpu_clock else time.perf_counter
    model.train()
    try:
        for _ in range(repetitions):
            for label, (modes, cached_prefix) in plans.items():
                if label in failed:
                    continue
                cached = cached_prefix > 0
                controller.set_modes(modes)
                cache.update(modes if cached else all_train)
                for _ in range(3 if cached else 1):  # warm-up; fills and verifies the cache
                    iteration(cached)
                if cached and cache.stats().state != "serving":
                    failed.add(label)
                    continue
                trainer._synchronize()
                started, started_wall = clock(), time.perf_counter()
                for _ in range(iterations):
                    iteration(cached)
                trainer._synchronize()
                samples[label].append((clock() - started) / iterations)
                wall_samples[label].append((time.perf_counter() - started_wall) / iterations)
    finally:
        cache.close()
        trainer.close()

    seconds = {v: min(s) for v, s in samples.items() if s and v not in failed}
    terms = {v: iteration_terms(units, *plans[v], task.batch_size) for v in seconds}
    whole, modeled, loo = fit_profile(terms, seconds, task.batch_size, fit)
    full_terms = terms[BASE]
    full_cost = sum(getattr(whole.constants, t) * full_terms[t] for t in TERMS)
    shares = {t: getattr(whole.constants, t) * full_terms[t] / full_cost for t in TERMS}

    def measured(label: str) -> float:
        return seconds[label] / seconds[BASE]

    depths = []
    for k in range(n):
        label, cached = str(k), f"{k} cached"
        timing = DepthTiming(
            frozen_units=k,
            seconds_per_iteration=seconds[label],
            measured_ratio=measured(label),
            modeled_ratio=modeled[label],
            flop_ratio=cost_ratio(units, *plans[label]),
            loo_modeled_ratio=loo.get(label),
        )
        if cached in seconds:
            timing.cached_seconds_per_iteration = seconds[cached]
            timing.cached_measured_ratio = measured(cached)
            timing.cached_modeled_ratio = modeled[cached]
            timing.cached_flop_ratio = cost_ratio(units, *plans[cached])
            timing.cached_loo_modeled_ratio = loo.get(cached)
        depths.append(timing)
    alone_timings = [
        AloneTiming(
            frozen_unit=int(label.split()[0]),
            seconds_per_iteration=seconds[label],
            measured_ratio=measured(label),
            modeled_ratio=modeled[label],
            flop_ratio=cost_ratio(units, *plans[label]),
            loo_modeled_ratio=loo.get(label),
        )
        for label in seconds
        if label.endswith("alone")
    ]
    return Profile(
        task=task.name,
        device=str(trainer.device),
        batch_size=task.batch_size,
        repetitions=repetitions,
        units=[describe_unit(u) for u in units],
        depths=depths,
        alone=alone_timings,
        constants=whole.constants,
        seconds_per_flop=whole.seconds_per_flop,
        fixed_fraction=shares["fixed"],
        term_shares=shares,
        clock="process CPU time" if cpu_clock else "wall time",
        samples={v: s for v, s in samples.items() if s},
        wall_samples={v: s for v, s in wall_samples.items() if s},
        terms=terms,
    )
