"""Shared fixtures: small models of several architectures, built from seed 0, a tiny real task,
and caches kept under pytest's temporary folder."""

from __future__ import annotations

import textwrap

import pytest
import torch
from helpers import ResidualNet, conv_chain
from torch import nn

from freeze_agent.tasks.spec import load_task

# One intra-op thread: on a 2-core machine, 2-thread kernels stall whenever another process (a
# reference worker, a parallel job) holds a core, which makes test times erratic.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """One freeze-agent cache (generated data, reference trajectories) for the whole session,
    under pytest's temporary folder: tests never write to the user's ~/.cache."""
    return tmp_path_factory.mktemp("freeze-agent-cache")


@pytest.fixture(autouse=True)
def _quiet_and_deterministic(monkeypatch, session_cache):
    monkeypatch.setenv("FREEZE_AGENT_CACHE", str(session_cache))
    monkeypatch.setenv("MPLCONFIGDIR", str(session_cache / "matplotlib"))
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


TINY = """
description: tiny CNN on the 8x8 digits
dataset: {name: digits, n_train: 384, n_val: 128, n_test: 128}
model: {family: cnn2d, depth: 3, channels: 8}
optimizer: {name: adamw, lr: 1.0e-2, weight_decay: 1.0e-4}
schedule: {name: cosine}
batch_size: 32
epochs: 2
decisions: 6
"""


@pytest.fixture
def tiny_task(tmp_path):
    """A 2-epoch, 6-decision CNN on the 8x8 digits, written to a YAML spec under tmp_path."""
    path = tmp_path / "tiny-digits.yaml"
    path.write_text(textwrap.dedent(TINY))
    return load_task(path)
