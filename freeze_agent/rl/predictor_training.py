"""Train SmartFRZ's attention predictor offline (Li et al., ICLR 2023).

Labels come from representational similarity, as in the paper: a full training run is
recorded, and unit ``u`` counts as converged at decision ``t`` when the linear CKA between its
output at ``t`` and the final model's unit-``u`` output on a fixed probe batch reaches a
threshold and stays there for the rest of the run (``collect_examples``).
``train_predictor`` collects such runs on the training tasks, fits the predictor with a
class-balanced loss and reports accuracy on held-out tasks. The predictor itself (network,
weight sampling, loading) is ``freeze_agent.signals.predictor``; recording runs needs the
Trainer, which is why this half lives above the task layer.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from freeze_agent.core.units import Unit, call_model, preserved_state, tensors_in
from freeze_agent.signals.predictor import (
    CARD_FILE,
    HISTORY,
    SAMPLER_SEED,
    SNAPSHOT_SIZE,
    AttentionPredictor,
    WeightSampler,
    save_predictor,
)
from freeze_agent.tasks.spec import Task, load_task, resolve_tasks

PROBE_SIZE = 256  # training samples on which unit outputs are compared (CKA labels)
CKA_THRESHOLD = 0.99  # linear CKA with the final output above which a unit counts as converged
DECISIONS = 30  # decision intervals per recorded run, as in the task specs
EPOCHS = 60
BATCH_SIZE = 128
WEIGHT_DECAY = 1e-2


_CACHE_VERSION = 1  # bump when the recorded content of a run changes


# --------------------------------------------------------------------------- CKA labels


class RunDivergedError(RuntimeError):
    """A recorded run's loss went non-finite, so its final model defines no labels."""


def _centered_gram(x: torch.Tensor) -> torch.Tensor:
    """The centered Gram matrix of (n, d) features, scaled to unit Frobenius norm (float64).

    Linear CKA is the inner product of two of these, so a run stores one (n, n) matrix per unit
    and interval instead of the activations themselves."""
    x = x.reshape(x.shape[0], -1).double()
    x = x - x.mean(0, keepdim=True)
    gram = x @ x.T
    return gram / gram.norm().clamp_min(1e-30)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two activations of the same n samples, (n, d1) and
    (n, d2): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centered X, Y. It is 1
    for identical representations and invariant to orthogonal transforms and isotropic scaling;
    a constant activation gives 0."""
    return float((_centered_gram(x) * _centered_gram(y)).sum())


def converged_labels(cka: torch.Tensor, threshold: float) -> torch.Tensor:
    """(times, n_units) CKA with the final output → 0/1 labels: 1 from the first time after
    which the CKA never again falls below ``threshold`` (so labels never go back to 0)."""
    above = (cka >= threshold).long()
    return above.flip(0).cumprod(0).flip(0)


@torch.no_grad()
def _unit_grams(model: nn.Module, units: Sequence[Unit], inputs: Any) -> torch.Tensor:
    """(n_units, n, n) normalized Gram matrices of every unit's output on ``inputs``, computed in
    eval mode without a trace on the model (train/eval flags, buffers and RNG are restored)."""
    outputs: dict[int, torch.Tensor] = {}

    def capture(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            tensor = next(t for t in tensors_in(output) if t.is_floating_point())
            outputs.setdefault(index, tensor)

        return hook

    handles = [u.exit_module.register_forward_hook(capture(u.index)) for u in units]
    try:
        with preserved_state(model):
            model.eval()
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([_centered_gram(outputs[u.index]).float().cpu() for u in units])


def _record_run(task: Task, seed: int, decisions: int, size: int, probe_size: int) -> dict:
    """Train ``task`` fully (every unit in TRAIN) and record, before the first interval and after
    each one, the weight snapshot and each unit's CKA with its final output.

    Returns ``snapshots`` (times, n_units, size) and ``cka`` (times, n_units); time 0 is the
    initialization, the last time the end of the run.
    """
    from freeze_agent.tasks.trainer import Trainer

    trainer = Trainer(task, seed, decisions=decisions, signals=False)
    try:
        sampler = WeightSampler(trainer.units, size, seed=SAMPLER_SEED)
        rows = torch.arange(min(probe_size, len(trainer.train_split)), device=trainer.device)
        probe, _ = trainer.train_split.batch(rows)
        snapshots = [sampler.snapshot()]
        grams = [_unit_grams(trainer.model, trainer.units, probe)]
        while not trainer.done:
            trainer.run_interval()
            snapshots.append(sampler.snapshot())
            grams.append(_unit_grams(trainer.model, trainer.units, probe))
    finally:
        trainer.close()
    if trainer.diverged:
        raise RunDivergedError(f"{task.name} seed {seed} diverged: no convergence labels")
    final = grams[-1]
    cka = torch.stack([(g * final).sum((-2, -1)) for g in grams]).clamp(0.0, 1.0)
    return {"snapshots": torch.stack(snapshots), "cka": cka.float()}


def _cache_path(folder: Path, task: Task, seed: int, decisions: int, size: int, probe: int) -> Path:
    key = f"{task.fingerprint()}-s{seed}-d{decisions}-n{size}-p{probe}-v{_CACHE_VERSION}"
    return folder / f"{task.name}-{key}.safetensors"


def _recorded_run(
    task: Task, seed: int, decisions: int, size: int, probe: int, cache: Path | None
) -> dict[str, torch.Tensor]:
    """``_record_run``, read from / written to ``cache`` (a folder) when one is given."""
    path = None if cache is None else _cache_path(Path(cache), task, seed, decisions, size, probe)
    if path is not None and path.is_file():
        return load_file(path)
    run = _record_run(task, seed, decisions, size, probe)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(run, path, metadata={"task": task.name, "seed": str(seed)})
    return run


def _windows(snapshots: torch.Tensor, history: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictor inputs at each decision time ``k`` (every time but the last): the last
    ``history`` snapshots up to ``k``, left-padded with zeros, exactly what ``WeightHistory``
    holds at that decision. Returns inputs (times-1, n_units, history, size) and the mask of real
    positions (times-1, n_units, history)."""
    times, n_units, size = snapshots.shape
    inputs = torch.zeros(times - 1, n_units, history, size)
    mask = torch.zeros(times - 1, n_units, history, dtype=torch.bool)
    for k in range(times - 1):
        window = snapshots[max(0, k - history + 1) : k + 1].transpose(0, 1)
        inputs[k, :, history - window.shape[1] :] = window
        mask[k, :, history - window.shape[1] :] = True
    return inputs, mask


