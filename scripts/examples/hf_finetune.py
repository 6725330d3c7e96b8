"""Fine-tune the bundled MiniLM on Rotten Tomatoes with the Hugging Face Trainer, under a policy.

The task is freeze-agent's held-out `rotten-tomatoes-minilm` (envs/heldout): the pretrained
all-MiniLM-L6-v2 encoder with a mean-pooling head on reviews of 32 tokens, as `freeze_agent.tasks`
loads it. To finish in about a minute on two CPU cores, it trains on the first 512 of the task's
1,024 training reviews (16 steps of 32 per epoch, 2 epochs); validation (256 reviews) and test
(512) are the task's. Its optimizer settings and schedule become the Trainer's arguments. The
training is what a Trainer user writes anyway (AdamW, a linear schedule with warmup, an evaluation
per epoch); freeze-agent adds one line, marked `# freeze-agent`:

    callbacks.append(freeze := FreezePolicyCallback(policy, cache=True))  # freeze-agent

The per-epoch validation accuracy feeds the safety net (`metric_for_best_model="accuracy"`).

    python scripts/examples/hf_finetune.py                    # under the shipped policy
    python scripts/examples/hf_finetune.py --policy none      # the same training, no freezing
    python scripts/examples/hf_finetune.py --model vit        # a model no freeze-agent task uses

`--model vit` or `--model resnet` trains, instead, `plain_loop.py`'s `transformers` ViT or ResNet
(small configs, random init) on scikit-learn's digits at 32x32 with the same Trainer set-up (8
epochs, AdamW at 3e-3, a linear schedule with 10% warmup), the model computing its own loss from
the batch's `labels`.
    torchrun --standalone --nproc_per_node 2 scripts/examples/hf_finetune.py   # DDP on CPU

It prints the training time, the test accuracy and the controller's summary (as JSON with --json:
the last line is one JSON object). `train_seconds` is the wall time of the training epochs, from
each `on_epoch_begin` to its `on_epoch_end`: every optimizer step and freeze-agent's decisions,
not the evaluations after the epochs nor the set-up before the first (the same measurement with
and without a policy, as in plain_loop.py).

Under `torchrun` (its WORLD_SIZE in the environment) the Trainer trains data-parallel on CPU
(`ddp_backend="gloo"`), each rank on its share of every batch of 32; the callback is the same
line (rank 0 decides, every rank applies its modes, frozen units leave the gradient all-reduce:
see `freeze_agent.integrations.hf`). Each rank prints, one after the other, a line as `ddp.py`
does: its parameter checksum (equal on every rank: the ranks stay identical) and the all-reduce
bytes saved; rank 0 adds the test accuracy and the summary. With --json each rank's last line
is its JSON object, carrying its `rank`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ddp.py, plain_loop.py, beside this
from ddp import checksum, report_ranks
from plain_loop import build_model, digits, print_result

from freeze_agent.integrations.hf import FreezePolicyCallback
from freeze_agent.tasks.data import Split
from freeze_agent.tasks.spec import load_task

transformers.logging.set_verbosity_error()

TASK = "rotten-tomatoes-minilm"
TRAIN_REVIEWS = 512  # of the task's 1,024, so that the example runs in about a minute


class Reviews(torch.utils.data.Dataset):
    """One split of the task as the Trainer reads a dataset: a dict of tensors per review."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = {name: values[i] for name, values in self.split.inputs.items()}  # type: ignore[union-attr]
        return {**row, "labels": self.split.targets[i]}


class Images(torch.utils.data.Dataset):
    """A split of the digits as the Trainer reads a dataset: pixel values and a label."""

    def __init__(self, split: torch.utils.data.TensorDataset) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pixels, label = self.split[i]
        return {"pixel_values": pixels, "labels": label}


class WithLoss(nn.Module):
    """The task's classifier, returning what the Trainer expects: the loss (given labels) and
    the logits."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class EpochTimer(TrainerCallback):
    """Wall time of the training epochs (on_epoch_begin to on_epoch_end): the evaluation after
    each epoch is left out."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs) -> None:
        self.seconds += time.perf_counter() - self._started


def accuracy(prediction: transformers.EvalPrediction) -> dict[str, float]:
    logits = prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


