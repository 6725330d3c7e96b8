"""freeze-agent under DistributedDataParallel (``freeze_agent.integrations.ddp``).

In this process, a one-rank gloo group checks the refusals, the hook's slicing and its byte
count. The ``slow`` tests start two ranks as separate processes (``ranks.run_ranks``: gloo over
loopback, as ``torchrun`` would: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), each running
this file as a script through every scenario, and compare what the ranks saved: parameters
bitwise equal after freezing, unfreezing, the safety net and LOCAL units, the timelines equal,
the reference worker on rank 0 only, the bytes saved equal to the frozen parameters' gradient
bytes at every step, the activation cache correct. A hang (a collective one rank never reaches)
fails the test when the ranks run past their time-out: they are killed.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import FreezePrefix, ResidualNet, conv_chain
from ranks import ScriptedModes, flat_parameters, letters, mode_bytes, rank_and_world, run_ranks
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from freeze_agent import FreezeController, Mode
from freeze_agent.controller.safety_net import SafetyNet
from freeze_agent.integrations.ddp import (
    DistributedFreezeController,
    FreezeCommState,
    allreduce_trainable,
    attach_ddp,
    trainable_spans,
)

RANKS_TIMEOUT_S = 150  # the ranks take ~10 s; only a hang comes near this


def batch(rank: int, step: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch that differs between ranks, so that ranks left unsynchronized drift apart."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(size, 1, 16, generator=generator)
    return x, (x.mean(dim=(1, 2)) > 0).long()


def train_step(ddp_model, optimizer, controller, x, y, loss_seen=None) -> dict[str, Any]:
    """One DDP step; returns what the controller's byte count says of it (read before
    ``controller.step``, which may change the modes)."""
    ddp_model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(ddp_model(x), y)
    loss.backward()
    resting = [
        p
        for unit, mode in zip(controller.units, controller.modes, strict=True)
        if mode is not Mode.TRAIN
        for p in unit.parameters()
    ]
    record = {
        "modes": letters(controller),
        "frozen_bytes": mode_bytes(controller, Mode.FROZEN),
        "frozen_grads_none": all(p.grad is None for p in resting),
    }
    optimizer.step()
    if isinstance(controller, DistributedFreezeController):
        record["stats"] = controller.distributed_stats()
    controller.step(loss if loss_seen is None else loss_seen)
    return record


# --------------------------------------------------------------------------- in this process


@pytest.fixture
def one_rank(tmp_path):
    """A one-rank gloo process group in this process (a file store: no port), destroyed after."""
    if dist.is_initialized():
        pytest.skip("a process group is initialized already")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def small_run(**ddp_kwargs):
    torch.manual_seed(0)
    model = ResidualNet(8, 3)
    ddp_model = DistributedDataParallel(model, **ddp_kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, ddp_model, optimizer


@pytest.mark.filterwarnings("ignore:You passed find_unused_parameters=true")
@pytest.mark.parametrize(
    ("ddp_kwargs", "match"),
    [
        ({}, "find_unused_parameters=True"),
        ({"find_unused_parameters": True, "static_graph": True}, "static_graph=True"),
    ],
)
def test_a_wrapper_freezing_cannot_run_under_is_refused_saying_what_to_pass(
    one_rank, ddp_kwargs, match
):
    model, ddp_model, optimizer = small_run(**ddp_kwargs)
    x, _ = batch(0, 0)
    with pytest.raises(ValueError, match=match) as raised:
        DistributedFreezeController.from_pretrained(
            FreezePrefix(), ddp_model, optimizer, x, interval_steps=2, reference=False
        )
    if not ddp_kwargs:
        message = str(raised.value)
        for way in (
            "DistributedDataParallel(model, find_unused_parameters=True)",
            "DDPStrategy(find_unused_parameters=True)",
            '"ddp_find_unused_parameters_true"',
            "TrainingArguments(ddp_find_unused_parameters=True)",
        ):
            assert way in message
        plain = FreezeController.from_pretrained(
            FreezePrefix(), model, optimizer, x, interval_steps=2, reference=False
        )
        try:
            with pytest.raises(ValueError, match="find_unused_parameters=True"):
                attach_ddp(plain, ddp_model)
            assert type(plain) is FreezeController  # a refused wrapper changes nothing
        finally:
            plain.close()


def test_a_wrapper_built_with_frozen_parameters_or_of_another_model_is_refused(one_rank):
    torch.manual_seed(0)
    model = ResidualNet(8, 3)
    model.stem.requires_grad_(False)
    partial = DistributedDataParallel(model, find_unused_parameters=True)
    model.stem.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, _ = batch(0, 0)
    tensors, stem = len(list(model.parameters())), len(list(model.stem.parameters()))
    message = f"reduces {tensors - stem} of the model's {tensors} parameter tensors"
    with pytest.raises(ValueError, match=message):
        DistributedFreezeController(partial, optimizer, x, reference=False)
    other = DistributedDataParallel(ResidualNet(8, 3), find_unused_parameters=True)
    controller = DistributedFreezeController(model, optimizer, x, reference=False)
    try:
        with pytest.raises(ValueError, match="does not hold the controller's model"):
            attach_ddp(controller, other)
    finally:
        controller.close()


def test_a_wrapper_with_a_communication_hook_already_is_refused(one_rank):
    _, ddp_model, optimizer = small_run(find_unused_parameters=True)
    ddp_model.register_comm_hook(None, allreduce_hook)
    with pytest.raises(ValueError, match=r"communication hook already \(allreduce_hook\)"):
        DistributedFreezeController(ddp_model, optimizer, batch(0, 0)[0], reference=False)


class FakeBucket:
    """What the hook reads of a ``dist.GradBucket``: a flat buffer, its parameters and their
    gradients as views into it, one after the other."""

    def __init__(self, sizes: list[int], trainable: list[bool], padding: int = 0) -> None:
        self._params = [
            nn.Parameter(torch.zeros(n), requires_grad=t)
            for n, t in zip(sizes, trainable, strict=True)
        ]
        self._buffer = torch.arange(1.0, sum(sizes) + padding + 1)
        self._views = list(torch.split(self._buffer[: sum(sizes)], sizes))

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def gradients(self) -> list[torch.Tensor]:
        return self._views

    def is_last(self) -> bool:
        return True


def test_the_hook_reduces_the_trainable_slices_of_a_bucket_and_leaves_the_frozen_ones(one_rank):
    sizes, trainable = [3, 2, 4, 1, 2], [True, False, True, True, False]
    assert trainable_spans(FakeBucket(sizes, trainable)) == [(0, 3), (5, 10)]
    assert trainable_spans(FakeBucket(sizes, trainable, padding=1)) is None  # unknown layout
    state = FreezeCommState()
    # packed (two spans), in place (one) and nothing to send
    for mask in (trainable, [False, False, True, True, False], [False] * 5):
        bucket = FakeBucket(sizes, mask)
        expected = bucket.buffer().clone()
        result = allreduce_trainable(state, bucket).wait()
        # one rank: the mean is the value itself, so any slice put back at the wrong place shows
        assert result is bucket.buffer() and torch.equal(result, expected)
    assert state.syncs == 3 and state.bytes_full == 3 * 12 * 4
    assert state.gradient_bytes_sent == (8 + 5 + 0) * 4


def test_the_hook_leaves_exactly_the_frozen_gradients_out_of_the_all_reduce(one_rank):
    model, ddp_model, optimizer = small_run(find_unused_parameters=True, bucket_cap_mb=0.001)
    x, y = batch(0, 0)
    controller = DistributedFreezeController.from_pretrained(
        # frozen from the first step (as a resumed run is): partitioning's own backward must not
        # make DDP take the frozen parameters for used ones
        ScriptedModes(["FFTTT", "TFTTT", "TTTTT", "FFFFT", "TTTTT"]),
        ddp_model,
        optimizer,
        x,
        interval_steps=2,
        reference=False,
        safety_net=False,
    )
    try:
        records = [train_step(ddp_model, optimizer, controller, x, y) for _ in range(10)]
        summary = controller.summary()
    finally:
        controller.close()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert [r["modes"] for r in records[::2]] == ["FFTTT", "TFTTT", "TTTTT", "FFFFT", "TTTTT"]
    for record in records:
        last = record["stats"]["last_step"]
        assert last["bytes_full"] == total
        assert last["bytes_saved"] == record["frozen_bytes"]
        assert record["frozen_grads_none"]
    stats = summary["ddp"]
    assert stats["comm_hook"] and stats["syncs"] == 10 and stats["bytes_full"] == 10 * total
    assert stats["bytes_saved"] == sum(r["frozen_bytes"] for r in records) > 0
    assert stats["bytes_sent"] + stats["bytes_saved"] == stats["bytes_full"]


def test_attach_ddp_makes_a_built_controller_distributed_in_place(one_rank):
    # as a framework callback does: the wrapper first, then the controller, frozen at once
    model, ddp_model, optimizer = small_run(find_unused_parameters=True)
    x, y = batch(0, 0)
    controller = FreezeController.from_pretrained(
        FreezePrefix(depth=2, start=1),
        model,
        optimizer,
        x,
        interval_steps=2,
        safety_net=False,
    )
    try:
        same = attach_ddp(controller, ddp_model)
        assert same is controller and isinstance(controller, DistributedFreezeController)
        assert controller.plasticity is not None  # rank 0 keeps its reference worker
        assert attach_ddp(controller, ddp_model) is controller  # again: nothing new
        records = [train_step(ddp_model, optimizer, controller, x, y) for _ in range(3)]
        summary = controller.summary()
    finally:
        controller.close()
    assert [r["modes"] for r in records] == ["FFTTT"] * 3
    assert [r["stats"]["last_step"]["bytes_saved"] for r in records] == [
        r["frozen_bytes"] for r in records
    ]
    assert summary["ddp"]["syncs"] == 3 and records[-1]["frozen_bytes"] > 0


# --------------------------------------------------------------------------- two ranks


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(__file__, tmp_path_factory.mktemp("ddp"), timeout=RANKS_TIMEOUT_S)


@pytest.mark.slow
def test_ranks_apply_rank_zero_decisions_and_stay_bitwise_identical(ranks):
    zero, one = (r["decisions"] for r in ranks)
    assert torch.equal(zero["params"], one["params"])
    assert zero["timeline"] == one["timeline"]
    assert zero["timeline"] == [
        ("TTTTT", "policy"),
        ("FFTTT", "policy"),
        ("TFTTT", "policy"),  # frozen in the middle: two trainable spans in the bucket
        ("TTTTT", "policy"),  # unfrozen
        ("FFFFT", "policy"),
        ("FFFFT", "policy"),
        ("FFFFT", "policy"),
        ("TTTTT", "safety net"),  # rank 0's validation fell; rank 1's earlier fall did not count
        ("TTTTT", "policy"),  # held
    ]
    # rank 1's own policy (all TRAIN) never decided, nor did its NaN losses trip the safety net
    assert zero["policy_calls"] == 8 and one["policy_calls"] == 0
    assert zero["validation"] == one["validation"] == [[10, 0.9], [11, 0.9], [12, 0.5]]
    assert [e["units"] for e in zero["safety_net"]] == [[0, 1, 2, 3]]
    assert zero["resumed"] == one["resumed"] == ("FFFFT", 10, 6)


@pytest.mark.slow
def test_the_reference_worker_and_the_signals_run_on_rank_zero_only(ranks):
    zero, one = (r["decisions"] for r in ranks)
    assert zero["reference"] and zero["signals"]
    assert not one["reference"] and not one["signals"]


@pytest.mark.slow
def test_bytes_saved_are_the_frozen_gradient_bytes_at_every_step_on_every_rank(ranks):
    for result in ranks:
        steps = result["decisions"]["steps"]
        total = result["decisions"]["total_bytes"]
        for step in steps:
            last = step["stats"]["last_step"]
            assert last["bytes_full"] == total
            assert last["bytes_saved"] == step["frozen_bytes"]
            assert step["frozen_grads_none"]
        stats = steps[-1]["stats"]
        assert stats["world_size"] == 2 and stats["syncs"] == len(steps)
        assert stats["bytes_saved"] == sum(s["frozen_bytes"] for s in steps) > 0


@pytest.mark.slow
def test_local_units_are_averaged_over_the_ranks(ranks):
    zero, one = (r["local"] for r in ranks)
    assert torch.equal(zero["params"], one["params"])
    assert zero["local_weight_moved"] > 0  # the local rule did update the LOCAL unit
    assert [s["modes"] for s in zero["steps"]] == ["TTTT"] * 2 + ["FLTT"] * 4 + ["TTTT"] * 2
    for step in zero["steps"]:
        last = step["stats"]["last_step"]
        assert last["bytes_saved"] == step["frozen_bytes"]  # LOCAL bytes go in the averaging
        assert step["stats"]["local_sync_bytes"] >= 0
    assert zero["steps"][-1]["stats"]["local_sync_bytes"] == 4 * zero["local_unit_bytes"]
    # without the averaging, the same run leaves the ranks apart: the check above can fail
    assert not torch.equal(ranks[0]["unsynced_local"], ranks[1]["unsynced_local"])


@pytest.mark.slow
def test_a_controller_gets_the_wrapper_after_training_started(ranks):
    for variant in ("plain", "distributed"):
        zero, one = (r["late"][variant] for r in ranks)
        assert torch.equal(zero["params"], one["params"])
        assert zero["modes"] == one["modes"] == ["TTTTT", "TTTTT", "FFTTT", "FFTTT", "TFTTT"]
        assert zero["saved"] == one["saved"] == zero["frozen_bytes"] > 0


@pytest.mark.slow
def test_the_activation_cache_serves_each_rank_its_own_rows(ranks):
    for result in ranks:
        cached, plain = result["cache"]["cached"], result["cache"]["plain"]
        assert cached["cache"]["hits"] > 0 and cached["cache"]["reason_off"] is None
        assert plain["cache"]["hits"] == 0
        assert cached["timeline"] == plain["timeline"] and cached["timeline"][-1] == "FFTTT"
        torch.testing.assert_close(cached["params"], plain["params"], rtol=1e-5, atol=1e-6)
    for run in ("cached", "plain"):
        assert torch.equal(ranks[0]["cache"][run]["params"], ranks[1]["cache"][run]["params"])


# --------------------------------------------------------------------------- one rank's run


def decisions_scenario(rank: int) -> dict:
    """Freeze, unfreeze and the safety net (rank 0's validation decides), the reference on;
    then every rank resumes from rank 0's checkpoint."""
    model, ddp_model, optimizer = small_run(find_unused_parameters=True)
    plan = ["TTTTT", "FFTTT", "TFTTT", "TTTTT", "FFFFT"] if rank == 0 else ["TTTTT"]
    arguments = {
        "total_steps": 16,
        "decisions": 8,
        # only the validation metric and a non-finite loss set the net off in this run
        "safety_net": SafetyNet(loss_tolerance=100.0, divergence_factor=100.0),
    }
    controller = DistributedFreezeController.from_pretrained(
        ScriptedModes(plan), ddp_model, optimizer, batch(rank, 0)[0], **arguments
    )
    reports = {10: (0.9, 0.9), 11: (0.9, 0.1), 12: (0.5, 0.95)}  # (rank 0's, rank 1's)
    steps, checkpoint = [], [None]
    try:
        for step in range(16):
            x, y = batch(rank, step)
            # rank 1's losses would set off the safety net at once if it watched them
            nan = float("nan") if rank == 1 else None
            steps.append(train_step(ddp_model, optimizer, controller, x, y, loss_seen=nan))
            if controller.steps in reports:
                controller.report_validation(reports[controller.steps][rank])
            if controller.steps == 10 and rank == 0:
                checkpoint = [controller.state_dict()]
        summary = controller.summary()
        result = {
            "params": flat_parameters(model),
            "timeline": list(zip(summary["timeline"], summary["causes"], strict=True)),
            "policy_calls": controller.policy._calls,
            "validation": summary["validation"],
            "safety_net": summary["safety_net"],
            "reference": controller.plasticity is not None,
            "signals": controller.dynamics is not None,
            "steps": steps,
            "total_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        }
    finally:
        controller.close()
    dist.broadcast_object_list(checkpoint, src=0)
    resumed = DistributedFreezeController.from_pretrained(
        ScriptedModes(plan), model, optimizer, batch(rank, 0)[0], **arguments
    )
    try:
        resumed.load_state_dict(checkpoint[0])  # rank 1 has no signals to load them into
        result["resumed"] = (letters(resumed), resumed.steps, len(resumed.timeline))
    finally:
        resumed.close()
    return result


def local_scenario(rank: int, synchronized: bool = True) -> dict:
    """A LOCAL unit (its upstream unit FROZEN) between two all-TRAIN intervals; small buckets,
    some of them all frozen, and gradients that are views of them."""
    torch.manual_seed(0)
    model = conv_chain(8, 3)
    ddp_model = DistributedDataParallel(
        model, find_unused_parameters=True, bucket_cap_mb=0.0005, gradient_as_bucket_view=True
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plan = ["TTTT", "TLTT", "TLTT", "TTTT"]
    kwargs = {"interval_steps": 2, "reference": False, "local_lr": 0.05, "safety_net": False}
    if synchronized:
        controller = DistributedFreezeController.from_pretrained(
            ScriptedModes(plan), ddp_model, optimizer, batch(rank, 0)[0], **kwargs
        )
    else:  # the control: the same modes on every rank, nothing averaged
        controller = FreezeController.from_pretrained(
            ScriptedModes(plan), model, optimizer, batch(rank, 0)[0], **kwargs
        )
    local_unit = controller.units[1]
    try:
        steps, before = [], None
        for step in range(8):
            if step == 2:
                before = torch.cat(
                    [p.detach().reshape(-1).clone() for p in local_unit.parameters()]
                )
            steps.append(train_step(ddp_model, optimizer, controller, *batch(rank, step)))
        after = torch.cat([p.detach().reshape(-1) for p in local_unit.parameters()])
        return {
            "params": flat_parameters(model),
            "steps": steps,
            "local_weight_moved": float((after - before).abs().max()),
            "local_unit_bytes": sum(p.numel() * p.element_size() for p in local_unit.parameters()),
        }
    finally:
        controller.close()


def late_scenario(rank: int, variant: str) -> dict:
    """The wrapper reaches a built controller after a step of training, as in a framework."""
    model, ddp_model, optimizer = small_run(find_unused_parameters=True)
    plan = ["TTTTT", "FFTTT", "TFTTT"] if rank == 0 else ["TTTTT"]
    build = FreezeController if variant == "plain" else DistributedFreezeController
    controller = build.from_pretrained(
        ScriptedModes(plan),
        model,
        optimizer,
        batch(rank, 0)[0],
        interval_steps=2,
        reference=False,
        safety_net=False,
    )
    try:
        records = [train_step(ddp_model, optimizer, controller, *batch(rank, 0))]
        controller = attach_ddp(controller, ddp_model)
        records += [
            train_step(ddp_model, optimizer, controller, *batch(rank, s)) for s in (1, 2, 3, 4)
        ]
        return {
            "params": flat_parameters(model),
            "modes": [r["modes"] for r in records],
            "saved": controller.distributed_stats()["bytes_saved"],
            "frozen_bytes": sum(r["frozen_bytes"] for r in records[1:]),
        }
    finally:
        controller.close()


def cache_scenario(rank: int, world: int, cached: bool) -> dict:
    """``wrap_loader`` over a ``DistributedSampler``: each rank caches the rows it is given."""
    torch.manual_seed(0)
    model = ResidualNet(8, 3)
    ddp_model = DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(64, 1, 16, generator=torch.Generator().manual_seed(7))
    data = TensorDataset(x, (x.mean(dim=(1, 2)) > 0).long())
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    controller = DistributedFreezeController.from_pretrained(
        FreezePrefix(depth=2),
        ddp_model,
        optimizer,
        x[:8],
        interval_steps=2,
        reference=False,
        safety_net=False,
    )
    batches = controller.wrap_loader(loader, deterministic=None if cached else False)
    try:
        for epoch in range(4):
            sampler.set_epoch(epoch)
            for inputs, targets in batches:
                train_step(ddp_model, optimizer, controller, inputs, targets)
        summary = controller.summary()
        return {
            "params": flat_parameters(model),
            "cache": summary["cache"],
            "timeline": summary["timeline"],
        }
    finally:
        controller.close()


def run_rank(out: Path) -> None:
    torch.set_num_threads(1)
    rank, world = rank_and_world()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {
            "decisions": decisions_scenario(rank),
            "local": local_scenario(rank),
            "unsynced_local": local_scenario(rank, synchronized=False)["params"],
            "late": {v: late_scenario(rank, v) for v in ("plain", "distributed")},
            "cache": {
                "cached": cache_scenario(rank, world, cached=True),
                "plain": cache_scenario(rank, world, cached=False),
            },
        }
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        run_rank(Path(sys.argv[1]))
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
