"""Task specs that name their model and dataset by import path: they parse without importing
anything, build and train like built-in ones, and each way of getting them wrong is a clear
error naming the spec file, the key and what to do."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import custom_factories
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freeze_agent import LinearPrefix, Trainer
from freeze_agent.tasks.data import DatasetUnavailableError
from freeze_agent.tasks.spec import TaskSpecError, load_task, parse_task

SPEC = """
description: tiny custom net on custom blobs
dataset: {factory: "custom_factories:blobs", kwargs: {rows: 320, classes: 3}, split_seed: 1}
model: {factory: "custom_factories:tiny_net", kwargs: {width: 16, depth: 3}}
optimizer: {name: adamw, lr: 1.0e-2}
batch_size: 32
epochs: 2
decisions: 4
"""
MODEL = 'model: {factory: "custom_factories:tiny_net", kwargs: {width: 16, depth: 3}}'
DATASET = (
    'dataset: {factory: "custom_factories:blobs", kwargs: {rows: 320, classes: 3}, split_seed: 1}'
)
BUILTIN_DATASET = "dataset: {name: digits, n_train: 256, n_val: 64, n_test: 64}"


def write_spec(tmp_path: Path, text: str, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def with_model(model: str) -> str:
    return SPEC.replace(MODEL, f"model: {model}")


def with_dataset(dataset: str) -> str:
    return SPEC.replace(DATASET, f"dataset: {dataset}")


def test_factory_spec_parses_builds_and_trains(tmp_path):
    task = load_task(write_spec(tmp_path, SPEC))
    assert task.model == {
        "factory": "custom_factories:tiny_net",
        "kwargs": {"width": 16, "depth": 3},
    }
    assert task.family == task.model["factory"]  # what listings show
    assert task.dataset.name == task.dataset.factory == "custom_factories:blobs"
    assert task.dataset.kwargs == {"rows": 320, "classes": 3} and task.dataset.split_seed == 1
    assert task.dataset.n_train is None  # the factory decides the sizes

    custom_factories.CALLS.clear()
    trainer = Trainer(task, seed=0, device="cpu")
    assert isinstance(trainer.model, custom_factories.TinyNet)
    assert custom_factories.CALLS == [
        {"input_shape": (1, 8), "num_classes": 3, "vocab_size": None, "width": 16, "depth": 3}
    ]
    assert len(trainer.units) >= 4  # stem, three blocks, head
    result = trainer.run(LinearPrefix(0.3))
    assert result.steps == trainer.total_steps == 2 * (192 // 32)
    assert not result.diverged and all(np.isfinite(result.losses))
    assert result.timeline[-1]["modes"].startswith("F")  # the policy froze a prefix
    assert result.val_accuracy > 0.5  # blobs are easy: chance is 1/3
    # The reference worker unpickled TinyNet in its own process and measured plasticity.
    assert result.signals["plasticity_fraction"] > 0


def test_factory_dataset_is_seeded_by_split_seed_and_leaves_global_rngs_alone(tmp_path):
    task = load_task(write_spec(tmp_path, SPEC))
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first, second = task.load_data(), task.load_data()
    assert torch.equal(first.train.inputs, second.train.inputs)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    other = load_task(write_spec(tmp_path, SPEC.replace("split_seed: 1", "split_seed: 2"), "b"))
    assert not torch.equal(other.load_data().train.inputs, first.train.inputs)


def test_fingerprint_covers_factory_path_and_kwargs(tmp_path):
    base = load_task(write_spec(tmp_path, SPEC)).fingerprint()

    def fingerprint(text: str) -> str:
        return load_task(write_spec(tmp_path, text, "variant")).fingerprint()

    assert fingerprint(SPEC) == base  # not the name or the location
    assert fingerprint(SPEC.replace("width: 16", "width: 17")) != base
    assert fingerprint(SPEC.replace("rows: 320", "rows: 321")) != base
    assert fingerprint(SPEC.replace("split_seed: 1", "split_seed: 2")) != base
    assert fingerprint(SPEC.replace("custom_factories:tiny_net", "custom_factories:other")) != base
    assert fingerprint(SPEC.replace("custom_factories:blobs", "custom_factories:other")) != base
    no_kwargs = with_model('{factory: "custom_factories:tiny_net"}')
    assert fingerprint(no_kwargs) == fingerprint(no_kwargs.replace('net"}', 'net", kwargs: {}}'))


def test_factory_model_on_builtin_dataset_and_builtin_model_on_factory_dataset(tmp_path):
    mixed = SPEC.replace(DATASET, BUILTIN_DATASET).replace(
        MODEL, 'model: {factory: "custom_factories:tiny_net", kwargs: {width: 8}}'
    )
    task = load_task(write_spec(tmp_path, mixed))
    data = task.load_data()
    model = task.build_model(data)
    assert model(data.train.inputs[:4]).shape == (4, 10)
    other = load_task(write_spec(tmp_path, with_model("{family: cnn1d, depth: 2, channels: 8}")))
    data = other.load_data()
    assert other.build_model(data)(data.train.inputs[:4]).shape == (4, 3)


# ------------------------------------------------------------------ refused when read


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            with_model('{family: mlp, factory: "custom_factories:tiny_net"}'),
            "model: give either 'family' \\(built in\\) or 'factory' \\(your own code\\), not both",
        ),
        (
            with_dataset('{name: digits, factory: "custom_factories:blobs"}'),
            "dataset: give either 'name' \\(built in\\) or 'factory'",
        ),
        (with_model("{width: 16}"), "model: missing required key 'family' .* or 'factory'"),
        (with_dataset("{kwargs: {rows: 3}}"), "dataset: unknown key 'kwargs'; allowed keys"),
        (with_dataset("{n_train: 3}"), "dataset: missing required key 'name' or 'factory'"),
        (
            with_model('{factory: "custom_factories:tiny_net", depth: 3}'),
            "model: unknown key 'depth' with a factory; allowed keys: factory, kwargs "
            "\\(pass what the factory needs under kwargs\\)",
        ),
        (
            with_dataset('{factory: "custom_factories:blobs", n_train: 100}'),
            "dataset: unknown key 'n_train' with a factory; allowed keys: factory, kwargs, "
            "split_seed",
        ),
        (with_model("{factory: 3}"), 'model: factory must be an import path "package.module:'),
        (with_model("{factory: null}"), "model: factory must be an import path .* got None"),
        (
            with_model('{factory: "custom_factories.tiny_net"}'),
            "model: factory 'custom_factories.tiny_net' is not an import path "
            '"package.module:callable": a dotted module name, a colon',
        ),
        (with_model('{factory: ":tiny_net"}'), "factory ':tiny_net' is not an import path"),
        (with_model('{factory: "pkg..mod:f"}'), "factory 'pkg..mod:f' is not an import path"),
        (with_model('{factory: "mod:f()"}'), "factory 'mod:f\\(\\)' is not an import path"),
        (
            with_dataset('{factory: "custom_factories:blobs", kwargs: [1, 2]}'),
            "dataset: kwargs must be a mapping of argument names to values .* got \\[1, 2\\]",
        ),
        (
            with_model('{factory: "custom_factories:tiny_net", kwargs: {1: 2}}'),
            "model: kwargs: argument names must be strings, got 1",
        ),
        (
            with_model('{factory: "custom_factories:tiny_net", kwargs: {num_classes: 5}}'),
            "model: kwargs: 'num_classes' is passed to the factory from the dataset "
            "\\(so are input_shape, vocab_size\\); remove it from kwargs",
        ),
        (
            with_model('{factory: "custom_factories:tiny_net", kwargs: {since: 2020-01-02}}'),
            "model: kwargs: 'since' must be plain data .* but holds datetime.date\\(2020, 1, 2\\)",
        ),
        (
            with_dataset('{factory: "custom_factories:blobs", split_seed: -1}'),
            "dataset: split_seed must be an integer >= 0, got -1",
        ),
    ],
)
def test_bad_factory_entry_is_refused_when_read(tmp_path, text, message):
    with pytest.raises(TaskSpecError, match=message) as error:
        load_task(write_spec(tmp_path, text))
    assert str(error.value).startswith(str(tmp_path / "tiny.yaml"))


def test_reading_a_spec_imports_nothing(tmp_path):
    """A spec naming a module that does not exist still reads: importing is for building."""
    task = load_task(write_spec(tmp_path, with_model('{factory: "no_such_module:build"}')))
    assert task.family == "no_such_module:build"


# ------------------------------------------------------------------ refused when built


def build(task):
    return task.build_model(task.load_data())


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            '{factory: "no_such_module.models:build"}',
            "model: cannot import module 'no_such_module.models' of factory "
            "'no_such_module.models:build' \\(ModuleNotFoundError: No module named "
            "'no_such_module'\\); install it, or add the folder that holds it to PYTHONPATH",
        ),
        (
            '{factory: "custom_factories:tiny_nett"}',
            "model: module 'custom_factories' has no attribute 'tiny_nett' \\(factory "
            "'custom_factories:tiny_nett'\\); callables defined there: .*tiny_net",
        ),
        (
            '{factory: "custom_factories:TinyNet.build"}',
            "module 'custom_factories' has no attribute 'TinyNet.build'",
        ),
        (
            '{factory: "custom_factories:NOT_CALLABLE"}',
            "model: factory 'custom_factories:NOT_CALLABLE' is int 42, not a callable",
        ),
        (
            '{factory: "custom_factories:strict_net", kwargs: {width: 4}}',
            "model: factory 'custom_factories:strict_net' does not take the arguments it is "
            "called with \\(got an unexpected keyword argument 'input_shape'\\); it is called as "
            "factory\\(input_shape=..., num_classes=..., vocab_size=..., \\*\\*kwargs\\)",
        ),
        (
            '{factory: "custom_factories:tiny_net", kwargs: {heads: 4}}',
            "unexpected keyword argument 'heads'",
        ),
        (
            '{factory: "custom_factories:raising"}',
            "model: factory 'custom_factories:raising' raised RuntimeError: the factory broke",
        ),
        (
            '{factory: "custom_factories:returns_dict"}',
            "model: factory 'custom_factories:returns_dict' returned a builtins.dict, not a "
            "torch.nn.Module",
        ),
        (
            '{factory: "custom_factories:frozen_net"}',
            "model: factory 'custom_factories:frozen_net' returned a Linear with no trainable "
            "parameters",
        ),
    ],
)
def test_bad_model_factory_is_refused_when_built(tmp_path, model, message):
    task = load_task(write_spec(tmp_path, with_model(model)))
    with pytest.raises(TaskSpecError, match=message) as error:
        build(task)
    assert str(error.value).startswith(str(tmp_path / "tiny.yaml"))


@pytest.mark.parametrize(
    ("flaw", "message"),
    [
        ("not_a_dataset", "returned a builtins.tuple, not a freeze_agent.tasks.data.Dataset"),
        ("missing_split", "returned a dataset whose val split is None, not a Split"),
        ("numpy_inputs", "test inputs are a numpy.ndarray, not a torch.Tensor"),
        ("float_targets", "val targets have dtype torch.float32; they must be int64"),
        ("labels_out_of_range", "val targets run from 3 to 5, outside \\[0, num_classes=3\\)"),
        ("input_shape", "train inputs have per-sample shape \\(1, 8\\), but its input_shape"),
        ("empty_test", "test split has no rows"),
        ("dtype_mismatch", "val inputs differ from the train inputs in keys or dtype"),
        ("task_type", "task_type 'regression'; it must be one of 'classification'"),
        (
            "rows",
            "raised ValueError: inputs and targets must have the same number of rows, "
            "got 64 input rows and 63 targets",
        ),
        ("small_train", "batch_size 32 exceeds the 8 training rows that dataset factory"),
    ],
)
def test_bad_dataset_factory_is_refused_when_built(tmp_path, flaw, message):
    dataset = f'{{factory: "custom_factories:flawed_blobs", kwargs: {{flaw: {flaw}}}}}'
    task = load_task(write_spec(tmp_path, with_dataset(dataset)))
    with pytest.raises(TaskSpecError, match=message) as error:
        task.load_data()
    assert str(error.value).startswith(str(tmp_path / "tiny.yaml"))
    assert "custom_factories:flawed_blobs" in str(error.value)


def test_factory_exception_is_chained_and_module_errors_named(tmp_path, monkeypatch):
    task = load_task(write_spec(tmp_path, with_model('{factory: "custom_factories:raising"}')))
    with pytest.raises(TaskSpecError) as error:
        build(task)
    assert isinstance(error.value.__cause__, RuntimeError)

    (tmp_path / "exploding_factories.py").write_text("raise RuntimeError('bad import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = with_dataset('{factory: "exploding_factories:make"}')
    with pytest.raises(TaskSpecError, match="importing module 'exploding_factories' of factory"):
        load_task(write_spec(tmp_path, spec)).load_data()


def test_missing_data_or_package_keeps_its_type(tmp_path):
    """Callers skip tasks whose data or packages are not installed (by these two types): a
    factory that says so is skipped the same way, with the spec named."""
    dataset = with_dataset('{factory: "custom_factories:missing_data"}')
    with pytest.raises(DatasetUnavailableError, match=r"tiny\.yaml: dataset: .*apt-get install"):
        load_task(write_spec(tmp_path, dataset)).load_data()
    model = with_model('{factory: "custom_factories:needs_package"}')
    with pytest.raises(ImportError, match=r"tiny\.yaml: model: .*a_package_that_is_not_installed"):
        build(load_task(write_spec(tmp_path, model)))


# ------------------------------------------------------------------ any mapping


FACTORY_VALID = {
    "dataset": {"factory": "custom_factories:blobs", "kwargs": {"rows": 64}, "split_seed": 0},
    "model": {"factory": "custom_factories:tiny_net", "kwargs": {"width": 8}},
    "batch_size": 16,
    "epochs": 1,
}
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(), st.text(max_size=12)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
PLACES = [
    ("dataset", "factory"),
    ("dataset", "kwargs"),
    ("dataset", "split_seed"),
    ("dataset", "name"),
    ("dataset", "n_train"),
    ("model", "factory"),
    ("model", "kwargs"),
    ("model", "family"),
    ("model", "width"),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PLACES), VALUES), min_size=1, max_size=3))
def test_any_factory_entry_gives_a_task_or_a_task_spec_error(changes):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in FACTORY_VALID.items()}
    for (section, key), value in changes:
        raw[section][key] = value
    try:
        task = parse_task(raw, Path("generated.yaml"))
    except TaskSpecError as error:
        assert str(error).startswith("generated.yaml")
    else:
        assert task.fingerprint()
