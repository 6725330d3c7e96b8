"""What every integration needs from a training framework's objects: an example batch taken
without disturbing the run, the controller built on one process or under the framework's DDP
wrapper, and the controller's state as flat scalars for the framework's logger."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset

from freeze_agent.controller import FreezeController
from freeze_agent.core.modes import Mode
from freeze_agent.core.random_state import preserved_global_rngs
from freeze_agent.core.units import ModelInput
from freeze_agent.integrations.ddp import DistributedFreezeController, attach_ddp
from freeze_agent.policies.base import Policy

__all__ = ["build_controller", "controller_metrics", "example_batch"]


def build_controller(
    policy: Policy,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    example_input: ModelInput,
    *,
    wrapper: DistributedDataParallel | None = None,
    **arguments: Any,
) -> FreezeController:
    """``FreezeController.from_pretrained`` for a callback; with ``wrapper`` (the framework's
    DDP wrapper of ``model``) a ``DistributedFreezeController`` on ``model`` itself, with the
    communication hook registered on ``wrapper`` (``attach_ddp``). Under DDP this is a
    collective: every rank calls it at the same hook."""
    if wrapper is None:
        return FreezeController.from_pretrained(
            policy, model, optimizer, example_input, **arguments
        )
    controller = DistributedFreezeController.from_pretrained(
        policy, model, optimizer, example_input, process_group=wrapper.process_group, **arguments
    )
    try:
        return attach_ddp(controller, wrapper)
    except BaseException:
        controller.close()
        raise


def example_batch(loader: Any, samples: int | None = None) -> Any:
    """One batch as ``loader`` yields it, built without iterating ``loader``.

    ``next(iter(loader))`` would draw from the loader's shuffle generator (and the global RNGs),
    so the run would then see another data order than it would without freeze-agent. Here the
    first ``samples`` (default: the batch size) samples of the dataset go through the loader's
    own ``collate_fn`` with every global generator put back afterwards. An iterable dataset, or
    anything that is not a ``DataLoader``, has no indices: its first batch is taken, and the
    error says so if that is impossible.
    """
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        with preserved_global_rngs():
            try:
                return next(iter(loader))
            except StopIteration:
                raise ValueError("the training loader yielded no batch: nothing to trace") from None
    count = samples or loader.batch_size or 1
    count = min(count, len(loader.dataset))  # type: ignore[arg-type]
    if count < 1:
        raise ValueError("the training dataset is empty: nothing to trace the model with")
    with preserved_global_rngs():
        return loader.collate_fn([loader.dataset[i] for i in range(count)])


def controller_metrics(controller: FreezeController, prefix: str = "freeze/") -> dict[str, float]:
    """The controller's state as flat floats: the share of parameters frozen and local, the
    number of units in each mode, the modeled speedup so far, and each unit's mode
    (0 TRAIN, 1 LOCAL, 2 FROZEN), for Lightning's ``log_dict`` or the Trainer's ``on_log``."""
    modes = controller.modes
    sizes = [sum(p.numel() for p in unit.parameters()) for unit in controller.units]
    total = max(sum(sizes), 1)
    metrics = {
        f"{prefix}frozen_fraction": sum(
            n for n, m in zip(sizes, modes, strict=True) if m is Mode.FROZEN
        )
        / total,
        f"{prefix}local_fraction": sum(
            n for n, m in zip(sizes, modes, strict=True) if m is Mode.LOCAL
        )
        / total,
        f"{prefix}modeled_speedup": controller.modeled_speedup,
    }
    for mode in Mode:
        metrics[f"{prefix}units_{mode.name.lower()}"] = float(sum(m is mode for m in modes))
    for unit, mode in zip(controller.units, modes, strict=True):
        metrics[f"{prefix}mode/{unit.index:02d}"] = float(int(mode))
    return metrics
