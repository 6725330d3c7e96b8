"""``FreezePolicyCallback``: a freeze policy deployed through Lightning's ``Trainer.fit`` decides
at the planned optimizer steps, keeps frozen parameters exactly still under clipping,
accumulation and bf16 autocast, feeds the validation metric to the safety net, logs through the
trainer's logger, resumes from Lightning checkpoints with the same decisions and leaves the data
order alone; under DDP (two ranks run this file as a script, ``ranks.run_ranks``) every rank
applies rank 0's decisions, stays bitwise identical and leaves the frozen gradients out of the
all-reduce, also when resumed."""

from __future__ import annotations

import csv
import sys
import traceback
import types
import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from helpers import FreezePrefix, ResidualNet
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from ranks import (
    ScriptedModes,
    StepRecorder,
    flat_parameters,
    rank_and_world,
    run_ranks,
)
from torch.utils.data import DataLoader, TensorDataset

from freeze_agent import Mode
from freeze_agent.controller.safety_net import SafetyNet
from freeze_agent.integrations.lightning import FreezePolicyCallback

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*treespec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*treespec.*:FutureWarning"),
]

SAMPLES = 80  # 10 batches of 8 per epoch


class Classifier(pl.LightningModule):
    """A ResidualNet on (x, y) batches; records every training loss and batch it sees, and
    logs ``val_loss`` (the real one, or the next of ``synthetic_val`` when given)."""

    def __init__(self, synthetic_val: list[float] | None = None, adamw: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = ResidualNet(8, 3)
        self.synthetic_val = list(synthetic_val) if synthetic_val is not None else None
        self.adamw = adamw
        self.losses: list[float] = []
        self.first_samples: list[float] = []
        self.logit_dtypes: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.losses.append(float(loss.detach()))
        self.first_samples.append(float(x[0, 0, 0]))
        self.logit_dtypes.add(logits.dtype)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        if self.synthetic_val is not None:
            self.log("val_loss", self.synthetic_val.pop(0))
        else:
            self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.adamw:
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loaders(batch_size: int = 8, shuffle: bool = True) -> tuple[DataLoader, DataLoader]:
    x = torch.randn(SAMPLES, 1, 16, generator=torch.Generator().manual_seed(3))
    y = (x.mean(dim=(1, 2)) > 0).long()
    data = TensorDataset(x, y)
    train = DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(1)
    )
    return train, DataLoader(data, batch_size=SAMPLES)


def trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "max_epochs": 4,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(callbacks=callbacks, **{**settings, **kwargs})


def prefix_callback(start: int = 2, **kwargs: Any) -> FreezePolicyCallback:
    """FreezePrefix freezes every unit but the head from decision ``start`` on: decisions a
    test knows in advance. No reference worker: nothing to start."""
    settings: dict[str, Any] = {"interval_steps": 5, "reference": False}
    return FreezePolicyCallback(FreezePrefix(start=start), **{**settings, **kwargs})


class ParameterRecorder(pl.Callback):
    """After each optimizer step (and after the freeze callback's decision): the modes now in
    force and a copy of every parameter and buffer of each unit."""

    def __init__(self, callback: FreezePolicyCallback) -> None:
        self.callback = callback
        self.records: list[tuple[list[Mode], list[list[torch.Tensor]]]] = []
        self._step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return
        self._step = trainer.global_step
        controller = self.callback.controller
        tensors = [
            [t.detach().clone() for t in (*unit.parameters(), *_buffers(unit))]
            for unit in controller.units
        ]
        self.records.append((controller.modes, tensors))


