"""Training tasks: model + data + optimizer + schedule + budget, written as YAML in ``envs/``.

A task spec looks like this (every key but ``dataset``, ``model`` and ``epochs`` has a default)::

    description: 6-block 1-D CNN on MNIST-1D
    dataset: {name: mnist1d, n_train: 10000, n_val: 1000, n_test: 2000}
    model: {family: cnn1d, depth: 6, channels: 64}
    optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}
    schedule: {name: cosine, warmup_epochs: 0}
    batch_size: 128
    epochs: 15
    decisions: 30

The task's name is its file name without ``.yaml``; its split (train / val / heldout) is the
folder it lies in. ``load_task`` accepts a name (searched in ``envs/``) or a path.

``model`` and ``dataset`` can name your own code instead of a built-in family or dataset, by
import path, so that policies train and bench on your models and data::

    dataset: {factory: "my_project.data:make_dataset", kwargs: {rows: 4096}, split_seed: 0}
    model: {factory: "my_project.models:make_model", kwargs: {width: 128}}

- ``model: {factory, kwargs}`` replaces ``family`` and its hyper-parameters (exactly one of
  ``family`` and ``factory``). The factory is called as ``factory(input_shape=...,
  num_classes=..., vocab_size=..., **kwargs)``, with the dataset's facts that a family gets too,
  and must return an ``nn.Module`` (``freeze_agent.tasks.models``: ``check_model``).
- ``dataset: {factory, kwargs, split_seed}`` replaces ``name``, the split sizes and ``options``
  (the factory decides the sizes: pass what it needs in ``kwargs``). It is called as
  ``factory(**kwargs)`` with Python's, NumPy's and torch's global generators seeded with
  ``split_seed`` (default 0), and must return a ``freeze_agent.tasks.data.Dataset``
  (``check_dataset`` lists the contract: three non-empty splits of tensors, int64 targets...).
- ``factory`` is ``"package.module:callable"`` (the callable may be a dotted attribute,
  ``"pkg.mod:Class.build"``), imported from ``sys.path``: an installed package or a folder on
  ``PYTHONPATH`` (the spec's own folder is not searched). ``kwargs`` (default ``{}``) is a
  mapping of plain data (strings, numbers, booleans, null, lists, mappings with string keys).
- The path and kwargs are part of ``Task.fingerprint``, so the caches keyed by it (oracle
  schedules, reference trajectories) tell them apart; the factory's code is not, so after
  changing what a factory returns, change a kwarg or clear those caches. ``Task.family`` and
  ``dataset.name`` are the factory path, which is what listings show.
- When: reading a spec checks its keys, the path's form and the kwargs without importing
  anything, so listing tasks runs no user code; the module is imported and the factory called
  when the task is built (``Task.load_data`` and ``Task.build_model``, which ``Trainer`` calls).
  Either way a problem is a ``TaskSpecError`` naming the spec file, the key and what to do; only
  a factory raising ``DatasetUnavailableError`` or ``ImportError`` (data or a package missing on
  this machine) keeps that type, with the spec named, so that callers that skip unavailable
  tasks skip it too.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
import math
import os
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from freeze_agent.core.resources import ENVS_DIR

SPLITS = ("train", "val", "heldout")
DEFAULT_TASK = "mnist1d-cnn"
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = ("constant", "cosine", "linear", "step")
FACTORY_FORM = '"package.module:callable"'
MODEL_FACTORY_KEYS = ("factory", "kwargs")
DATASET_FACTORY_KEYS = ("factory", "kwargs", "split_seed")


class TaskSpecError(ValueError):
    """A task spec with a missing, unknown or invalid entry; the message names it."""


@dataclass(frozen=True)
class DatasetSpec:
    """A task's ``dataset`` entry: a built-in dataset (``name``, the split sizes, ``options``)
    or a factory (``factory``, ``kwargs``; ``name`` is then the factory path and the sizes are
    None, since the factory decides them)."""

    name: str
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    split_seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class ScheduleSpec:
    name: str = "cosine"
    warmup_epochs: float = 0.0
    step_epochs: float = 0.0  # for "step": decay by `gamma` every `step_epochs`
    gamma: float = 0.1


@dataclass(frozen=True)
class Task:
    """One training task, as read from its YAML spec."""

    name: str
    split: str
    path: Path
    dataset: DatasetSpec
    model: dict[str, Any]
    epochs: int
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    batch_size: int = 128
    decisions: int = 30
    description: str = ""

    @property
    def family(self) -> str:
        """The model family, or the import path of the model's factory."""
        return str(self.model.get("family", self.model.get("factory")))

    def fingerprint(self) -> str:
        """A hash of the spec's content (not its name or location), to key cached results by.

        It covers the factory paths and kwargs of a spec that has them. For a built-in dataset
        the (empty) factory fields are left out, so that specs written before factories existed
        keep their fingerprint and the results already cached under it.
        """
        content = {k: v for k, v in asdict(self).items() if k not in ("name", "path", "split")}
        if self.dataset.factory is None:
            for key in ("factory", "kwargs"):
                del content["dataset"][key]
        text = json.dumps(content, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ building

    def load_data(self):
        """The task's dataset (``freeze_agent.tasks.data.Dataset``).

        A dataset factory is imported and called here (under ``seeded_rngs(split_seed)``) and
        what it returns is checked (``check_dataset``, and enough training rows for one batch);
        a problem is a ``TaskSpecError`` naming the spec and ``dataset``.
        """
        from freeze_agent.tasks.data import check_dataset, load_dataset, seeded_rngs

        d = self.dataset
        if d.factory is None:
            return load_dataset(
                d.name,
                n_train=d.n_train,
                n_val=d.n_val,
                n_test=d.n_test,
                split_seed=d.split_seed,
                **d.options,
            )
        where = f"{self.path}: dataset"
        factory = _import_factory(d.factory, where)
        with seeded_rngs(d.split_seed):
            result = _call_factory(factory, d.factory, dict(d.kwargs), where, "factory(**kwargs)")
        try:
            dataset = check_dataset(result)
        except ValueError as error:
            raise TaskSpecError(f"{where}: factory {d.factory!r} returned {error}") from None
        self._check_train_rows(dataset)
        return dataset

    def _check_train_rows(self, dataset) -> None:
        """Refuse a factory's dataset with fewer training rows than one batch (the trainer
        would take no step at all); a built-in dataset's ``n_train`` is checked when read."""
        if self.dataset.factory is not None and len(dataset.train) < self.batch_size:
            raise TaskSpecError(
                f"{self.path}: batch_size {self.batch_size} exceeds the {len(dataset.train)} "
                f"training rows that dataset factory {self.dataset.factory!r} returned"
            )

    def build_model(self, dataset) -> torch.nn.Module:
        """A fresh model for ``dataset``, from the task's family or its model factory.

        The factory gets ``input_shape``, ``num_classes`` and ``vocab_size`` from ``dataset``
        and its ``kwargs``; it is imported and called here, and a problem (or a result that is
        not a trainable ``nn.Module``) is a ``TaskSpecError`` naming the spec and ``model``.
        """
        from freeze_agent.tasks.models import build_model, check_model

        if "factory" in self.model:
            self._check_train_rows(dataset)
            where, path = f"{self.path}: model", self.model["factory"]
            factory = _import_factory(path, where)
            facts = {
                "input_shape": tuple(dataset.input_shape),
                "num_classes": dataset.num_classes,
                "vocab_size": dataset.vocab_size,
            }
            call = (
                "factory(input_shape=..., num_classes=..., vocab_size=..., **kwargs) (let it "
                "take the facts it does not use as **_, or wrap a library class in a function)"
            )
            result = _call_factory(factory, path, {**facts, **self.model["kwargs"]}, where, call)
            try:
                return check_model(result)
            except ValueError as error:
                raise TaskSpecError(f"{where}: factory {path!r} returned {error}") from None
        hyper = {k: v for k, v in self.model.items() if k != "family"}
        try:
            return build_model(
                self.family,
                input_shape=dataset.input_shape,
                num_classes=dataset.num_classes,
                vocab_size=dataset.vocab_size,
                **hyper,
            )
        except ValueError as error:
            raise TaskSpecError(f"{self.path}: model: {error}") from error

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        o = self.optimizer
        params = model.parameters()
        if o.name == "sgd":
            return torch.optim.SGD(
                params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
            )
        return OPTIMIZERS[o.name](params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)

    def build_schedule(
        self, optimizer: torch.optim.Optimizer, steps_per_epoch: int
    ) -> torch.optim.lr_scheduler.LambdaLR:
        """A per-step learning-rate schedule (multiplier of the base learning rate)."""
        s = self.schedule
        total = self.epochs * steps_per_epoch
        warmup = int(s.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(total - warmup, 1)
            if s.name == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
            if s.name == "linear":
                return max(1.0 - t, 0.0)
            if s.name == "step":
                return s.gamma ** int(step / max(s.step_epochs * steps_per_epoch, 1))
            return 1.0

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------- reading specs


def envs_dir() -> Path:
    """The task-spec folder: $FREEZE_AGENT_ENVS, else the shipped ``envs/`` (``ENVS_DIR``)."""
    if "FREEZE_AGENT_ENVS" in os.environ:
        return Path(os.environ["FREEZE_AGENT_ENVS"])
    return ENVS_DIR


def list_tasks(split: str | None = None) -> list[Task]:
    """Every task spec in ``envs/`` (or in one split of it), sorted by split then name."""
    splits = SPLITS if split is None else (split,)
    return [load_task(path) for s in splits for path in sorted((envs_dir() / s).glob("*.yaml"))]


TaskSource = str | Path | Task


def resolve_tasks(tasks: TaskSource | Sequence[TaskSource]) -> list[Task]:
    """Tasks from a Task, a task name, a YAML path, a folder of specs or a split name
    ("train", "val", "heldout"), or a list of these."""
    if isinstance(tasks, (str, Path, Task)):
        tasks = [tasks]
    resolved: list[Task] = []
    for source in tasks:
        if isinstance(source, Task):
            resolved.append(source)
        elif isinstance(source, str) and source in SPLITS and not Path(source).is_dir():
            resolved.extend(load_task(p) for p in resolve_task_paths(envs_dir() / source))
        else:
            resolved.extend(load_task(p) for p in resolve_task_paths(source))
    if not resolved:
        raise ValueError(f"no task specs found in {tasks!r}")
    return resolved


def resolve_task_paths(spec: str | Path) -> list[Path]:
    """A task name, a YAML path or a folder of YAML files → the spec files it names."""
    path = Path(spec)
    if path.is_dir():
        return sorted(path.glob("*.yaml"))
    return [_find_task(spec)]


def _find_task(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"no task spec at {path}")
        return path
    matches = [envs_dir() / s / f"{name_or_path}.yaml" for s in SPLITS]
    found = [m for m in matches if m.is_file()]
    if not found:
        known = ", ".join(t.name for t in list_tasks()) or "(none)"
        raise FileNotFoundError(
            f"no task named {name_or_path!r} in {envs_dir()}; known tasks: {known}"
        )
    return found[0]


def load_task(name_or_path: str | Path) -> Task:
    """Read and validate one task spec, by name (searched in ``envs/``) or path."""
    path = _find_task(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TaskSpecError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise TaskSpecError(f"{path}: a task spec is a mapping of keys to values")
    split = path.parent.name if path.parent.name in SPLITS else "custom"
    return parse_task(raw, path, split)


def parse_task(raw: dict[str, Any], path: Path, split: str = "custom") -> Task:
    """The task a spec's mapping describes; a ``TaskSpecError`` names the first entry that is
    missing, unknown or of the wrong kind (``path`` names the task and the messages)."""
    if not isinstance(raw, dict):
        raise TaskSpecError(f"{path}: a task spec is a mapping of keys to values")
    where = str(path)
    _check_keys(
        raw, Task, where, skip=("name", "split", "path"), required=("dataset", "model", "epochs")
    )
    from freeze_agent.tasks.data import DATASETS
    from freeze_agent.tasks.models import FAMILIES, MODEL_FACTORY_ARGUMENTS, hyper_defaults

    dataset_raw = _mapping(raw["dataset"], f"{where}: dataset")
    if "factory" in dataset_raw:
        dataset_raw = _parse_factory(
            dataset_raw, f"{where}: dataset", "name", DATASET_FACTORY_KEYS, reserved=()
        )
        dataset_raw["name"] = dataset_raw["factory"]
    else:
        _check_keys(
            dataset_raw,
            DatasetSpec,
            f"{where}: dataset",
            skip=("factory", "kwargs"),
            required=("name", "n_train", "n_val", "n_test"),
            alternative=("name", f"or 'factory' (an import path {FACTORY_FORM})"),
        )
    _check_types(raw, Task, where)
    _check_types(dataset_raw, DatasetSpec, f"{where}: dataset")
    model = _mapping(raw["model"], f"{where}: model")
    if "factory" in model:
        model = _parse_factory(
            model, f"{where}: model", "family", MODEL_FACTORY_KEYS, MODEL_FACTORY_ARGUMENTS
        )
    elif "family" not in model:
        raise TaskSpecError(
            f"{where}: model: missing required key 'family' (a model family: "
            f"{', '.join(FAMILIES)}) or 'factory' (an import path {FACTORY_FORM})"
        )
    elif not isinstance(model["family"], str):
        raise TaskSpecError(f"{where}: model: family must be a name, got {model['family']!r}")

    if dataset_raw.get("factory") is None and dataset_raw["name"] not in DATASETS:
        raise TaskSpecError(
            f"{where}: dataset: name {dataset_raw['name']!r} is not a dataset; "
            f"choose one of {', '.join(DATASETS)}"
        )
    if "family" in model and model["family"] not in FAMILIES:
        raise TaskSpecError(
            f"{where}: model: family {model['family']!r} is not a model family; "
            f"choose one of {', '.join(FAMILIES)}"
        )
    if "family" in model:
        unknown = sorted(set(model) - {"family"} - set(hyper_defaults(model["family"])))
        if unknown:
            valid = ", ".join(f"{k}={v!r}" for k, v in hyper_defaults(model["family"]).items())
            raise TaskSpecError(
                f"{where}: model: unknown hyper-parameter {unknown[0]!r} for family "
                f"{model['family']!r}; valid: {valid}"
            )
    optimizer_raw = _mapping(raw.get("optimizer", {}), f"{where}: optimizer")
    _check_keys(optimizer_raw, OptimizerSpec, f"{where}: optimizer")
    _check_types(optimizer_raw, OptimizerSpec, f"{where}: optimizer")
    schedule_raw = _mapping(raw.get("schedule", {}), f"{where}: schedule")
    _check_keys(schedule_raw, ScheduleSpec, f"{where}: schedule")
    _check_types(schedule_raw, ScheduleSpec, f"{where}: schedule")
    if "betas" in optimizer_raw:
        optimizer_raw["betas"] = tuple(optimizer_raw["betas"])
    task = Task(
        name=path.stem,
        split=split,
        path=path,
        dataset=DatasetSpec(**dataset_raw),
        model=dict(model),
        epochs=raw["epochs"],
        optimizer=OptimizerSpec(**optimizer_raw),
        schedule=ScheduleSpec(**schedule_raw),
        batch_size=raw.get("batch_size", 128),
        decisions=raw.get("decisions", 30),
        description=raw.get("description", ""),
    )
    _check_values(task, where)
    return task


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TaskSpecError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _check_keys(
    raw: dict[str, Any],
    cls: type,
    where: str,
    skip: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    alternative: tuple[str, str] | None = None,
) -> None:
    """Refuse a key ``cls`` lacks (or one in ``skip``) and a missing ``required`` one;
    ``alternative`` is (a required key, what may replace it), added to its message."""
    allowed = [f for f in cls.__dataclass_fields__ if f not in skip]
    for key in raw:
        if key not in allowed:
            raise TaskSpecError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
    for key in required:
        if key not in raw:
            extra = f" {alternative[1]}" if alternative and alternative[0] == key else ""
            raise TaskSpecError(f"{where}: missing required key {key!r}{extra}")


# ---------------------------------------------------------------------- factories


def _parse_factory(
    raw: dict[str, Any],
    where: str,
    rival: str,
    allowed: tuple[str, ...],
    reserved: tuple[str, ...],
) -> dict[str, Any]:
    """A ``{factory, kwargs, ...}`` entry, checked without importing anything: only the keys
    ``allowed``, not together with ``rival`` (the built-in alternative), a factory path of the
    form "package.module:callable" and kwargs of plain data that avoid the ``reserved`` names
    the caller passes itself. Returns the entry with ``kwargs`` filled in (``{}``) and copied,
    so an omitted and an empty ``kwargs`` give the same task and fingerprint."""
    if rival in raw:
        raise TaskSpecError(
            f"{where}: give either {rival!r} (built in) or 'factory' (your own code), not both"
        )
    for key in raw:
        if key not in allowed:
            raise TaskSpecError(
                f"{where}: unknown key {key!r} with a factory; allowed keys: "
                f"{', '.join(allowed)} (pass what the factory needs under kwargs)"
            )
    path = raw["factory"]
    if not isinstance(path, str):
        raise TaskSpecError(f"{where}: factory must be an import path {FACTORY_FORM}, got {path!r}")
    module, colon, attribute = path.partition(":")
    if not colon or not _dotted(module) or not _dotted(attribute):
        raise TaskSpecError(
            f"{where}: factory {path!r} is not an import path {FACTORY_FORM}: a dotted module "
            'name, a colon, then the callable\'s name in it, e.g. "my_project.models:build"'
        )
    kwargs = raw.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise TaskSpecError(
            f"{where}: kwargs must be a mapping of argument names to values (or left out), "
            f"got {kwargs!r}"
        )
    for name, value in kwargs.items():
        if not isinstance(name, str):
            raise TaskSpecError(f"{where}: kwargs: argument names must be strings, got {name!r}")
        if name in reserved:
            raise TaskSpecError(
                f"{where}: kwargs: {name!r} is passed to the factory from the dataset "
                f"(so are {', '.join(r for r in reserved if r != name)}); remove it from kwargs"
            )
        bad = _not_plain(value)
        if bad is not _PLAIN:
            raise TaskSpecError(
                f"{where}: kwargs: {name!r} must be plain data (strings, numbers, booleans, "
                f"null, lists and mappings with string keys), but holds {bad!r}"
            )
    return {**raw, "kwargs": copy.deepcopy(kwargs)}


_PLAIN = object()


def _not_plain(value: Any) -> Any:
    """The first part of ``value`` that is not plain data, or ``_PLAIN``: kwargs go into the
    fingerprint and the trainer's data-cache key as JSON, so they must be what JSON keeps."""
    if value is None or isinstance(value, (str, int, float)):  # bool is an int
        return _PLAIN
    if isinstance(value, (list, tuple)):
        for item in value:
            bad = _not_plain(item)
            if bad is not _PLAIN:
                return bad
        return _PLAIN
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return key
            bad = _not_plain(item)
            if bad is not _PLAIN:
                return bad
        return _PLAIN
    return value


def _dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _import_factory(path: str, where: str) -> Callable[..., Any]:
    """The callable that ``path`` ("package.module:callable") names, imported now; a
    ``TaskSpecError`` (naming ``where``) says which module could not be imported and why, which
    attribute is missing or that it is not callable."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TaskSpecError(
            f"{where}: cannot import module {module_name!r} of factory {path!r} "
            f"({type(error).__name__}: {error}); install it, or add the folder that holds it "
            "to PYTHONPATH"
        ) from error
    except Exception as error:
        raise TaskSpecError(
            f"{where}: importing module {module_name!r} of factory {path!r} raised "
            f"{type(error).__name__}: {error}"
        ) from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            defined = sorted(
                name
                for name, value in vars(module).items()
                if callable(value)
                and not name.startswith("_")
                and getattr(value, "__module__", None) == module.__name__
            )
            shown = ", ".join(defined[:12]) + (", ..." if len(defined) > 12 else "")
            listing = f"; callables defined there: {shown}" if defined else ""
            raise TaskSpecError(
                f"{where}: module {module_name!r} has no attribute {attribute!r} "
                f"(factory {path!r}){listing}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise TaskSpecError(
            f"{where}: factory {path!r} is {type(target).__name__} {target!r:.60}, not a callable"
        )
    return target


def _call_factory(
    factory: Callable[..., Any], path: str, arguments: dict[str, Any], where: str, call: str
) -> Any:
    """``factory(**arguments)``, with what can go wrong turned into errors naming ``where``:
    arguments its signature does not take (``call`` shows how factories are called), and any
    exception it raises, chained. ``DatasetUnavailableError`` and ``ImportError`` keep their
    type (data or a package missing here, which callers may skip), the others become a
    ``TaskSpecError``."""
    from freeze_agent.tasks.data import DatasetUnavailableError

    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have none: let the call itself tell
        signature = None
    if signature is not None:
        try:
            signature.bind(**arguments)
        except TypeError as error:
            raise TaskSpecError(
                f"{where}: factory {path!r} does not take the arguments it is called with "
                f"({error}); it is called as {call}"
            ) from None
    try:
        return factory(**arguments)
    except DatasetUnavailableError as error:
        raise DatasetUnavailableError(f"{where}: factory {path!r}: {error}") from error
    except ImportError as error:
        raise ImportError(f"{where}: factory {path!r}: {error}") from error
    except Exception as error:
        raise TaskSpecError(
            f"{where}: factory {path!r} raised {type(error).__name__}: {error}"
        ) from error


def _check_types(raw: dict[str, Any], cls: type, where: str) -> None:
    """Refuse a value of the wrong kind before it reaches a comparison or a constructor (the
    integer counts are checked, with their range, by ``_check_values``)."""
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        kind = hints.get(key)
        if kind is None or typing.get_origin(kind) is dict or kind is dict:
            continue
        if kind is str:
            ok = isinstance(value, str)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif typing.get_origin(kind) is tuple:
            ok = isinstance(value, (list, tuple)) and len(value) == len(typing.get_args(kind))
            ok = ok and all(_is_number(v) for v in value)
        else:
            continue
        if not ok:
            expected = {str: "a string", float: "a number"}.get(
                kind, f"{len(typing.get_args(kind))} numbers"
            )
            hint = " (YAML reads 5e-4 as text: write 5.0e-4)" if isinstance(value, str) else ""
            raise TaskSpecError(f"{where}: {key} must be {expected}, got {value!r}{hint}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_values(task: Task, where: str) -> None:
    def positive_int(value: Any, key: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TaskSpecError(f"{where}: {key} must be a positive integer, got {value!r}")

    def non_negative(value: Any, key: str) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            hint = ""
            if isinstance(value, str):
                hint = " (YAML reads 5e-4 as text: write 5.0e-4)"
            raise TaskSpecError(
                f"{where}: {key} must be a non-negative number, got {value!r}{hint}"
            )

    positive_int(task.epochs, "epochs")
    positive_int(task.batch_size, "batch_size")
    positive_int(task.decisions, "decisions")
    seed = task.dataset.split_seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise TaskSpecError(f"{where}: dataset: split_seed must be an integer >= 0, got {seed!r}")
    if task.dataset.factory is None:
        for key in ("n_train", "n_val", "n_test"):
            positive_int(getattr(task.dataset, key), f"dataset: {key}")
    if task.dataset.factory is None and task.batch_size > task.dataset.n_train:
        raise TaskSpecError(
            f"{where}: batch_size {task.batch_size} exceeds dataset n_train {task.dataset.n_train}"
        )
    if task.optimizer.name not in OPTIMIZERS:
        raise TaskSpecError(
            f"{where}: optimizer: name {task.optimizer.name!r} is not supported; "
            f"choose one of {', '.join(OPTIMIZERS)}"
        )
    if task.schedule.name not in SCHEDULES:
        raise TaskSpecError(
            f"{where}: schedule: name {task.schedule.name!r} is not supported; "
            f"choose one of {', '.join(SCHEDULES)}"
        )
    if task.schedule.name == "step" and task.schedule.step_epochs <= 0:
        raise TaskSpecError(f"{where}: schedule: a step schedule needs step_epochs > 0")
    for key in ("lr", "momentum", "weight_decay"):
        non_negative(getattr(task.optimizer, key), f"optimizer: {key}")
    if task.optimizer.lr <= 0:
        raise TaskSpecError(f"{where}: optimizer: lr must be positive, got {task.optimizer.lr}")
    non_negative(task.schedule.warmup_epochs, "schedule: warmup_epochs")
    if not isinstance(task.dataset.options, dict):
        raise TaskSpecError(f"{where}: dataset: options must be a mapping")
