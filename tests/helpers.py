"""Models and loops the tests share: small models of several architectures, a plain training loop
and a tiny policy-training configuration."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Observation, Policy
from freeze_agent.rl.training import TrainConfig


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResidualNet(nn.Module):
    """Head registered first, blocks in a ModuleList: order must come from execution."""

    def __init__(self, channels: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.head = nn.Linear(channels, 10)
        self.stem = nn.Sequential(nn.Conv1d(1, channels, 3, padding=1), nn.BatchNorm1d(channels))
        self.blocks = nn.ModuleList(ResidualBlock(channels) for _ in range(blocks))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(-1))


def conv_chain(width: int = 8, depth: int = 3) -> nn.Sequential:
    layers = [nn.Sequential(nn.Conv1d(1, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU())]
    for _ in range(depth - 1):
        layers.append(
            nn.Sequential(
                nn.Conv1d(width, width, 3, padding=1),
                nn.BatchNorm1d(width),
                nn.ReLU(),
                nn.Dropout(0.1),
            )
        )
    layers.append(nn.Sequential(nn.Flatten(), nn.Linear(width * 16, 10)))
    return nn.Sequential(*layers)


def train_steps(model, optimizer, controller, batch, steps=3, set_to_none=True):
    """A plain training loop that reports each step to ``controller``."""
    x, y = batch
    for _ in range(steps):
        model.train()
        optimizer.zero_grad(set_to_none=set_to_none)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        controller.step(loss)


def tiny_config(**overrides) -> TrainConfig:
    settings = {
        "tasks": ["digits-cnn2d"],
        "val_tasks": ["digits-cnn2d"],
        "timesteps": 16,
        "n_envs": 1,
        "epochs": 1,
        "decisions": 2,
        "reference_model": False,
        "n_steps": 8,
        "batch_size": 8,
        "n_epochs": 2,
        "checkpoint_every": 8,
        "eval_every": 0,
        "wandb_project": None,
    }
    return TrainConfig(**{**settings, **overrides})


def synthetic_observation(
    n_units: int,
    *,
    progress: float = 0.5,
    lr_ratio: float = 1.0,
    frozen: int = 0,
    max_units: int = 32,
    **columns,
) -> dict:
    """An observation of ``n_units`` units with the given per-unit feature ``columns`` (a list or
    a scalar per feature name), ``frozen`` units FROZEN from the front, the rest TRAIN; every
    measured signal present unless its ``*_missing`` column says otherwise."""
    import numpy as np

    from freeze_agent.core.modes import Mode
    from freeze_agent.signals.observation import GLOBAL_FEATURES, UNIT_FEATURES

    units = np.zeros((max_units, len(UNIT_FEATURES)), dtype=np.float32)
    column = UNIT_FEATURES.index
    units[:n_units, column("relative_depth")] = np.linspace(0, 1, n_units)
    units[n_units - 1, column("is_head")] = 1.0
    for i in range(n_units):
        mode = Mode.FROZEN if i < frozen else Mode.TRAIN
        units[i, column(f"mode_{mode.name.lower()}")] = 1.0
    for name, values in columns.items():
        units[:n_units, column(name)] = values
    mask = np.zeros(max_units, dtype=np.int8)
    mask[:n_units] = 1
    global_vector = np.zeros(len(GLOBAL_FEATURES), dtype=np.float32)
    global_vector[GLOBAL_FEATURES.index("progress")] = progress
    global_vector[GLOBAL_FEATURES.index("lr_ratio")] = lr_ratio
    return {"units": units, "mask": mask, "global": global_vector}


class FreezePrefix(Policy):
    """Freezes the first ``depth`` units (None: every unit but the head) from decision ``start``
    (1-based) on, TRAIN before: a policy whose decisions a test knows in advance."""

    name = "freeze-prefix"

    def __init__(self, depth: int | None = None, start: int = 2) -> None:
        self.depth, self.start = depth, start
        self._decisions = 0

    def reset(self, reference=None) -> None:
        super().reset(reference)
        self._decisions = 0

    def decide(self, observation: Observation) -> list[Mode]:
        n = int(observation["mask"].sum())
        self._decisions += 1
        depth = (
            (n - 1 if self.depth is None else self.depth) if self._decisions >= self.start else 0
        )
        return [Mode.FROZEN] * depth + [Mode.TRAIN] * (n - depth)