def _buffers(unit) -> list[torch.Tensor]:
    return [b for m in unit.modules for b in m.buffers(recurse=False)]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_decisions_at_the_planned_optimizer_steps(accumulate):
    module = Classifier()
    callback = prefix_callback()
    train, val = loaders(batch_size=8 // accumulate)  # 10 optimizer steps per epoch either way
    fit = trainer([callback], accumulate_grad_batches=accumulate)
    fit.fit(module, train, val)

    summary = callback.controller.summary()
    assert fit.global_step == 40 and summary["steps"] == 40
    assert callback.controller.total_steps == 40  # trainer.estimated_stepping_batches
    assert summary["decision_steps"] == [0, 5, 10, 15, 20, 25, 30, 35]
    n = len(callback.controller.units)
    assert summary["timeline"] == ["T" * n] + ["F" * (n - 1) + "T"] * 7
    # the loss of a step is the mean of its accumulated batches' training_step losses
    batch_losses = torch.tensor(module.losses).reshape(40, accumulate).mean(dim=1)
    assert callback.controller.last_loss == pytest.approx(float(batch_losses[-1]), rel=1e-6)
    expected = batch_losses[:35].reshape(7, 5).mean(dim=1).tolist()
    assert callback.controller.interval_losses == pytest.approx(expected, rel=1e-6)
    assert callback.summary() == summary
    # after fit the controller is closed: every unit trains again
    assert callback.controller.modes == [Mode.TRAIN] * n
    assert all(p.requires_grad for p in module.parameters())


def test_frozen_parameters_stay_bitwise_unchanged_with_clipping_accumulation_and_bf16():
    module = Classifier(adamw=True)  # weight decay would move a parameter the optimizer touched
    callback = prefix_callback(start=3)
    recorder = ParameterRecorder(callback)
    train, val = loaders(batch_size=4)
    fit = trainer(
        [callback, recorder],
        max_epochs=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,
        precision="bf16-mixed",
    )
    fit.fit(module, train, val)

    assert module.logit_dtypes == {torch.bfloat16} and fit.global_step == 20
    assert callback.summary()["timeline"][2:] == ["FFFFT"] * 2  # frozen from step 10 on
    frozen_pairs = 0
    for (modes, before), (_, after) in zip(recorder.records, recorder.records[1:], strict=False):
        for mode, old, new in zip(modes, before, after, strict=True):
            assert all(t.dtype == torch.float32 or not t.is_floating_point() for t in new)
            if mode is Mode.FROZEN:
                frozen_pairs += 1
                assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True))
            else:
                assert any(not torch.equal(a, b) for a, b in zip(old, new, strict=True))
    assert frozen_pairs == 4 * 10  # four frozen units over the 10 steps 11..20


class TrainingFlags(pl.Callback):
    """At each training batch (after the freeze callback's hooks): the units whose modules are
    not in the mode their freeze mode asks for (eval when FROZEN, training otherwise)."""

    def __init__(self, callback: FreezePolicyCallback) -> None:
        self.callback = callback
        self.wrong: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        controller = self.callback.controller
        self.wrong += [
            (trainer.global_step, unit.index)
            for unit, mode in zip(controller.units, controller.modes, strict=True)
            if any(m.training != (mode is not Mode.FROZEN) for m in unit.modules)
        ]


def test_a_worsening_validation_metric_reaches_the_safety_net():
    # val_loss 1.0 at step 10 (frozen since step 5), then 2.0 at step 20: a regression; then
    # 0.5, a new best, when the units are frozen again
    module = Classifier(synthetic_val=[1.0, 2.0, 0.5, 0.5])
    callback = prefix_callback(safety_net=SafetyNet(hold_decisions=2), monitor="val_loss")
    flags = TrainingFlags(callback)
    train, val = loaders()
    with pytest.warns(UserWarning, match="safety net at step 20: the validation metric 2 fell"):
        trainer([callback, flags]).fit(module, train, val)
    # the units unfrozen during validation train in training mode (batch norm on batch
    # statistics), though Lightning restores the modes from before the validation after it
    assert flags.wrong == []

    summary = callback.summary()
    n = len(summary["units"])
    frozen, training = "F" * (n - 1) + "T", "T" * n
    assert summary["validation"] == [[10, 1.0], [20, 2.0], [30, 0.5], [40, 0.5]]
    [event] = summary["safety_net"]
    assert event["step"] == 20 and event["units"] == list(range(n - 1))
    assert event["hold_until_step"] == 30
    assert summary["causes"][5] == "safety net" and summary["decision_steps"][5] == 20
    # frozen until the net fires, held in TRAIN at step 25, frozen again from step 30
    assert summary["timeline"] == [training] + [frozen] * 4 + [training] * 2 + [frozen] * 2


