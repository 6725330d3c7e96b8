"""``FreezePolicyCallback`` for the Hugging Face Trainer: a freeze policy deployed through
``Trainer.train()`` decides at the planned optimizer steps (gradient accumulation included) with
the Trainer's own loss, keeps frozen parameters bitwise still under clipping, bf16 autocast and
weight decay, feeds the evaluation metric to the safety net, logs through the Trainer's logging
(to reporters registered before it and to ``state.log_history``), resumes from the Trainer's
checkpoints with the same decisions, serves the activation cache through the Trainer's loader
and leaves the data order alone; under DDP (two ranks run this file as a script,
``ranks.run_ranks``) every rank applies rank 0's decisions, stays bitwise identical and leaves
the frozen gradients out of the all-reduce, also when resumed."""

from __future__ import annotations

import importlib
import itertools
import math
import sys
import traceback
import types
import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
import torch.nn.functional as F
from helpers import FreezePrefix
from ranks import (
    ScriptedModes,
    StepRecorder,
    flat_parameters,
    rank_and_world,
    run_ranks,
)
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from freeze_agent import Mode
from freeze_agent.controller.safety_net import SafetyNet
from freeze_agent.integrations.hf import CHECKPOINT_FILE, FreezePolicyCallback, _ddp_wrapper

BATCH = 4
VOCAB, LENGTH = 50, 8


