"""Property tests of the observation builder, where measured signals enter: whatever values the
signals take (finite, huge, negative, NaN, infinite), every feature lies inside the observation
space, over a whole run of checks."""

from __future__ import annotations

import math

import numpy as np
import torch
from helpers import conv_chain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freeze_agent.core.modes import Mode
from freeze_agent.core.units import partition
from freeze_agent.signals.dynamics import UnitDynamics
from freeze_agent.signals.observation import ObservationBuilder, Signals, observation_space

UNITS = partition(conv_chain(depth=3), torch.randn(4, 1, 16))
N = len(UNITS)
MAX_UNITS = 8
SPACE = observation_space(MAX_UNITS)

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -1.0, 1e-30, 1e30, math.inf, -math.inf, math.nan]
)
PER_UNIT = st.lists(ANY_FLOAT, min_size=N, max_size=N)
DYNAMICS = st.lists(
    st.builds(
        UnitDynamics,
        grad_l1=ANY_FLOAT,
        grad_change=ANY_FLOAT,
        weight_change=ANY_FLOAT,
        grad_to_weight=ANY_FLOAT,
        age=st.integers(-3, 10**6),
    ),
    min_size=N,
    max_size=N,
)
SIGNALS = st.builds(
    Signals,
    steps_in_mode=st.lists(st.integers(-5, 10**9), min_size=N, max_size=N),
    dynamics=DYNAMICS,
    plasticity=st.none() | PER_UNIT,
    plasticity_trend=st.none() | PER_UNIT,
    plasticity_age=st.integers(-3, 10**6),
    attention=st.none() | PER_UNIT,
    reference_available=st.booleans(),
    predictor_available=st.booleans(),
    interval_losses=st.lists(ANY_FLOAT, max_size=8),
)
CHECK = st.tuples(
    SIGNALS,
    st.lists(st.sampled_from(list(Mode)), min_size=N, max_size=N),
    ANY_FLOAT,  # progress
    ANY_FLOAT,  # lr_ratio
    ANY_FLOAT,  # cost_ratio
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(CHECK, min_size=1, max_size=4), st.sampled_from([None, 0, 100]))
def test_any_signal_values_give_an_observation_inside_the_space(checks, total_steps):
    builder = ObservationBuilder(UNITS, MAX_UNITS, total_steps)
    for signals, modes, progress, lr_ratio, cost_ratio in checks:
        observation = builder.build(
            modes, signals, progress=progress, lr_ratio=lr_ratio, cost_ratio=cost_ratio
        )
        assert SPACE.contains(observation), {k: v.tolist() for k, v in observation.items()}
        assert all(np.isfinite(v).all() for v in observation.values())
        assert observation["mask"].sum() == N