def test_metrics_reach_the_csv_logger_and_a_missing_monitor_warns_once(tmp_path):
    callback = prefix_callback(monitor="val_accuracy", mode="max")
    train, val = loaders()
    logger = CSVLogger(tmp_path, name="run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([callback], max_epochs=2, logger=logger, log_every_n_steps=2).fit(
            Classifier(), train, val
        )
    missing = [str(w.message) for w in caught if "monitor='val_accuracy'" in str(w.message)]
    assert len(missing) == 1 and "the logged metrics are" in missing[0]
    assert "val_loss" in missing[0]

    with open(logger.log_dir + "/metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("freeze/frozen_fraction")]
    # every second optimizer step, as Lightning numbers them (from 0), like the user's metrics
    assert [int(row["step"]) for row in rows] == list(range(1, 20, 2))
    for name in ("freeze/modeled_speedup", "freeze/units_frozen", "freeze/mode/00"):
        assert all(row[name] != "" for row in rows), name
    fractions = [float(row["freeze/frozen_fraction"]) for row in rows]
    assert fractions[:2] == [0.0, 0.0] and all(0.0 < f < 1.0 for f in fractions[2:])
    assert float(rows[-1]["freeze/mode/00"]) == float(Mode.FROZEN)
    assert float(rows[-1]["freeze/units_frozen"]) == len(callback.controller.units) - 1
    assert float(rows[-1]["freeze/modeled_speedup"]) > 1.0


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("interruption", ["model-checkpoint", "max-steps"])
def test_a_resumed_fit_continues_with_the_same_decisions(tmp_path, interruption):
    # no shuffling: both runs see the same batches after the resume, so losses (and with them
    # the safety net's view) match too
    def run(ckpt_path=None, callbacks=(), **kwargs):
        callback = prefix_callback(start=3, interval_steps=None, decisions=8, total_steps=40)
        module = Classifier()
        train, val = loaders(shuffle=False)
        fit = trainer([callback, *callbacks], enable_checkpointing=bool(callbacks), **kwargs)
        fit.fit(module, train, val, ckpt_path=ckpt_path)
        return fit, callback, module

    if interruption == "model-checkpoint":
        # saved after every epoch's validation (the default), the safety net's report included
        _, whole, module_a = run(callbacks=[ModelCheckpoint(tmp_path, save_top_k=-1)])
        checkpoint = tmp_path / "epoch=1-step=20.ckpt"
        resume_with = [ModelCheckpoint(tmp_path, save_top_k=-1)]
    else:
        _, whole, module_a = run()
        first, _, _ = run(max_steps=20)  # stops at step 20
        checkpoint = tmp_path / "first.ckpt"
        first.save_checkpoint(checkpoint)  # the callback's state as fit ended
        resume_with = []
    fit, resumed, module_b = run(ckpt_path=checkpoint, callbacks=resume_with)

    a, b = whole.summary(), resumed.summary()
    assert fit.global_step == 40 and b["steps"] == 40
    assert b["decision_steps"] == a["decision_steps"] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert b["timeline"] == a["timeline"] and b["causes"] == a["causes"]
    assert b["timeline"][1] == "T" * len(b["units"]) and b["timeline"][2].startswith("F")
    assert [step for step, _ in b["validation"]] == [step for step, _ in a["validation"]]
    assert [v for _, v in b["validation"]] == pytest.approx([v for _, v in a["validation"]])
    assert module_b.losses == pytest.approx(module_a.losses[20:], rel=1e-5)


def test_the_cache_serves_the_frozen_prefix_without_changing_the_run():
    """Same batches in the same order with and without freeze-agent; with the cache, the same
    losses as without it, and batches routed from the second epoch on."""
    runs = {}
    for name, callback in (
        ("none", None),
        ("plain", prefix_callback(start=2, signals=False)),
        ("cache", prefix_callback(start=2, signals=False, cache=True)),
    ):
        module = Classifier()
        train, val = loaders()
        trainer([callback] if callback else []).fit(module, train, val)
        runs[name] = (module, callback)
    assert runs["plain"][0].first_samples == runs["none"][0].first_samples
    assert runs["cache"][0].first_samples == runs["none"][0].first_samples
    assert runs["cache"][0].losses == pytest.approx(runs["plain"][0].losses, rel=1e-5)
    cache = runs["cache"][1].summary()["cache"]
    assert cache["routed_batches"] == 30 and cache["hits"] > 0  # epochs 2 to 4
    assert runs["plain"][1].summary()["cache"]["state"] == "off"


@pytest.mark.slow  # starts the reference worker's process
def test_the_shipped_default_policy_deploys_through_fit():
    module = Classifier()
    # the reference worker gets the ResidualNet (an importable class), not the test's module
    callback = FreezePolicyCallback("default", decisions=6, model_attr="model")
    train, val = loaders()
    trainer([callback], max_epochs=3).fit(module, train, val)

    summary = callback.controller.summary()
    assert summary["policy"] == "default" and summary["steps"] == 30
    assert summary["decision_steps"] == [0, 5, 10, 15, 20, 25]
    assert len(summary["timeline"]) == 6
    assert summary["signals"]["observations"] == 6
    assert [step for step, _ in summary["validation"]] == [10, 20, 30]
    assert callback.summary()["signals"]["plasticity_fraction"] > 0  # the reference worker ran


def test_building_and_misuse_fail_with_what_to_pass():
    callback = prefix_callback()
    with pytest.raises(RuntimeError, match="exists once training starts"):
        _ = callback.controller
    train, val = loaders()
    with pytest.raises(ValueError, match=r"has no submodule 'net'; .* parameters are: model"):
        trainer([prefix_callback(model_attr="net")]).fit(Classifier(), train, val)

    class NoForward(Classifier):
        forward = pl.LightningModule.forward

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.model(batch[0]), batch[1])

    with pytest.raises(ValueError, match=r"could not run NoForward\(Tensor\[8, 1, 16\]\)"):
        trainer([prefix_callback()]).fit(NoForward(), train, val)
    callback = prefix_callback(model_attr="model")
    trainer([callback], max_steps=2).fit(NoForward(), train, val)  # the submodule traces
    assert callback.summary()["units"][0].startswith("stem")

    class TwoOptimizers(Classifier):
        automatic_optimization = False

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.model.head.parameters(), lr=0.1),
                torch.optim.SGD(self.model.stem.parameters(), lr=0.1),
            ]

    with pytest.raises(RuntimeError, match="drives one optimizer; configure_optimizers returned 2"):
        trainer([prefix_callback()]).fit(TwoOptimizers(), train, val)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        FreezePolicyCallback(FreezePrefix(), mode="lower")
    # several processes under a strategy that does not wrap the model in DDP (FSDP, DeepSpeed)
    distributed = types.SimpleNamespace(
        world_size=2, strategy=types.SimpleNamespace(model=Classifier()), optimizers=[None]
    )
    with pytest.raises(RuntimeError, match=r"DDP strategy only; .* wraps the model in Classifier"):
        prefix_callback()._build_controller(distributed, Classifier())


