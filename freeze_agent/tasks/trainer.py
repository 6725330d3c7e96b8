"""Train a task, one decision interval at a time.

The Trainer owns the model, data, optimizer, schedule and a FreezeController. Between two
decisions it runs one *interval* of optimizer steps; a policy (or the Gymnasium environment)
sets the modes before each interval. Each epoch visits the training set in an order fixed by the
seed, so the same seed and the same decisions give the same losses on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from freeze_agent.controller import FreezeController
from freeze_agent.core.checks import require_int
from freeze_agent.core.modes import Mode
from freeze_agent.core.prefix_cache import PrefixCache
from freeze_agent.core.units import call_model
from freeze_agent.policies.base import Policy
from freeze_agent.tasks.spec import Task

EVAL_BATCH = 512
PARTITION_ROWS = 8  # rows of the example batch used to partition the model and count FLOPs
PROBE_BATCH = 32  # fixed training rows on which plasticity is measured


@dataclass
class IntervalReport:
    """What one interval of training did."""

    start_step: int
    steps: int
    modes: list[Mode]
    cost_ratio: float
    seconds: float
    mean_loss: float
    finite: bool


@dataclass
class RunResult:
    """Everything a finished run reports (``to_dict`` is the CLI's ``--json``)."""

    task: str
    seed: int
    policy: str
    device: str
    epochs: int
    steps: int
    wall_time: float
    modeled_cost_ratio: float
    val_loss: float
    val_accuracy: float
    test_accuracy: float
    diverged: bool
    cache: dict[str, Any]
    units: list[dict[str, Any]]
    timeline: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    signals: dict[str, Any] = field(default_factory=dict)  # FreezeController.signal_report

    @property
    def modeled_speedup(self) -> float:
        return 1.0 / self.modeled_cost_ratio if self.modeled_cost_ratio > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["modeled_speedup"] = self.modeled_speedup
        return out


_DATASETS: dict[str, Any] = {}


def _dataset(task: Task):
    """The task's dataset, loaded once per process (episodes of one task share it)."""
    key = json.dumps(dataclasses.asdict(task.dataset), sort_keys=True)
    if key not in _DATASETS:
        if len(_DATASETS) >= 8:
            _DATASETS.pop(next(iter(_DATASETS)))
        _DATASETS[key] = task.load_data()
    return _DATASETS[key]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """Trains ``task`` from ``seed``; ``run_interval`` advances one decision interval."""

    def __init__(
        self,
        task: Task,
        seed: int = 0,
        *,
        device: str | torch.device | None = None,
        epochs: int | None = None,
        decisions: int | None = None,
        max_units: int = 32,
        cache: bool = True,
        cache_memory_bytes: int = 1 << 30,
        **controller_options: Any,
    ) -> None:
        require_int("seed", seed, 0)
        for name, value in (("epochs", epochs), ("decisions", decisions), ("max_units", max_units)):
            if value is not None:
                require_int(name, value, 1)
        self.task, self.seed = task, seed
        self.device = torch.device(device) if device is not None else default_device()
        self.epochs = task.epochs if epochs is None else epochs
        data = _dataset(task)
        self.data = data
        self.train_split = data.train.to(self.device)
        self.val_split = data.val.to(self.device)
        self.test_split = data.test.to(self.device)
        self.language_modeling = data.task_type == "language_modeling"

        torch.manual_seed(seed)
        self.model = task.build_model(data).to(self.device)
        self.optimizer = task.build_optimizer(self.model)
        self.steps_per_epoch = len(self.train_split) // task.batch_size
        self.total_steps = self.epochs * self.steps_per_epoch
        self.schedule = task.build_schedule(self.optimizer, self.steps_per_epoch)
        n_decisions = task.decisions if decisions is None else decisions
        self.interval = max(1, math.ceil(self.total_steps / n_decisions))
        rows = torch.arange(min(PROBE_BATCH, len(self.train_split)), device=self.device)
        probe, _ = self.train_split.batch(rows)
        example, _ = self.train_split.batch(rows[:PARTITION_ROWS])
        self.controller = FreezeController(
            self.model,
            self.optimizer,
            example,
            max_units,
            total_steps=self.total_steps,
            probe_input=probe,
            **controller_options,
        )
        self.cache = PrefixCache(
            self.model,
            self.controller.units,
            len(self.train_split),
            deterministic_data=not data.random_augmentation,
            memory_budget_bytes=cache_memory_bytes,
            enabled=cache,
            device=self.device,
        )
        self.step = 0
        self.diverged = False
        self.losses: list[float] = []
        self.step_costs: list[float] = []
        self.train_seconds = 0.0
        self._order: torch.Tensor | None = None

    @property
    def units(self):
        return self.controller.units

    @property
    def done(self) -> bool:
        return self.diverged or self.step >= self.total_steps

    # ------------------------------------------------------------------ training

    def _batch_indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        if position == 0 or self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.train_split), generator=generator)
            self.cache.begin_epoch(self._order, self.task.batch_size)
        start = position * self.task.batch_size
        return self._order[start : start + self.task.batch_size].to(self.device)

    def loss_of(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        if self.language_modeling:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return F.cross_entropy(logits, targets)

    def run_interval(self, modes: list[Mode] | None = None) -> IntervalReport:
        """Apply ``modes`` (if given) and train one interval of optimizer steps."""
        if self.done:
            raise RuntimeError("the run is over: its step budget is spent")
        if modes is not None:
            self.set_modes(modes)
        steps = min(self.interval, self.total_steps - self.step)
        start_step, losses = self.step, []
        self.model.train()
        self._synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            indices = self._batch_indices(self.step)
            inputs, targets = self.train_split.batch(indices)
            loss = self._train_step(inputs, targets, indices)
            self.step_costs.append(self._step_cost())
            losses.append(loss)
            self.step += 1
            if not math.isfinite(loss):
                self.diverged = True
                break
        self._synchronize()
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        self.losses.extend(losses)
        return IntervalReport(
            start_step=start_step,
            steps=len(losses),
            modes=self.controller.modes,
            cost_ratio=sum(self.step_costs[-len(losses) :]) / len(losses),
            seconds=seconds,
            mean_loss=sum(losses) / len(losses),
            finite=not self.diverged,
        )

    def set_modes(self, modes: Sequence[Mode | int | str]) -> list[Mode]:
        """Apply ``modes`` through the controller and update the activation cache to match."""
        applied = self.controller.set_modes(modes)
        self.cache.update(applied)
        return applied

    def cost_ratio(self) -> float:
        """Modeled cost of the next iteration: current modes, cached prefix included."""
        stats = self.cache.stats()
        cached = stats.depth if stats.state == "serving" else 0
        return self.controller.cost_ratio(cached_prefix=cached)

    def _step_cost(self) -> float:
        """Modeled cost of the step just taken: rows served from the activation cache skip the
        frozen prefix, the others paid its forward pass."""
        depth, hit = self.cache.last_batch
        uncached = self.controller.cost_ratio()
        if depth == 0 or hit == 0:
            return uncached
        return hit * self.controller.cost_ratio(cached_prefix=depth) + (1 - hit) * uncached

    def _train_step(self, inputs: Any, targets: torch.Tensor, indices: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_of(self.cache.forward(inputs, indices), targets)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        value = float(loss.detach())
        self.controller.step(value)
        return value

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> tuple[float, float]:
        """Mean loss and accuracy on ``split`` ("train", "val" or "test")."""
        data = {"train": self.train_split, "val": self.val_split, "test": self.test_split}[split]
        was_training = self.model.training
        self.model.eval()
        total_loss, correct, count = 0.0, 0, 0
        for start in range(0, len(data), EVAL_BATCH):
            inputs, targets = data.batch(
                torch.arange(start, min(start + EVAL_BATCH, len(data)), device=self.device)
            )
            outputs = call_model(self.model, inputs)
            logits = outputs.logits if hasattr(outputs, "logits") else outputs
            total_loss += float(self.loss_of(logits, targets)) * targets.numel()
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
        self.model.train(was_training)
        return total_loss / count, correct / count

    # ------------------------------------------------------------------ a whole run

    def run(
        self,
        policy: Policy,
        on_interval: Callable[[IntervalReport], None] | None = None,
    ) -> RunResult:
        """Train to the end of the budget, letting ``policy`` decide before every interval."""
        policy.reset()
        timeline = []
        while not self.done:
            modes = policy.decide(self.controller.observe())
            applied = self.set_modes(modes)
            self.controller.set_learning_rate_scales(policy.learning_rate_scales())
            timeline.append(
                {
                    "step": self.step,
                    "progress": self.step / self.total_steps,
                    "modes": "".join(m.name[0] for m in applied),
                    "cost_ratio": self.cost_ratio(),
                }
            )
            report = self.run_interval()
            if on_interval is not None:
                on_interval(report)
        result = self.result(policy.name, timeline)
        self.close()
        return result

    def close(self) -> None:
        """Stop the controller's helpers (reference worker) and free the activation cache; the
        model keeps its weights."""
        self.controller.close()
        self.cache.close()

    def result(self, policy_name: str, timeline: list[dict[str, Any]]) -> RunResult:
        val_loss, val_accuracy = self.evaluate("val")
        _, test_accuracy = self.evaluate("test")
        return RunResult(
            task=self.task.name,
            seed=self.seed,
            policy=policy_name,
            device=str(self.device),
            epochs=self.epochs,
            steps=self.step,
            wall_time=self.train_seconds,
            modeled_cost_ratio=sum(self.step_costs) / max(len(self.step_costs), 1),
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            test_accuracy=test_accuracy,
            diverged=self.diverged,
            cache=dataclasses.asdict(self.cache.stats()),
            units=[describe_unit(u) for u in self.units],
            timeline=timeline,
            losses=self.losses,
            signals=self.controller.signal_report(),
        )


def describe_unit(unit) -> dict[str, Any]:
    return {
        "index": unit.index,
        "name": unit.name,
        "kind": unit.kind.value,
        "params": unit.num_params,
        "flops_forward": unit.flops_forward,
        "flops_backward_input": unit.flops_backward_input,
        "flops_backward_weight": unit.flops_backward_weight,
        "cut_point": unit.is_cut_point,
        "supports_local": unit.supports_local,
    }