def task_id(task: Task) -> int:
    """A stable integer id of a task's content (its fingerprint), for example bookkeeping."""
    return int(task.fingerprint()[:12], 16)


def collect_examples(
    task: Task | str | Path,
    seed: int,
    *,
    decisions: int = DECISIONS,
    cka_threshold: float = CKA_THRESHOLD,
    history: int = HISTORY,
    size: int = SNAPSHOT_SIZE,
    probe_size: int = PROBE_SIZE,
    cache: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """Labelled predictor inputs from one full training run of ``task`` (every unit trains).

    One example per unit and decision (the start of every interval, as a policy sees it): the
    weight history up to then and whether the unit has converged by SmartFRZ's
    representational-similarity rule (``converged_labels``). The run itself is cached in
    ``cache`` (a folder) when given, keyed by the task's content, seed and sizes; the threshold is
    applied afterwards, so trying thresholds costs no training.

    Returns ``inputs`` (N, history, size), ``mask`` (N, history) of real positions, ``length``
    (N,), ``labels`` (N,) 0/1, ``cka`` (N,) at that decision, and ids ``task``, ``seed``,
    ``unit``, ``interval`` (N,). Examples are ordered by interval, then unit.
    """
    task = task if isinstance(task, Task) else load_task(task)
    run = _recorded_run(task, seed, decisions, size, probe_size, cache)
    snapshots, cka = run["snapshots"], run["cka"]
    times, n_units, _ = snapshots.shape
    inputs, mask = _windows(snapshots, history)
    labels = converged_labels(cka, cka_threshold)[:-1]
    n = (times - 1) * n_units
    return {
        "inputs": inputs.reshape(n, history, size),
        "mask": mask.reshape(n, history),
        "length": mask.reshape(n, history).sum(-1),
        "labels": labels.reshape(n),
        "cka": cka[:-1].reshape(n),
        "task": torch.full((n,), task_id(task), dtype=torch.long),
        "seed": torch.full((n,), seed, dtype=torch.long),
        "unit": torch.arange(n_units).repeat(times - 1),
        "interval": torch.arange(times - 1).repeat_interleave(n_units),
    }


# --------------------------------------------------------------------------- training


def _concat(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


@torch.no_grad()
def _predict(model: AttentionPredictor, examples: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    batches = zip(examples["inputs"].split(512), examples["mask"].split(512), strict=True)
    return torch.cat([model(x, m).argmax(-1) for x, m in batches])


def _scores(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and balanced accuracy (mean recall over the classes present)."""
    recalls = [
        float((predicted[labels == c] == c).float().mean()) for c in (0, 1) if (labels == c).any()
    ]
    return {
        "examples": int(labels.numel()),
        "positive_fraction": float(labels.float().mean()),
        "accuracy": float((predicted == labels).float().mean()),
        "balanced_accuracy": sum(recalls) / len(recalls),
    }


def _metrics(
    model: AttentionPredictor, examples: dict[str, torch.Tensor], names: dict[int, str]
) -> dict[str, Any]:
    """Scores over all examples and per task."""
    predicted = _predict(model, examples)
    per_task = {
        names[tid]: _scores(
            predicted[examples["task"] == tid], examples["labels"][examples["task"] == tid]
        )
        for tid in examples["task"].unique().tolist()
    }
    return {**_scores(predicted, examples["labels"]), "per_task": per_task}


def _progress_baseline(
    train: dict[str, torch.Tensor], heldout: dict[str, torch.Tensor] | None
) -> dict[str, Any]:
    """The predictor's yardstick: "converged from decision k on" with the k that fits the
    training labels best (balanced accuracy), scored on the held-out examples. A predictor that
    reads the weights should at least match what the elapsed time alone tells."""
    decisions = int(train["interval"].max()) + 1

    def fit(k: int) -> float:
        return _scores((train["interval"] >= k).long(), train["labels"])["balanced_accuracy"]

    best = max(range(decisions + 1), key=fit)
    heldout_scores = None
    if heldout is not None:
        heldout_scores = _scores((heldout["interval"] >= best).long(), heldout["labels"])
    return {"from_decision": best, "train_balanced_accuracy": fit(best), "heldout": heldout_scores}


def _class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights so both classes weigh the same in the loss (0 for an absent
    class)."""
    counts = torch.bincount(labels, minlength=2).float()
    return torch.where(counts > 0, labels.numel() / (2 * counts.clamp_min(1)), 0.0)


def _shuffle_entries(inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Permute the snapshot entries of each example (the same permutation for all its
    snapshots). Which weights a snapshot holds is a random choice of the sampler, so their order
    carries no information; training on random orders makes the encoder read the distribution
    of drifts instead of memorizing which position of which training unit moved. Without it
    the predictor fits its training units perfectly and is near chance on held-out tasks."""
    order = torch.rand(inputs.shape[0], inputs.shape[-1], generator=generator).argsort(-1)
    return inputs.gather(-1, order[:, None, :].expand_as(inputs))


def _fit(
    examples: dict[str, torch.Tensor],
    *,
    epochs: int,
    lr: float,
    seed: int,
    size: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> AttentionPredictor:
    """Train a fresh predictor with AdamW on a class-balanced cross-entropy, the snapshot
    entries of every example shuffled anew in every epoch (``_shuffle_entries``)."""
    torch.manual_seed(seed)
    model = AttentionPredictor(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    weights = _class_weights(examples["labels"])
    generator = torch.Generator().manual_seed(seed)
    n = examples["labels"].numel()
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for batch in torch.randperm(n, generator=generator).split(BATCH_SIZE):
            inputs = _shuffle_entries(examples["inputs"][batch], generator)
            logits = model(inputs, examples["mask"][batch])
            loss = F.cross_entropy(logits, examples["labels"][batch], weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * batch.numel()
        if on_epoch is not None:
            on_epoch(epoch, total / n)
    return model.eval()


def _versions() -> dict[str, str]:
    packages = ("freeze-agent", "torch", "numpy", "safetensors")
    versions = {"python": platform.python_version()}
    for name in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def _default_cache() -> Path:
    from freeze_agent.tasks.data import cache_dir

    return cache_dir() / "smartfrz"


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )


def _collect_all(
    tasks: Sequence[Task],
    seeds: Sequence[int],
    options: dict[str, Any],
    progress: Any,
    skipped: list[dict[str, str]],
) -> list[dict[str, torch.Tensor]]:
    """``collect_examples`` for every task and seed; a task whose data (or a package it needs)
    is not installed is skipped with a printed note and listed in ``skipped``, and so is a run
    that diverges."""
    from freeze_agent.tasks.data import DatasetUnavailableError

    bar = progress.add_task("collecting", total=len(tasks) * len(seeds))
    parts = []
    for task in tasks:
        for seed in seeds:
            progress.update(bar, description=f"recording {task.name} seed {seed}")
            try:
                parts.append(collect_examples(task, seed, **options))
            except RunDivergedError as error:
                progress.console.print(f"[yellow]skipping[/] {error}")
                skipped.append({"task": task.name, "seed": str(seed), "reason": str(error)})
            except (DatasetUnavailableError, ImportError) as error:
                progress.console.print(f"[yellow]skipping {task.name}[/]: {error}")
                skipped.append({"task": task.name, "reason": str(error)})
                progress.advance(bar, len(seeds) - list(seeds).index(seed))
                break
            progress.advance(bar)
    return parts


def _as_tasks(tasks: Sequence[Task | str | Path]) -> list[Task]:
    return resolve_tasks(list(tasks)) if tasks else []


def train_predictor(
    train_tasks: Sequence[Task | str | Path],
    val_tasks: Sequence[Task | str | Path],
    out: str | Path,
    *,
    seeds: Sequence[int] = (0,),
    epochs: int = EPOCHS,
    lr: float = 1e-3,
    seed: int = 0,
    cka_threshold: float = CKA_THRESHOLD,
    decisions: int = DECISIONS,
    size: int = SNAPSHOT_SIZE,
    probe_size: int = PROBE_SIZE,
    cache: str | Path | None = None,
) -> dict[str, Any]:
    """Collect labelled runs of ``train_tasks`` and ``val_tasks`` (every seed), train the
    predictor on the former, score it on the latter (held out: never trained on) and write
    ``out/predictor.safetensors`` and ``out/card.json``. Returns the card.

    Recorded runs are cached in ``cache`` (default ``~/.cache/freeze-agent/smartfrz``), so a
    rerun with another threshold or number of epochs trains no task again.
    """
    started = time.perf_counter()
    train_tasks, val_tasks = _as_tasks(train_tasks), _as_tasks(val_tasks)
    names = {task_id(t): t.name for t in [*train_tasks, *val_tasks]}
    options = {
        "decisions": decisions,
        "cka_threshold": cka_threshold,
        "size": size,
        "probe_size": probe_size,
        "cache": _default_cache() if cache is None else Path(cache),
    }
    skipped: list[dict[str, str]] = []
    with _progress_bar() as progress:
        train_parts = _collect_all(train_tasks, seeds, options, progress, skipped)
        val_parts = _collect_all(val_tasks, seeds, options, progress, skipped)
        if not train_parts:
            raise ValueError("no training task could be recorded (see the notes above)")
        train, val = _concat(train_parts), _concat(val_parts) if val_parts else None
        bar = progress.add_task("training predictor", total=epochs)

        def on_epoch(epoch: int, loss: float) -> None:
            progress.update(bar, advance=1, description=f"training predictor (loss {loss:.3f})")

        model = _fit(train, epochs=epochs, lr=lr, seed=seed, size=size, on_epoch=on_epoch)

    skipped_names = {s["task"] for s in skipped if "seed" not in s}  # whole tasks only
    card = {
        "name": "smartfrz",
        "description": "SmartFRZ attention-based freezing predictor: per-unit weight-snapshot "
        "history -> probability that the unit has converged and can freeze",
        "labels": {
            "rule": "unit converged at a decision when the linear CKA of its output with the "
            "final model's output (probe batch of training samples, eval mode) is >= threshold "
            "from then to the end of the run",
            "cka_threshold": cka_threshold,
            "probe_size": probe_size,
            "decisions": decisions,
        },
        "training": {
            "tasks": {t.name: t.fingerprint() for t in train_tasks if t.name not in skipped_names},
            "heldout_tasks": {
                t.name: t.fingerprint() for t in val_tasks if t.name not in skipped_names
            },
            "seeds": list(seeds),
            "epochs": epochs,
            "optimizer": {"name": "adamw", "lr": lr, "weight_decay": WEIGHT_DECAY},
            "batch_size": BATCH_SIZE,
            "loss": "class-balanced cross-entropy (inverse class frequency)",
            "augmentation": "snapshot entries shuffled per example and epoch",
            "seed": seed,
            "skipped": skipped,
        },
        "metrics": {
            "train": _metrics(model, train, names),
            "heldout": _metrics(model, val, names) if val is not None else None,
            "progress_baseline": _progress_baseline(train, val),
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    save_predictor(model, out, card)
    return json.loads((Path(out) / CARD_FILE).read_text())
