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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import typing
from collections.abc import Sequence
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


class TaskSpecError(ValueError):
    """A task spec with a missing, unknown or invalid entry; the message names it."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    n_train: int
    n_val: int
    n_test: int
    split_seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


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
        return str(self.model["family"])

    def fingerprint(self) -> str:
        """A hash of the spec's content (not its name or location), to key cached results by."""
        content = {k: v for k, v in asdict(self).items() if k not in ("name", "path", "split")}
        text = json.dumps(content, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ building

    def load_data(self):
        """The task's dataset (``freeze_agent.tasks.data.Dataset``)."""
        from freeze_agent.tasks.data import load_dataset

        d = self.dataset
        return load_dataset(
            d.name,
            n_train=d.n_train,
            n_val=d.n_val,
            n_test=d.n_test,
            split_seed=d.split_seed,
            **d.options,
        )

    def build_model(self, dataset) -> torch.nn.Module:
        from freeze_agent.tasks.models import build_model

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
    """The task-spec folder: $FREEZE_AGENT_ENVS, else ``envs/`` of the source checkout."""
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
    dataset_raw = _mapping(raw["dataset"], f"{where}: dataset")
    _check_keys(
        dataset_raw,
        DatasetSpec,
        f"{where}: dataset",
        required=("name", "n_train", "n_val", "n_test"),
    )
    _check_types(raw, Task, where)
    _check_types(dataset_raw, DatasetSpec, f"{where}: dataset")
    model = _mapping(raw["model"], f"{where}: model")
    if "family" not in model:
        raise TaskSpecError(f"{where}: model: missing required key 'family'")
    if not isinstance(model["family"], str):
        raise TaskSpecError(f"{where}: model: family must be a name, got {model['family']!r}")

    from freeze_agent.tasks.data import DATASETS
    from freeze_agent.tasks.models import FAMILIES, hyper_defaults

    if dataset_raw["name"] not in DATASETS:
        raise TaskSpecError(
            f"{where}: dataset: name {dataset_raw['name']!r} is not a dataset; "
            f"choose one of {', '.join(DATASETS)}"
        )
    if model["family"] not in FAMILIES:
        raise TaskSpecError(
            f"{where}: model: family {model['family']!r} is not a model family; "
            f"choose one of {', '.join(FAMILIES)}"
        )
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
) -> None:
    allowed = [f for f in cls.__dataclass_fields__ if f not in skip]
    for key in raw:
        if key not in allowed:
            raise TaskSpecError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")
    for key in required:
        if key not in raw:
            raise TaskSpecError(f"{where}: missing required key {key!r}")


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
    for key in ("n_train", "n_val", "n_test"):
        positive_int(getattr(task.dataset, key), f"dataset: {key}")
    seed = task.dataset.split_seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise TaskSpecError(f"{where}: dataset: split_seed must be an integer >= 0, got {seed!r}")
    if task.batch_size > task.dataset.n_train:
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
