"""Two (or more) ranks for the DDP tests: each rank a separate process running a test file as a
script, with the environment ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT; gloo over loopback), killed when the ranks run past their time-out, so that a hang
(a collective one rank never reaches) fails the test instead of blocking it. Also what the DDP
tests compare of the ranks: a policy with a known plan and the bytes of the units in a mode."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from freeze_agent import FreezeController, Mode
from freeze_agent.policies.base import Observation, Policy

FAILED_RANK_GRACE_S = 10.0  # how long the other ranks may take to fail too, once one has

_LETTERS = {"T": Mode.TRAIN, "L": Mode.LOCAL, "F": Mode.FROZEN}


class ScriptedModes(Policy):
    """Returns ``plan[i]`` (a string of T/L/F, one letter per unit) at its i-th decision and the
    last entry after; counts its calls."""

    name = "scripted"

    def __init__(self, plan: list[str]) -> None:
        self.plan = plan
        self._calls = 0

    def reset(self, reference=None) -> None:
        super().reset(reference)
        self._calls = 0

    def decide(self, observation: Observation) -> list[Mode]:
        modes = self.plan[min(self._calls, len(self.plan) - 1)]
        self._calls += 1
        return [_LETTERS[letter] for letter in modes]


def mode_bytes(controller: FreezeController, mode: Mode) -> int:
    """Bytes of the parameters (and so of the gradients) of the units now in ``mode``."""
    return sum(
        p.numel() * p.element_size()
        for unit, current in zip(controller.units, controller.modes, strict=True)
        if current is mode
        for p in unit.parameters()
    )


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def letters(controller: FreezeController) -> str:
    return "".join(m.name[0] for m in controller.modes)


class StepRecorder:
    """What a framework callback registered after ``FreezePolicyCallback`` sees before each
    optimizer step under DDP: the modes, the FROZEN units' gradient bytes, whether every resting
    unit's gradient is None, and what the hook's byte count says of the step; and, once, whether
    this rank runs the signals and the reference worker. ``record()`` is called from the
    framework's pre-optimizer-step hook."""

    def __init__(self, callback) -> None:
        self.callback = callback
        self.steps: list[dict] = []
        self.observed: dict[str, bool] = {}

    def record(self) -> None:
        from freeze_agent.integrations.ddp import DistributedFreezeController

        controller = self.callback.controller
        assert isinstance(controller, DistributedFreezeController)
        resting = [
            p
            for unit, mode in zip(controller.units, controller.modes, strict=True)
            if mode is not Mode.TRAIN
            for p in unit.parameters()
        ]
        self.steps.append(
            {
                "modes": letters(controller),
                "frozen_bytes": mode_bytes(controller, Mode.FROZEN),
                "frozen_grads_none": all(p.grad is None for p in resting),
                "last_step": controller.distributed_stats()["last_step"],
            }
        )
        if not self.observed:
            self.observed = {
                "reference": controller.plasticity is not None,
                "signals": controller.dynamics is not None,
            }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    script: str | Path,
    out: Path,
    *,
    timeout: float,
    world: int = 2,
    args: Sequence[str] = (),
) -> list[dict]:
    """Run ``script`` (a test file run as a script: ``python script out *args``) on ``world``
    ranks and return what each saved as ``out/rank{r}.pt``. The ranks are killed, with their
    children, and the test fails, if they run past ``timeout`` seconds, or if one exits
    non-zero (its log's end is in the failure; the others get ``FAILED_RANK_GRACE_S`` to end,
    as they may wait on it in a collective)."""
    tests = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "FREEZE_AGENT_CACHE": str(out / "cache"),
        "MPLCONFIGDIR": str(out / "matplotlib"),
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }
    procs = []
    for rank in range(world):
        log = (out / f"rank{rank}.log").open("w")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(out), *args],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed with its children
            )
        )
        log.close()
    deadline = time.monotonic() + timeout
    killed: set[int] = set()
    try:
        while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
            if any(proc.returncode for proc in procs):  # one failed: the others may wait on it
                deadline = min(deadline, time.monotonic() + FAILED_RANK_GRACE_S)
            time.sleep(0.05)
    finally:
        for rank, proc in enumerate(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed.add(rank)
    for rank, proc in enumerate(procs):
        if proc.returncode != 0 and rank not in killed:
            log = (out / f"rank{rank}.log").read_text()
            pytest.fail(f"rank {rank} exited with {proc.returncode}:\n{log[-6000:]}")
    if killed:
        logs = "\n".join(
            f"rank {rank}'s log ends:\n{(out / f'rank{rank}.log').read_text()[-2000:]}"
            for rank in sorted(killed)
        )
        pytest.fail(f"the ranks did not finish in {timeout:.0f} s: a collective hangs\n{logs}")
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def rank_and_world() -> tuple[int, int]:
    """This rank's number and the world size, from the environment ``run_ranks`` sets."""
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
