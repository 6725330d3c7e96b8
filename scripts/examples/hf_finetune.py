"""Fine-tune the bundled MiniLM on Rotten Tomatoes with the Hugging Face Trainer, under a policy.

The task is freeze-agent's held-out `rotten-tomatoes-minilm` (envs/heldout): the pretrained
all-MiniLM-L6-v2 encoder with a mean-pooling head on reviews of 32 tokens, as `freeze_agent.tasks`
loads it. To finish in about a minute on two CPU cores, it trains on the first 512 of the task's
1,024 training reviews (16 steps of 32 per epoch, 2 epochs); validation (256 reviews) and test
(512) are the task's. Its optimizer settings and schedule become the Trainer's arguments. The
training is what a Trainer user writes anyway (AdamW, a linear schedule with warmup, an evaluation
per epoch); freeze-agent adds one line, marked `# freeze-agent`:

    callbacks.append(freeze := FreezePolicyCallback(policy))  # freeze-agent

The per-epoch validation accuracy feeds the safety net (`metric_for_best_model="accuracy"`).

    python scripts/examples/hf_finetune.py                    # under the shipped policy
    python scripts/examples/hf_finetune.py --policy none      # the same training, no freezing

It prints the training time, the test accuracy and the controller's summary (as JSON with --json:
the last line is one JSON object). `train_seconds` is the wall time of the training epochs, from
each `on_epoch_begin` to its `on_epoch_end`: every optimizer step and freeze-agent's decisions,
not the evaluations after the epochs nor the set-up before the first (the same measurement with
and without a policy, as in plain_loop.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

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


def train(policy: str, seed: int, epochs: int | None) -> dict[str, Any]:
    task = load_task(TASK)
    data = task.load_data()
    train_split = Split(*data.train.batch(torch.arange(min(TRAIN_REVIEWS, len(data.train)))))
    epochs = epochs or task.epochs
    torch.manual_seed(seed)
    model = WithLoss(task.build_model(data))
    steps_per_epoch = len(train_split) // task.batch_size
    timer = EpochTimer()
    callbacks: list[TrainerCallback] = [timer]
    freeze = None
    if policy != "none":
        callbacks.append(freeze := FreezePolicyCallback(policy))  # freeze-agent
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            use_cpu=True,
            report_to=[],
            seed=seed,
            num_train_epochs=epochs,
            per_device_train_batch_size=task.batch_size,
            per_device_eval_batch_size=256,
            dataloader_drop_last=True,
            learning_rate=task.optimizer.lr,
            weight_decay=task.optimizer.weight_decay,
            adam_beta1=task.optimizer.betas[0],
            adam_beta2=task.optimizer.betas[1],
            lr_scheduler_type="linear",
            warmup_steps=int(task.schedule.warmup_epochs * steps_per_epoch),
            eval_strategy="epoch",
            metric_for_best_model="accuracy",
            logging_strategy="epoch",
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Reviews(train_split),
            eval_dataset=Reviews(data.val),
            compute_metrics=accuracy,
            callbacks=callbacks,
        )
        trainer.train()
        test = trainer.evaluate(Reviews(data.test), metric_key_prefix="test")
    result: dict[str, Any] = {
        "integration": "hf",
        "model": "minilm",
        "policy": policy,
        "seed": seed,
        "train_seconds": timer.seconds,
        "test_accuracy": test["test_accuracy"],
    }
    if freeze is not None:
        result["summary"] = freeze.summary()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="default", help="a policy name, folder, or none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="training epochs (default: the task's, 2)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(args.policy, args.seed, args.epochs)
    if args.json:
        print(json.dumps(result))
        return result
    print(
        f"minilm under {args.policy}: {result['train_seconds']:.1f} s of training, "
        f"test accuracy {100 * result['test_accuracy']:.2f}%"
    )
    summary = result.get("summary")
    if summary:
        print(
            f"modeled speedup {summary['modeled_speedup']:.2f}x, cache "
            f"{summary['cache']['state']} ({summary['cache']['reason_off'] or 'on'}), "
            f"safety net interventions: {len(summary['safety_net'] or [])}"
        )
        print("last modes:", summary["timeline"][-1], "over", ", ".join(summary["units"]))
    return result


if __name__ == "__main__":
    main()