def setup(model_name: str, seed: int, epochs: int | None) -> dict[str, Any]:
    """The model, the three splits as Trainer datasets and the optimizer settings."""
    if model_name != "minilm":
        data = digits(seed)
        torch.manual_seed(seed)
        batches = len(data["train"]) // 32
        return {
            "model": build_model(model_name),
            "splits": [Images(data[name]) for name in ("train", "val", "test")],
            "epochs": epochs or 8,
            "batch_size": 32,
            "lr": 3e-3,
            "weight_decay": 0.01,
            "betas": (0.9, 0.999),
            "warmup_steps": int(0.1 * (epochs or 8) * batches),
        }
    task = load_task(TASK)
    data = task.load_data()
    train_split = Split(*data.train.batch(torch.arange(min(TRAIN_REVIEWS, len(data.train)))))
    torch.manual_seed(seed)
    return {
        "model": WithLoss(task.build_model(data)),
        "splits": [Reviews(train_split), Reviews(data.val), Reviews(data.test)],
        "epochs": epochs or task.epochs,
        "batch_size": task.batch_size,
        "lr": task.optimizer.lr,
        "weight_decay": task.optimizer.weight_decay,
        "betas": task.optimizer.betas,
        "warmup_steps": int(task.schedule.warmup_epochs * (len(train_split) // task.batch_size)),
    }


def train(model_name: str, policy: str, seed: int, epochs: int | None) -> dict[str, Any]:
    """Fine-tune on this process, or on this rank under torchrun (DDP over gloo), the task's
    batch of 32 split over the ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's
    run = setup(model_name, seed, epochs)
    model = run["model"]
    train_data, val_data, test_data = run["splits"]
    timer = EpochTimer()
    callbacks: list[TrainerCallback] = [timer]
    freeze = None
    if policy != "none":
        callbacks.append(freeze := FreezePolicyCallback(policy, cache=True))  # freeze-agent
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            use_cpu=True,
            report_to=[],
            seed=seed,
            num_train_epochs=run["epochs"],
            per_device_train_batch_size=run["batch_size"] // world,
            ddp_backend="gloo" if world > 1 else None,  # DDP on CPU under torchrun
            per_device_eval_batch_size=256 // world,  # drop_last: every rank a whole batch
            dataloader_drop_last=True,
            learning_rate=run["lr"],
            weight_decay=run["weight_decay"],
            adam_beta1=run["betas"][0],
            adam_beta2=run["betas"][1],
            lr_scheduler_type="linear",
            warmup_steps=run["warmup_steps"],
            eval_strategy="epoch",
            metric_for_best_model="accuracy",
            logging_strategy="epoch",
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_data,
            eval_dataset=val_data,
            compute_metrics=accuracy,
            callbacks=callbacks,
        )
        trainer.train()
        test = trainer.evaluate(test_data, metric_key_prefix="test")
    result: dict[str, Any] = {
        "integration": "hf",
        "model": model_name,
        "policy": policy,
        "seed": seed,
        "train_seconds": timer.seconds,
    }
    if world > 1:
        digest, param_sum = checksum(model)
        result.update(rank=args.process_index, world_size=world)
        result.update(checksum=digest, param_sum=param_sum)
        if freeze is not None:
            stats = freeze.summary()["ddp"]
            result.update(bytes_saved=stats["bytes_saved"], bytes_total=stats["bytes_full"])
        else:  # plain DDP all-reduces every trainable parameter's gradient at every step
            size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            result.update(bytes_saved=0, bytes_total=trainer.state.global_step * size)
    if args.process_index == 0:
        result["test_accuracy"] = test["test_accuracy"]
        if freeze is not None:
            result["summary"] = freeze.summary()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["minilm", "vit", "resnet"], default="minilm")
    parser.add_argument("--policy", default="default", help="a policy name, folder, or none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="default: the task's 2 (minilm), else 8")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(args.model, args.policy, args.seed, args.epochs)
    if "rank" in result:
        report_ranks(result, args.json)
    else:
        print_result(result, args.json, f"{args.model} under {args.policy}")
    return result


if __name__ == "__main__":
    main()
