"""Property tests of the task-spec loader, where outside data enters: any mapping gives a task or
a ``TaskSpecError`` that says what is wrong, never another exception."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freeze_agent.tasks.spec import TaskSpecError, parse_task

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


VALID = {
    "dataset": {"name": "digits", "n_train": 256, "n_val": 64, "n_test": 64, "split_seed": 0},
    "model": {"family": "cnn2d", "depth": 3, "channels": 8},
    "optimizer": {"name": "adamw", "lr": 3.0e-3, "betas": [0.9, 0.99]},
    "schedule": {"name": "step", "step_epochs": 1.0, "gamma": 0.5},
    "batch_size": 32,
    "epochs": 2,
    "decisions": 6,
    "description": "tiny",
}
PLACES = (
    [(key,) for key in VALID]
    + [
        (section, key)
        for section, entries in VALID.items()
        if isinstance(entries, dict)
        for key in entries
    ]
    + [("dataset", "options"), ("model", "width"), ("stray",)]
)


@st.composite
def mutated_specs(draw) -> dict:
    """A valid spec with a few entries replaced by arbitrary values or removed: the loader's
    checks are reached one level deep, where a wrong type would otherwise crash them."""
    spec = {k: dict(v) if isinstance(v, dict) else v for k, v in VALID.items()}
    for place in draw(st.lists(st.sampled_from(PLACES), min_size=1, max_size=3)):
        parent = spec
        for key in place[:-1]:
            parent = parent.get(key) if isinstance(parent.get(key), dict) else None
            if parent is None:
                break
        if parent is None:
            continue
        if draw(st.booleans()) and place[-1] in parent:
            del parent[place[-1]]
        else:
            parent[place[-1]] = draw(VALUES)
    return spec


SPECS = st.one_of(VALUES, mutated_specs())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SPECS)
def test_any_mapping_gives_a_task_or_a_task_spec_error(raw):
    try:
        task = parse_task(raw, Path("generated.yaml"))
    except TaskSpecError as error:
        assert str(error).startswith("generated.yaml")
    else:
        assert task.epochs >= 1 and task.batch_size <= task.dataset.n_train
