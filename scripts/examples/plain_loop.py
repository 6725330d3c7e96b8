"""Deploy the shipped freeze policy in a plain PyTorch training loop, on a Hugging Face model.

The model is a `transformers` implementation that no freeze-agent task trains (a GPT-2, a ViT or
a ResNet, small configs from random init), the data comes from installed packages (the Python
documentation text for GPT-2, scikit-learn's 8x8 digits for the others), and the loop is what a
user writes anyway: AdamW, a one-cycle schedule, an evaluation per epoch. freeze-agent adds four
lines, marked `# freeze-agent`:

    controller = FreezeController.from_pretrained("default", model, optimizer, example,
                                                  total_steps=epochs * len(loader))
    batches = controller.wrap_loader(loader)   # serves the frozen prefix from the activation cache
    controller.step(loss)                      # after optimizer.step(): decides when due
    controller.report_validation(accuracy)     # the safety net unfreezes if accuracy slips

    python scripts/examples/plain_loop.py --model gpt2            # under the shipped policy
    python scripts/examples/plain_loop.py --model gpt2 --policy none   # the same loop, no freezing

It prints the training time, the test accuracy and the controller's summary (as JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader, TensorDataset

from freeze_agent import FreezeController

transformers.logging.set_verbosity_error()


# --------------------------------------------------------------------------- data


def digits(seed: int, size: int = 32) -> dict[str, TensorDataset]:
    """scikit-learn's 1797 8x8 digits, upsampled to ``size`` x ``size``; 60/20/20 split."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return split(x, torch.tensor(labels), seed)


def python_docs(seed: int, length: int = 64, samples: int = 4000) -> dict[str, TensorDataset]:
    """Character windows of the Python reference topics bundled with CPython; targets are the
    next characters."""
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    chars = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8) % 128
    starts = np.random.default_rng(0).choice(len(chars) - length - 1, samples, replace=False)
    windows = torch.tensor(np.stack([chars[s : s + length + 1] for s in starts]), dtype=torch.long)
    return split(windows[:, :-1], windows[:, 1:], seed)


def split(x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, TensorDataset]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val]}
    parts["test"] = order[n_train + n_val :]
    return {name: TensorDataset(x[rows], y[rows]) for name, rows in parts.items()}


# --------------------------------------------------------------------------- models


def build_model(name: str) -> torch.nn.Module:
    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=128,
            n_positions=64,
            n_embd=64,
            n_layer=4,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(config)
    if name == "vit":
        config = transformers.ViTConfig(
            image_size=32,
            patch_size=4,
            num_channels=1,
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            num_labels=10,
        )
        return transformers.ViTForImageClassification(config)
    if name == "resnet":
        config = transformers.ResNetConfig(
            num_channels=1,
            embedding_size=32,
            hidden_sizes=[32, 64, 128, 256],
            depths=[1, 1, 1, 1],
            layer_type="basic",
            num_labels=10,
            downsample_in_first_stage=False,
        )
        return transformers.ResNetForImageClassification(config)
    raise ValueError(f"unknown model {name!r}: choose gpt2, vit or resnet")


def logits_and_loss(model, name: str, inputs, targets):
    if name == "gpt2":
        logits = model(input_ids=inputs).logits
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    logits = model(pixel_values=inputs).logits
    return logits, F.cross_entropy(logits, targets)


@torch.no_grad()
def accuracy(model, name: str, data: TensorDataset) -> float:
    model.eval()
    correct = total = 0
    for inputs, targets in DataLoader(data, batch_size=256):
        logits, _ = logits_and_loss(model, name, inputs, targets)
        correct += int((logits.argmax(-1) == targets).sum())
        total += targets.numel()
    return correct / total


# --------------------------------------------------------------------------- the loop


def train(model_name: str, policy: str, seed: int, epochs: int, batch_size: int = 32) -> dict:
    torch.manual_seed(seed)
    data = python_docs(seed) if model_name == "gpt2" else digits(seed)
    model = build_model(model_name)
    loader = DataLoader(
        data["train"],
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    total_steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=total_steps)

    controller, batches = None, loader
    if policy != "none":
        example = data["train"][:batch_size][0]  # a batch as the loop feeds it
        inputs = {"input_ids" if model_name == "gpt2" else "pixel_values": example}
        controller = FreezeController.from_pretrained(  # freeze-agent
            policy, model, optimizer, inputs, total_steps=total_steps
        )
        batches = controller.wrap_loader(loader)  # freeze-agent

    seconds = 0.0
    try:
        for _ in range(epochs):
            model.train()
            started = time.perf_counter()
            for inputs, targets in batches:
                _, loss = logits_and_loss(model, model_name, inputs, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if controller is not None:
                    controller.step(loss)  # freeze-agent
            seconds += time.perf_counter() - started
            val_accuracy = accuracy(model, model_name, data["val"])
            if controller is not None:
                controller.report_validation(val_accuracy)  # freeze-agent
        result = {
            "model": model_name,
            "policy": policy,
            "seed": seed,
            "train_seconds": seconds,
            "test_accuracy": accuracy(model, model_name, data["test"]),
        }
        if controller is not None:
            result["summary"] = controller.summary()
    finally:
        if controller is not None:
            controller.close()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["gpt2", "vit", "resnet"], default="gpt2")
    parser.add_argument("--policy", default="default", help="a policy name, folder, or none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(args.model, args.policy, args.seed, args.epochs)
    print_result(result, args.json, f"{args.model} under {args.policy}")
    return result


def print_result(result: dict, as_json: bool, label: str) -> None:
    """The training time, the test accuracy and what the controller did (or the JSON line)."""
    if as_json:
        print(json.dumps(result))
        return
    print(
        f"{label}: {result['train_seconds']:.1f} s of training, "
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


if __name__ == "__main__":
    main()