# --------------------------------------------------------------------------- DDP, two ranks

DDP_TIMEOUT_S = 120  # the ranks take ~10 s; only a hang comes near this
DDP_PLAN = ["TTTTT", "FFFFT", "TFFTT", "FFTTT", "FFFFT"]  # every 3 steps, rank 0's policy
# rank 0's val_loss falls at the second validation (step 10): the safety net unfreezes; rank 1's
# would not, and it is not judged
DDP_VAL = {0: [1.0, 2.0, 2.0], 1: [1.0, 0.5, 0.5]}


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(__file__, tmp_path_factory.mktemp("lightning-ddp"), timeout=DDP_TIMEOUT_S)


@pytest.mark.slow
def test_under_ddp_every_rank_applies_rank_zero_decisions_and_stays_bitwise_identical(ddp_ranks):
    zero, one = (r["fit"] for r in ddp_ranks)
    assert torch.equal(zero["params"], one["params"])
    assert zero["timeline"] == one["timeline"]
    assert zero["timeline"] == [
        ("TTTTT", "policy"),
        ("FFFFT", "policy"),
        ("TFFTT", "policy"),  # partly unfrozen: two trainable spans in a bucket
        ("FFTTT", "policy"),
        # rank 0's val_loss fell at step 10 (rank 1's did not): the unit frozen since the best
        # validation (step 5) trains again, and is held in TRAIN at the next decision
        ("TFTTT", "safety net"),
        ("TFFFT", "policy"),
    ]
    assert zero["validation"] == one["validation"] == [[5, 1.0], [10, 2.0], [15, 2.0]]
    assert [s["modes"] for s in zero["steps"]] == [s["modes"] for s in one["steps"]]
    assert zero["policy_calls"] == 5 and one["policy_calls"] == 0  # rank 1's never decided
    # the reference worker and the signals on rank 0 only
    assert zero["reference"] and zero["signals"] and zero["observations"] == 5
    assert not one["reference"] and not one["signals"] and one["observations"] == 0
    assert zero["logged_rows"] > 0  # the freeze metrics reach rank 0's CSV logger


@pytest.mark.slow
def test_under_ddp_the_bytes_saved_are_the_frozen_gradient_bytes_of_every_step(ddp_ranks):
    for result in (r["fit"] for r in ddp_ranks):
        steps = result["steps"]
        assert len(steps) == 15
        for step in steps:
            assert step["last_step"]["bytes_full"] == result["total_bytes"]
            assert step["last_step"]["bytes_saved"] == step["frozen_bytes"]
            assert step["frozen_grads_none"]
        ddp = result["summary_ddp"]  # the callback's summary is the distributed one
        assert ddp["world_size"] == 2 and ddp["comm_hook"] and ddp["syncs"] == 15
        assert ddp["bytes_saved"] == sum(s["frozen_bytes"] for s in steps) > 0