class Tokens(torch.utils.data.Dataset):
    """``samples`` random token rows labelled by their first token: a dict per sample."""

    def __init__(self, samples: int, seed: int = 1) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (samples, LENGTH), generator=generator)
        self.labels = (self.ids[:, 0] >= VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class TinyClassifier(nn.Module):
    """Embedding, two blocks, a head; every boundary is a cut point. Its forward takes no
    ``**kwargs``, so the Trainer divides its loss by the accumulation steps itself."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.block1 = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.head(self.block2(self.block1(self.embed(input_ids))).mean(1))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def tiny_bert() -> BertForSequenceClassification:
    """A 2-layer BERT (5 units); it takes ``**kwargs``, so the Trainer passes it
    ``num_items_in_batch`` and does not divide its loss by the accumulation steps."""
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


MODELS = {"tiny": TinyClassifier, "bert": tiny_bert}


def make_trainer(
    tmp_path,
    callbacks: list[TrainerCallback],
    *,
    model: str = "tiny",
    samples: int = 32,
    eval_dataset: Tokens | None = None,
    compute_metrics=None,
    compute_loss_func=None,
    run: str = "run",
    **overrides: Any,
) -> Trainer:
    """A Trainer on CPU over ``samples`` token rows, the model built from seed 0."""
    torch.manual_seed(0)
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path / run),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": 8,
        "num_train_epochs": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "learning_rate": 1e-2,
    }
    return Trainer(
        model=MODELS[model](),
        args=TrainingArguments(**{**settings, **overrides}),
        train_dataset=Tokens(samples),
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        compute_loss_func=compute_loss_func,
        callbacks=callbacks,
    )


def deterministic(start: int = 2, **kwargs: Any) -> FreezePolicyCallback:
    """The callback under ``FreezePrefix`` (every unit but the head FROZEN from decision
    ``start``), without the reference worker."""
    return FreezePolicyCallback(FreezePrefix(start=start), reference=False, **kwargs)


def step_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


class Recorder(TrainerCallback):
    """Records the logs it is handed, the events it sees and, at each step end, what the
    ``snapshot`` function returns."""

    def __init__(self, snapshot=None) -> None:
        self.logs: list[dict[str, Any]] = []
        self.events: dict[str, int] = {}
        self.snapshots: list[Any] = []
        self.snapshot = snapshot

    def _count(self, event: str) -> None:
        self.events[event] = self.events.get(event, 0) + 1

    def on_train_begin(self, args, state, control, **kwargs):
        self._count("train_begin")

    def on_step_end(self, args, state, control, **kwargs):
        self._count("step_end")
        if self.snapshot is not None:
            self.snapshots.append(self.snapshot())

    def on_evaluate(self, args, state, control, **kwargs):
        self._count("evaluate")
        if self.snapshot is not None:
            self.snapshots.append(self.snapshot())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


# --------------------------------------------------------------------------- decisions and loss


@pytest.mark.parametrize(
    ("model", "accumulation", "max_steps"),
    [("tiny", 1, 18), ("tiny", 2, 10), ("bert", 2, 10)],
    ids=["tiny", "tiny-accumulate2", "bert-accumulate2"],
)
def test_decisions_at_the_planned_steps_with_the_trainers_loss(
    tmp_path, model, accumulation, max_steps
):
    callback = deterministic(decisions=5)
    # 36 samples: 9 batches per epoch, so accumulating 2 ends each epoch with a 1-batch step
    trainer = make_trainer(
        tmp_path, [callback], model=model, samples=36, gradient_accumulation_steps=accumulation
    )
    trainer.train()
    summary = callback.summary()
    assert trainer.state.max_steps == max_steps
    interval = math.ceil(max_steps / 5)
    assert summary["steps"] == max_steps  # controller.step once per optimizer step
    assert summary["decision_steps"] == list(range(0, max_steps, interval))
    assert summary["timeline"][0] == "T" * len(summary["units"])
    assert summary["timeline"][1:] == ["F" * (len(summary["units"]) - 1) + "T"] * 4
    # the controller's loss is the Trainer's: each closed interval's mean of the logged losses
    logged = step_losses(trainer)
    assert len(logged) == max_steps
    intervals = callback.controller.interval_losses
    assert len(intervals) == 4
    for i, mean in enumerate(intervals):
        expected = sum(logged[i * interval : (i + 1) * interval]) / interval
        assert mean == pytest.approx(expected, rel=1e-5)
    assert callback.controller.last_loss == pytest.approx(logged[-1], rel=1e-5)
    # controller.step ran while this step's gradients were there (the Trainer zeroes them
    # before on_step_end): every unit's gradient signal was measured
    assert all(d.grad_l1 > 0 for d in callback.controller.dynamics.dynamics)


def test_per_unit_learning_rates_act_on_the_trainers_optimizer(tmp_path):
    # FreezeOut scales each unit's learning rate through step hooks on the torch optimizer
    # inside accelerate's AcceleratedOptimizer (the wrapper has no hook tables of its own)
    callback = FreezePolicyCallback("freezeout", decisions=8, reference=False)
    recorder = Recorder(lambda: callback.controller._lr_scales)
    trainer = make_trainer(tmp_path, [callback, recorder])
    trainer.train()
    assert any(scales is not None and min(scales) < 1.0 for scales in recorder.snapshots)
    assert callback.summary()["timeline"][-1].startswith("F")


def test_without_a_model_loss_the_error_names_record_loss_which_then_feeds_the_controller(
    tmp_path,
):
    def loss_func(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits, labels)

    callback = deterministic(interval_steps=4)
    trainer = make_trainer(tmp_path, [callback], compute_loss_func=loss_func, run="a")
    with pytest.raises(RuntimeError, match=r"callback\.record_loss\(loss\)"):
        trainer.train()

    callback = deterministic(interval_steps=4)

    def recorded(outputs, labels, num_items_in_batch=None):
        loss = loss_func(outputs, labels)
        callback.record_loss(loss)
        return loss

    trainer = make_trainer(tmp_path, [callback], compute_loss_func=recorded, run="b")
    trainer.train()
    logged = step_losses(trainer)
    assert callback.summary()["steps"] == 16
    assert callback.controller.interval_losses[0] == pytest.approx(sum(logged[:4]) / 4, rel=1e-5)


class BatchOrder(TrainerCallback):
    """Records the input_ids of every training forward from the first epoch on (after the
    controller's own probing forwards in on_train_begin)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []
        self._handle = None

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if self._handle is None:
            self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, _args, kwargs):
        if module.training:
            self.seen.append(kwargs["input_ids"].clone())


def test_the_data_order_is_the_trainers_own(tmp_path):
    orders = []
    for policy in (None, FreezePrefix(start=2)):
        order = BatchOrder()
        callbacks: list[TrainerCallback] = [order]
        if policy is not None:
            callbacks.append(FreezePolicyCallback(policy, reference=False))
        make_trainer(tmp_path, callbacks, run=f"run-{len(orders)}").train()
        orders.append(torch.cat(order.seen))
    assert len(orders[0]) == 2 * 32
    assert torch.equal(orders[0], orders[1])


# --------------------------------------------------------------------------- frozen parameters


def test_frozen_parameters_stay_bitwise_still_under_clipping_bf16_and_weight_decay(tmp_path):
    callback = deterministic(start=2, interval_steps=2)
    model_holder: list[nn.Module] = []

    def snapshot():
        return {n: p.detach().clone() for n, p in model_holder[0].named_parameters()}

    recorder = Recorder(snapshot)
    trainer = make_trainer(
        tmp_path,
        [callback, recorder],
        model="bert",
        num_train_epochs=3,
        gradient_accumulation_steps=2,  # 4 steps per epoch
        max_grad_norm=0.01,
        bf16=True,
        weight_decay=0.5,
    )
    model_holder.append(trainer.model)
    trainer.train()
    assert trainer.args.optim.value.startswith("adamw_torch")  # the Trainer's own AdamW
    assert trainer.accelerator.mixed_precision == "bf16"
    assert max(e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e) > 0.01
    units = callback.controller.units
    frozen = {n for u in units[:-1] for n, p in trainer.model.named_parameters() if _in(p, u)}
    head = {n for n, p in trainer.model.named_parameters() if _in(p, units[-1])}
    assert frozen and head
    steps = recorder.snapshots  # after optimizer steps 1..12; the freeze is decided at step 2
    assert len(steps) == 12
    assert any(not torch.equal(steps[0][n], steps[1][n]) for n in frozen)  # trained before
    for before, after in itertools.pairwise(steps[1:]):
        for name in frozen:
            assert torch.equal(before[name], after[name]), name
        assert any(not torch.equal(before[n], after[n]) for n in head)
    # after training every unit is back in TRAIN, its parameters trainable again
    assert callback.controller.modes == [Mode.TRAIN] * len(units)
    assert all(p.requires_grad for p in trainer.model.parameters())


def _in(parameter: torch.Tensor, unit) -> bool:
    return any(parameter is p for p in unit.parameters())


# --------------------------------------------------------------------------- safety net


class Scripted:
    """``compute_metrics`` returning the next of ``accuracies`` at each evaluation."""

    def __init__(self, *accuracies: float) -> None:
        self.accuracies = list(accuracies)

    def __call__(self, _prediction) -> dict[str, float]:
        return {"accuracy": self.accuracies.pop(0)}


def test_the_evaluation_metric_reaches_the_safety_net(tmp_path):
    callback = deterministic(
        start=2, interval_steps=2, safety_net=SafetyNet(tolerance=0.01, hold_decisions=2)
    )
    recorder = Recorder(lambda: callback.controller.modes)
    trainer = make_trainer(
        tmp_path,
        [callback, recorder],
        num_train_epochs=1,  # 8 steps
        eval_dataset=Tokens(8, seed=2),
        compute_metrics=Scripted(0.9, 0.5),
        eval_strategy="steps",
        eval_steps=4,
        metric_for_best_model="accuracy",  # the callback's metric: eval_accuracy, higher better
    )
    with pytest.warns(UserWarning, match="safety net at step 8: the validation metric 0.5"):
        trainer.train()
    summary = callback.summary()
    assert summary["validation"] == [[4, 0.9], [8, 0.5]]
    assert [e["step"] for e in summary["safety_net"]] == [8]
    assert summary["causes"][-1] == "safety net"
    assert summary["timeline"][-1] == "T" * len(summary["units"])
    at_evaluations = recorder.snapshots[-2:]  # modes right after each evaluation
    assert at_evaluations[0][0] is Mode.FROZEN
    assert at_evaluations[1] == [Mode.TRAIN] * len(summary["units"])


def test_a_missing_metric_warns_once_naming_the_metrics_there_are(tmp_path):
    callback = deterministic(metric="eval_f1", interval_steps=4)
    trainer = make_trainer(
        tmp_path,
        [callback],
        num_train_epochs=1,
        eval_dataset=Tokens(8, seed=2),
        eval_strategy="steps",
        eval_steps=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [str(w.message) for w in caught if "FreezePolicyCallback" in str(w.message)]
    assert len(ours) == 1
    assert "'eval_f1'" in ours[0] and "eval_loss" in ours[0]
    assert callback.summary()["validation"] == []


# --------------------------------------------------------------------------- logging


def test_the_freeze_metrics_reach_a_reporter_registered_before_and_the_log_history(tmp_path):
    reporter = Recorder()
    callback = deterministic(start=2, interval_steps=4)
    trainer = make_trainer(
        tmp_path,
        [reporter, callback],
        num_train_epochs=1,
        eval_dataset=Tokens(8, seed=2),
        eval_strategy="steps",
        eval_steps=4,
    )
    assert trainer.callback_handler.callbacks.index(reporter) < (
        trainer.callback_handler.callbacks.index(callback)
    )
    trainer.train()
    assert reporter.events == {"train_begin": 1, "step_end": 8, "evaluate": 2}  # none skipped
    keys = {"freeze/frozen_fraction", "freeze/modeled_speedup", "freeze/units_frozen"}
    keys |= {f"freeze/mode/{u:02d}" for u in range(len(callback.controller.units))}
    for logs in (reporter.logs, trainer.state.log_history):
        training = [entry for entry in logs if "loss" in entry]
        assert len(training) == 8
        assert all(keys <= entry.keys() for entry in training)
        fractions = [entry["freeze/frozen_fraction"] for entry in training]
        assert fractions[:3] == [0.0] * 3 and 0.5 < fractions[-1] < 1.0  # frozen at step 4
        assert training[-1]["freeze/mode/00"] == float(Mode.FROZEN)
        assert training[-1]["freeze/modeled_speedup"] > 1.0
        assert all("freeze/frozen_fraction" not in e for e in logs if "eval_loss" in e)
        assert "freeze/frozen_fraction" in next(e for e in logs if "train_loss" in e)


# --------------------------------------------------------------------------- checkpoints


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_resumed_run_continues_with_the_same_decisions(tmp_path):
    settings = {
        "eval_dataset": Tokens(8, seed=2),
        "eval_strategy": "steps",
        "eval_steps": 4,
        "save_strategy": "steps",
        "save_steps": 7,  # mid-interval and mid-epoch (8 steps per epoch, 24 in all)
        "num_train_epochs": 3,
    }

    def callback(cache: bool = False) -> FreezePolicyCallback:
        return deterministic(start=3, interval_steps=3, cache=cache)

    whole = callback()
    trainer = make_trainer(tmp_path, [whole], run="whole", **settings)
    trainer.train()
    expected, expected_losses = whole.summary(), step_losses(trainer)

    interrupted = callback()
    trainer = make_trainer(tmp_path, [interrupted, StopAt(7)], run="stopped", **settings)
    trainer.train()
    checkpoint = tmp_path / "stopped" / "checkpoint-7"
    assert (checkpoint / CHECKPOINT_FILE).is_file()
    assert interrupted.summary()["steps"] == 7

    # resume_from_checkpoint=True finds the checkpoint in output_dir; a path, anywhere; the
    # cache serves from the third epoch (it skips the resumed one, whose first batches the
    # Trainer draws without running them, and fills in the second)
    variants = [("stopped", True, False), ("elsewhere", str(checkpoint), False)]
    for run, resume, cache in [*variants, ("cached", str(checkpoint), True)]:
        resumed = callback(cache)
        trainer = make_trainer(tmp_path, [resumed], run=run, **settings)
        trainer.train(resume_from_checkpoint=resume)
        summary = resumed.summary()
        for key in ("steps", "timeline", "decision_steps", "causes", "validation", "safety_net"):
            assert summary[key] == expected[key], key
        # the first 7 from the checkpoint's log history, the rest trained again
        assert step_losses(trainer) == pytest.approx(expected_losses, rel=1e-5)
        assert (summary["cache"]["hits"] > 0) is cache

    (checkpoint / CHECKPOINT_FILE).unlink()
    trainer = make_trainer(tmp_path, [callback()], run="stopped", **settings)
    with pytest.raises(FileNotFoundError, match="saved without the callback"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


# --------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_cache_serves_through_the_trainers_loader_and_changes_nothing(tmp_path, accumulation):
    runs = {}
    for cache in (False, True):
        callback = deterministic(start=2, interval_steps=2, cache=cache)
        trainer = make_trainer(
            tmp_path,
            [callback],
            num_train_epochs=3,
            gradient_accumulation_steps=accumulation,
            run=f"cache-{cache}",
        )
        trainer.train()
        runs[cache] = (step_losses(trainer), callback.summary()["cache"])
    assert runs[False][1]["state"] == "off"
    assert runs[True][1]["state"] == "serving" and runs[True][1]["hits"] > 0
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)


# --------------------------------------------------------------------------- deployment


def test_the_shipped_policy_deploys_through_train(tmp_path):
    callback = FreezePolicyCallback("default", decisions=4)
    trainer = make_trainer(tmp_path, [callback], model="bert")
    trainer.train()
    summary = callback.summary()
    assert summary["policy"] == "default"
    assert summary["steps"] == 16 and summary["decision_steps"] == [0, 4, 8, 12]
    assert len(summary["timeline"]) == 4 and summary["signals"]["observations"] == 4
    assert callback.controller.summary()["timeline"] == summary["timeline"]
    assert callback.controller.modes == [Mode.TRAIN] * len(summary["units"])
    assert callback.controller.plasticity is None  # the reference worker is stopped


class Pairs(torch.utils.data.Dataset):
    """Token rows and target rows, for a sequence-to-sequence model."""

    def __len__(self) -> int:
        return 4 * BATCH

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(i)
        return {
            "input_ids": torch.randint(3, VOCAB, (LENGTH,), generator=generator),
            "labels": torch.randint(3, VOCAB, (LENGTH,), generator=generator),
        }


def test_a_sequence_to_sequence_model_is_traced_with_its_labels(tmp_path):
    """T5 builds its decoder inputs from the labels: without them the example batch does not
    run, so the callback keeps them."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    model = T5ForConditionalGeneration(config)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    callback = FreezePolicyCallback("default", decisions=2)
    Trainer(model=model, args=args, train_dataset=Pairs(), callbacks=[callback]).train()
    assert callback.summary()["steps"] == 4


def test_the_controller_is_a_clear_error_before_training():
    with pytest.raises(RuntimeError, match=r"built when training starts .* trainer\.train\(\)"):
        _ = FreezePolicyCallback().controller


def test_a_distributed_run_without_a_ddp_wrapper_is_refused_saying_why(monkeypatch):
    model = TinyClassifier()
    two, one = types.SimpleNamespace(world_size=2), types.SimpleNamespace(world_size=1)
    # several processes, no Trainer found above the event: no wrapper to register the hook on
    with pytest.raises(RuntimeError, match=r"could not find the Trainer .* 2 processes"):
        _ddp_wrapper(None, model, two)
    # a Trainer whose model is not wrapped in DDP: no process group, or another wrapper
    trainer = types.SimpleNamespace(model_wrapped=nn.Sequential(model))
    with pytest.raises(RuntimeError, match=r"without an initialized torch\.distributed"):
        _ddp_wrapper(trainer, model, two)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match=r"DistributedDataParallel only; .* in Sequential"):
        _ddp_wrapper(trainer, model, two)
    assert _ddp_wrapper(trainer, model, one) is None  # a single process: the plain controller


def test_without_the_extra_the_import_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "freeze_agent.integrations.hf")
    with pytest.raises(ImportError, match=r"pip install 'freeze-agent\[hf\]'"):
        importlib.import_module("freeze_agent.integrations.hf")


# --------------------------------------------------------------------------- DDP, two ranks

DDP_TIMEOUT_S = 120  # the ranks take ~10 s; only a hang comes near this
DDP_PLAN = ["TTTTT", "FFFFT", "TFFTT", "FFTTT", "FFFFT"]  # every 2 steps, rank 0's policy
# evaluations at steps 4, 8 and 12: rank 0's accuracy falls at step 8 (the safety net
# unfreezes), rank 1's would not, and it is not judged
DDP_ACCURACY = {0: [0.9, 0.5, 0.5], 1: [0.9, 0.95, 0.95]}


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(__file__, tmp_path_factory.mktemp("hf-ddp"), timeout=DDP_TIMEOUT_S)


@pytest.mark.slow
def test_under_ddp_every_rank_applies_rank_zero_decisions_and_stays_bitwise_identical(ddp_ranks):
    zero, one = (r["train"] for r in ddp_ranks)
    assert torch.equal(zero["params"], one["params"])
    assert zero["timeline"] == one["timeline"]
    assert zero["timeline"] == [
        ("TTTTT", "policy"),
        ("FFFFT", "policy"),
        ("TFFTT", "policy"),  # partly unfrozen: two trainable spans in a bucket
        ("FFTTT", "policy"),
        ("FFFFT", "policy"),  # step 8, just before its evaluation
        # rank 0's accuracy fell at step 8 (rank 1's did not): the units frozen since the best
        # evaluation (step 4) train again, and are held in TRAIN at the next decision
        ("FFTTT", "safety net"),
        ("FFTTT", "policy"),
    ]
    assert zero["validation"] == one["validation"] == [[4, 0.9], [8, 0.5], [12, 0.5]]
    assert zero["policy_calls"] == 6 and one["policy_calls"] == 0  # rank 1's never decided
    # the reference worker and the signals on rank 0 only
    assert zero["reference"] and zero["signals"] and zero["observations"] == 6
    assert not one["reference"] and not one["signals"] and one["observations"] == 0
    # the freeze metrics, the same on every rank, reach every rank's log history
    assert zero["logged_fractions"] == one["logged_fractions"]
    assert len(zero["logged_fractions"]) == 12 and max(zero["logged_fractions"]) > 0.5


@pytest.mark.slow
def test_under_ddp_the_bytes_saved_are_the_frozen_gradient_bytes_of_every_step(ddp_ranks):
    for result in (r["train"] for r in ddp_ranks):
        steps = result["steps"]
        assert len(steps) == 12
        for step in steps:
            assert step["last_step"]["bytes_full"] == result["total_bytes"]
            assert step["last_step"]["bytes_saved"] == step["frozen_bytes"]
            assert step["frozen_grads_none"]
        ddp = result["summary_ddp"]  # the callback's summary is the distributed one
        assert ddp["world_size"] == 2 and ddp["comm_hook"] and ddp["syncs"] == 12
        assert ddp["bytes_saved"] == sum(s["frozen_bytes"] for s in steps) > 0


@pytest.mark.slow
def test_under_ddp_a_resumed_run_loads_the_main_process_checkpoint_on_every_rank(ddp_ranks):
    for result in ddp_ranks:
        whole, resumed = result["train"], result["resumed"]
        assert result["checkpoint_saved"]
        assert resumed["steps_taken"] == 6  # steps 7..12 after the checkpoint at step 6
        assert resumed["timeline"] == whole["timeline"]
        assert resumed["validation"] == whole["validation"]
        # the same steps from the same state: the same bits as the run that went on
        assert torch.equal(resumed["params"], whole["params"])
    assert torch.equal(ddp_ranks[0]["resumed"]["params"], ddp_ranks[1]["resumed"]["params"])


@pytest.mark.slow
def test_under_ddp_without_find_unused_parameters_training_fails_saying_what_to_pass(ddp_ranks):
    for result in ddp_ranks:
        message = result["refused"]
        assert "needs find_unused_parameters=True" in message
        assert "TrainingArguments(ddp_find_unused_parameters=True)" in message


class DDPRecorder(StepRecorder, TrainerCallback):
    """``StepRecorder`` before each optimizer step (the backward done, the all-reduce with it)."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.record()


def ddp_train(
    rank: int, out: Path, run: str, resume: Path | None = None, **overrides: Any
) -> tuple[Trainer, FreezePolicyCallback, DDPRecorder]:
    """One ``train()`` on this rank: the 2-layer BERT, 3 epochs of 4 steps (16 of the 32 rows
    per rank, batches of 4), evaluated every 4 steps, rank 0's policy following ``DDP_PLAN``,
    the reference worker on, a checkpoint at step 6. Resumed from it (``resume``), it
    evaluates twice more, with the last two accuracies."""
    callback = FreezePolicyCallback(
        ScriptedModes(DDP_PLAN if rank == 0 else ["TTTTT"]),
        interval_steps=2,
        safety_net=SafetyNet(loss_tolerance=100.0, divergence_factor=100.0),
    )
    recorder = DDPRecorder(callback)
    trainer = make_trainer(
        out,
        [callback, recorder],
        model="bert",
        run=run,
        num_train_epochs=3,
        ddp_backend="gloo",
        eval_dataset=Tokens(16, seed=2),
        compute_metrics=Scripted(*DDP_ACCURACY[rank][1 if resume is not None else 0 :]),
        metric_for_best_model="accuracy",
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=6,
        **overrides,
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    return trainer, callback, recorder


def run_ddp_rank(out: Path) -> None:
    """This rank's three runs: refused (no find_unused_parameters), whole, resumed."""
    torch.set_num_threads(1)
    rank, world = rank_and_world()
    assert world == 2
    warnings.filterwarnings("ignore")
    result: dict[str, Any] = {}
    try:
        ddp_train(rank, out, "refused", ddp_find_unused_parameters=False)
    except ValueError as error:
        result["refused"] = str(error)
    trainer, callback, recorder = ddp_train(rank, out, "whole")
    assert trainer.args.world_size == 2 and trainer.args.process_index == rank
    summary = callback.summary()
    model = trainer.model
    result["train"] = {
        "params": flat_parameters(model),
        "timeline": list(zip(summary["timeline"], summary["causes"], strict=True)),
        "validation": summary["validation"],
        "policy_calls": callback.policy._calls,
        "observations": summary["signals"]["observations"],
        "steps": recorder.steps,
        "summary_ddp": summary["ddp"],
        "total_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "logged_fractions": [
            e["freeze/frozen_fraction"] for e in trainer.state.log_history if "loss" in e
        ],
        **recorder.observed,
    }
    checkpoint = out / "whole" / "checkpoint-6"
    result["checkpoint_saved"] = (checkpoint / CHECKPOINT_FILE).is_file()  # by the main process
    trainer, callback, recorder = ddp_train(rank, out, "resumed", resume=checkpoint)
    summary = callback.summary()
    result["resumed"] = {
        "params": flat_parameters(trainer.model),
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
