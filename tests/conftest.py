"""Shared fixtures: small models of several architectures, built from seed 0."""

from __future__ import annotations

import pytest
import torch
from helpers import ResidualNet, conv_chain
from torch import nn

# One intra-op thread: on a 2-core machine, 2-thread kernels stall whenever another process (a
# reference worker, a parallel job) holds a core, which makes test times erratic.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_and_deterministic(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


@pytest.fixture
def residual_net() -> ResidualNet:
    return ResidualNet()


@pytest.fixture
def chain() -> nn.Sequential:
    return conv_chain()


@pytest.fixture
def signal_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(16, 1, 16), torch.randint(0, 10, (16,))
