"""Deploy the shipped freeze policy in a PyTorch Lightning `Trainer.fit`, on a Hugging Face model.

The model is a `transformers` ResNet or ViT that no freeze-agent task trains (small configs from
random init) on scikit-learn's 8x8 digits, both built by `plain_loop.py` beside this file. The
LightningModule is what a user writes anyway: AdamW and a one-cycle schedule stepped every
optimizer step in `configure_optimizers`, a validation every epoch. freeze-agent adds one
callback, marked `# freeze-agent`, which builds the controller for `self.model` when training
starts, decides at the planned optimizer steps, feeds `val_accuracy` to the safety net, logs
its state through the trainer's logger and serves the frozen prefix from the activation cache:

    FreezePolicyCallback("default", model_attr="model", monitor="val_accuracy", mode="max",
                         cache=True)

    python scripts/examples/lightning_fit.py                   # ResNet under the shipped policy
    python scripts/examples/lightning_fit.py --policy none     # the same fit, no freezing
    python scripts/examples/lightning_fit.py --model vit --csv runs/lightning   # with a CSV log
    python scripts/examples/lightning_fit.py --devices 2       # DDP on two CPU processes

It prints the training time, the test accuracy and the controller's summary (as JSON with
--json: the last line is one JSON object). The training time is the wall time of the training
epochs without the validation inside them, measured the same way with and without the policy
(`TrainingClock`); freeze-agent's own work in the epochs (decisions, logging) is included.

With `--devices N` the fit is data-parallel: Lightning launches the other N-1 processes itself
(it runs this script again for each) under `strategy="ddp_find_unused_parameters_true"`, which
freezing needs (plain `"ddp"` with `--policy none`), each process training on its share of every
batch of 32. The callback is the same line; rank 0 decides and every rank applies its modes, and
frozen units leave the gradient all-reduce (see `freeze_agent.integrations.lightning`). Each
rank prints, one after the other, a line as `ddp.py` does: its parameter checksum (equal on every
rank: the ranks stay identical) and the all-reduce bytes saved; rank 0 adds the test accuracy and
the summary. With --json each rank's last line is its JSON object, carrying its `rank`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # plain_loop.py, ddp.py beside this
from ddp import checksum, report_ranks
from plain_loop import accuracy, build_model, digits, print_result

from freeze_agent.integrations.lightning import FreezePolicyCallback

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


class DigitsClassifier(pl.LightningModule):
    """A `transformers` image classifier (``plain_loop.build_model``) on digit images."""

    def __init__(self, model_name: str, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = build_model(model_name)
        self.lr = lr

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        inputs, targets = batch
        loss = F.cross_entropy(self(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        inputs, targets = batch
        logits = self(inputs)
        # sync_dist: under DDP, the mean over every rank's share of the validation set
        self.log("val_loss", F.cross_entropy(logits, targets), sync_dist=True)
        self.log("val_accuracy", (logits.argmax(-1) == targets).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class TrainingClock(pl.Callback):
    """Wall time of the training epochs, the validation runs inside them left out."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._epoch_start: float | None = None
        self._validation_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_start is not None:  # a validation inside an epoch is not training
            self.seconds -= time.perf_counter() - self._validation_start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_start is not None:
            self.seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None


def train(
    model_name: str,
    policy: str,
    seed: int,
    epochs: int,
    batch_size: int = 32,
    csv: Path | None = None,
    devices: int = 1,
) -> dict:
    """Fit on ``devices`` CPU processes (DDP when more than one), ``batch_size`` samples per
    optimizer step over all of them."""
    pl.seed_everything(seed, verbose=False)
    data = digits(seed)
    loader = DataLoader(
        data["train"],
        batch_size=batch_size // devices,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    val_loader = DataLoader(data["val"], batch_size=256)
    module = DigitsClassifier(model_name)

    clock, freeze = TrainingClock(), None
    if policy != "none":
        freeze = FreezePolicyCallback(  # freeze-agent
            policy, model_attr="model", monitor="val_accuracy", mode="max", cache=True
        )
    strategy = "auto"
    if devices > 1:  # freezing needs DDP to find the parameters without gradients
        strategy = "ddp" if freeze is None else "ddp_find_unused_parameters_true"  # freeze-agent
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=CSVLogger(csv, name=f"{model_name}-{policy}") if csv else False,
        log_every_n_steps=10,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[clock, freeze] if freeze is not None else [clock],
    )
    trainer.fit(module, loader, val_loader)

    result = {
        "integration": "lightning",
        "model": model_name,
        "policy": policy,
        "seed": seed,
        "train_seconds": clock.seconds,
    }
    if devices > 1:
        digest, param_sum = checksum(module.model)
        result.update(rank=trainer.global_rank, world_size=trainer.world_size)
        result.update(checksum=digest, param_sum=param_sum)
        if freeze is not None:
            stats = freeze.summary()["ddp"]
            result.update(bytes_saved=stats["bytes_saved"], bytes_total=stats["bytes_full"])
        else:  # plain DDP all-reduces every parameter's gradient at every step
            size = sum(p.numel() * p.element_size() for p in module.parameters())
            result.update(bytes_saved=0, bytes_total=trainer.global_step * size)
    if trainer.is_global_zero:
        result["test_accuracy"] = accuracy(module.model, model_name, data["test"])
        if freeze is not None:
            result["summary"] = freeze.summary()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["resnet", "vit"], default="resnet")
    parser.add_argument("--policy", default="default", help="a policy name, folder, or none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--csv", type=Path, help="log to a CSVLogger under this folder")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP when > 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(
        args.model, args.policy, args.seed, args.epochs, csv=args.csv, devices=args.devices
    )
    if args.devices > 1:  # Lightning's process group is still up after fit
        report_ranks(result, args.json)
    else:
        print_result(result, args.json, f"{args.model} under {args.policy} (Lightning)")
    return result


if __name__ == "__main__":
    main()