@pytest.mark.slow
def test_under_ddp_a_resumed_fit_loads_rank_zero_checkpoint_on_every_rank(ddp_ranks):
    for result in ddp_ranks:
        fit, resumed = result["fit"], result["resumed"]
        assert resumed["steps_taken"] == 5  # steps 11..15 after the checkpoint at step 10
        assert resumed["timeline"] == fit["timeline"]
        assert resumed["validation"] == fit["validation"]
        # the same steps from the same state: the same bits as the fit that went on
        assert torch.equal(resumed["params"], fit["params"])
    assert torch.equal(ddp_ranks[0]["resumed"]["params"], ddp_ranks[1]["resumed"]["params"])


@pytest.mark.slow
def test_under_ddp_a_strategy_without_find_unused_parameters_fails_saying_what_to_pass(
    ddp_ranks,
):
    for result in ddp_ranks:
        message = result["refused"]
        assert "needs find_unused_parameters=True" in message
        assert 'Trainer(strategy="ddp_find_unused_parameters_true")' in message


class DDPRecorder(StepRecorder, pl.Callback):
    """``StepRecorder`` before each optimizer step (the backward done, the all-reduce with it)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.record()


def ddp_fit(
    rank: int, out: Path, strategy: str, ckpt_path: Path | None = None
) -> tuple[pl.Trainer, FreezePolicyCallback, Classifier, DDPRecorder]:
    """One fit on this rank: 3 epochs of 5 steps (40 of the 80 samples per rank, batches of
    8), validated after each, rank 0's policy following ``DDP_PLAN``, the reference worker on;
    checkpoints after each epoch's validation (saved by rank 0), a CSV log. Resumed from the
    checkpoint of epoch 1 (``ckpt_path``), it validates once more, with the third value."""
    module = Classifier(synthetic_val=DDP_VAL[rank][2 if ckpt_path is not None else 0 :])
    plan = DDP_PLAN if rank == 0 else ["TTTTT"]
    callback = FreezePolicyCallback(
        ScriptedModes(plan),
        interval_steps=3,
        model_attr="model",  # the reference worker gets the ResidualNet, an importable class
        safety_net=SafetyNet(loss_tolerance=100.0, divergence_factor=100.0),
    )
    recorder = DDPRecorder(callback)
    fit = trainer(
        [callback, recorder, ModelCheckpoint(out / "checkpoints", save_top_k=-1)],
        max_epochs=3,
        devices=2,
        num_nodes=1,
        strategy=strategy,
        enable_checkpointing=True,
        logger=CSVLogger(out / "logs", name="ddp"),
        log_every_n_steps=1,
    )
    train, val = loaders()
    fit.fit(module, train, val, ckpt_path=ckpt_path)
    return fit, callback, module, recorder


def run_ddp_rank(out: Path) -> None:
    """This rank's three fits: refused (no find_unused_parameters), whole, resumed."""
    torch.set_num_threads(1)
    rank, world = rank_and_world()
    assert world == 2
    warnings.filterwarnings("ignore")
    result: dict[str, Any] = {}
    try:
        ddp_fit(rank, out / "refused", "ddp")
    except ValueError as error:
        result["refused"] = str(error)
    fit, callback, module, recorder = ddp_fit(rank, out, "ddp_find_unused_parameters_true")
    assert fit.world_size == 2 and fit.global_rank == rank
    summary = callback.summary()
    logged = 0
    if rank == 0:
        with open(Path(fit.logger.log_dir) / "metrics.csv", newline="") as file:
            logged = sum(1 for row in csv.DictReader(file) if row.get("freeze/frozen_fraction"))
    result["fit"] = {
        "params": flat_parameters(module),
        "timeline": list(zip(summary["timeline"], summary["causes"], strict=True)),
        "validation": summary["validation"],
        "policy_calls": callback.policy._calls,
        "observations": summary["signals"]["observations"],
        "steps": recorder.steps,
        "summary_ddp": summary["ddp"],
        "total_bytes": sum(p.numel() * p.element_size() for p in module.model.parameters()),
        "logged_rows": logged,
        **recorder.observed,
    }
    checkpoint = out / "checkpoints" / "epoch=1-step=10.ckpt"
    fit, callback, module, recorder = ddp_fit(
        rank, out / "resumed", "ddp_find_unused_parameters_true", ckpt_path=checkpoint
    )
    summary = callback.summary()
    result["resumed"] = {
        "params": flat_parameters(module),
        "timeline": list(zip(summary["timeline"], summary["causes"], strict=True)),
        "validation": summary["validation"],
        "steps_taken": len(recorder.steps),
    }
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    try:
        run_ddp_rank(Path(sys.argv[1]))
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
