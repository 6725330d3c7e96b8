"""Deploy the shipped freeze policy under DistributedDataParallel, on a Hugging Face model.

The loop of `plain_loop.py` (its data and model builders: a `transformers` ResNet by default, or
its ViT or GPT-2, small configs from random init, on scikit-learn's digits or the Python docs),
run data-parallel: each rank trains on its share of the data (`DistributedSampler`), DDP averages
the gradients. freeze-agent adds these lines, marked `# freeze-agent`:

    ddp_model = DistributedDataParallel(model, find_unused_parameters=True)
    controller = DistributedFreezeController.from_pretrained("default", ddp_model, optimizer,
                                                             example, total_steps=...)
    batches = controller.wrap_loader(loader)   # each rank caches its own rows
    controller.step(loss)                      # after optimizer.step(): rank 0 decides
    controller.report_validation(accuracy)     # on every rank: rank 0's metric is judged

Rank 0 decides and every rank applies its modes; frozen parameters leave the gradient
all-reduce (see `freeze_agent.integrations.ddp`). Each rank prints a checksum of its parameters
(equal on every rank: the ranks stay identical) and the all-reduce bytes saved:

    torchrun --standalone --nproc_per_node 2 scripts/examples/ddp.py
    torchrun --standalone --nproc_per_node 2 scripts/examples/ddp.py --policy none

With --json the last line each rank prints is one JSON object: rank, model, policy, seed,
checksum, param_sum, bytes_saved, bytes_total (what plain DDP all-reduces), train_seconds, and on
rank 0 test_accuracy and the controller's summary. The ranks print one after the other.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import torch
import torch.distributed as dist
from plain_loop import accuracy, build_model, digits, logits_and_loss, python_docs
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from freeze_agent.integrations.ddp import DistributedFreezeController


def checksum(model: torch.nn.Module) -> tuple[str, float]:
    """A hash of the parameters' bytes (equal only if they are bitwise equal) and their sum."""
    digest = hashlib.sha256()
    total = 0.0
    for p in model.parameters():
        data = p.detach().cpu().contiguous()
        digest.update(data.numpy().tobytes())
        total += float(data.double().sum())
    return digest.hexdigest()[:16], total


def train(model_name: str, policy: str, seed: int, epochs: int, batch_size: int = 32) -> dict:
    """Train on this rank's share, ``batch_size`` samples per step over all ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    data = python_docs(seed) if model_name == "gpt2" else digits(seed)
    model = build_model(model_name)
    sampler = DistributedSampler(data["train"], shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(
        data["train"], batch_size=batch_size // world, sampler=sampler, drop_last=True
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    total_steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=total_steps)

    controller, batches = None, loader
    if policy == "none":
        ddp_model = DistributedDataParallel(model)
    else:
        ddp_model = DistributedDataParallel(model, find_unused_parameters=True)  # freeze-agent
        key = "input_ids" if model_name == "gpt2" else "pixel_values"
        example = {key: data["train"][: batch_size // world][0]}
        controller = DistributedFreezeController.from_pretrained(  # freeze-agent
            policy, ddp_model, optimizer, example, total_steps=total_steps
        )
        batches = controller.wrap_loader(loader)  # freeze-agent

    seconds = 0.0
    try:
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            ddp_model.train()
            started = time.perf_counter()
            for inputs, targets in batches:
                _, loss = logits_and_loss(ddp_model, model_name, inputs, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if controller is not None:
                    controller.step(loss)  # freeze-agent
            seconds += time.perf_counter() - started
            val_accuracy = accuracy(model, model_name, data["val"])  # every rank, as DDP loops do
            if controller is not None:
                controller.report_validation(val_accuracy)  # freeze-agent
        digest, param_sum = checksum(model)
        result = {"rank": rank, "model": model_name, "policy": policy, "seed": seed}
        result.update(checksum=digest, param_sum=param_sum)
        if controller is not None:
            stats = controller.distributed_stats()
            result.update(bytes_saved=stats["bytes_saved"], bytes_total=stats["bytes_full"])
        else:  # plain DDP all-reduces every parameter's gradient at every step
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            result.update(bytes_saved=0, bytes_total=total_steps * size)
        result["train_seconds"] = seconds
        if rank == 0:
            result["test_accuracy"] = accuracy(model, model_name, data["test"])
            if controller is not None:
                result["summary"] = controller.summary()
    finally:
        if controller is not None:
            controller.close()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["resnet", "vit", "gpt2"], default="resnet")
    parser.add_argument("--policy", default="default", help="a policy name, folder, or none")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="end with the result as JSON")
    parser.add_argument("--threads", type=int, help="torch threads per rank (torchrun's: 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    try:
        result = train(args.model, args.policy, args.seed, args.epochs)
        report_ranks(result, args.json)
    finally:
        dist.destroy_process_group()
    return result


def report_ranks(result: dict, as_json: bool) -> None:
    """Every rank's ``report``, one rank after the other (no mixed lines); a collective."""
    for rank in range(dist.get_world_size()):
        if rank == result["rank"]:
            report(result, as_json)
        dist.barrier()


def report(result: dict, as_json: bool) -> None:
    saved, total = result["bytes_saved"], result["bytes_total"]
    line = (
        f"rank {result['rank']}, {result['model']} under {result['policy']}: parameter "
        f"checksum {result['checksum']} (sum {result['param_sum']:.10g}), all-reduce bytes "
        f"saved {saved:,} of {total:,} ({100 * saved / max(total, 1):.1f}%), "
        f"{result['train_seconds']:.1f} s of training"
    )
    if "test_accuracy" in result:
        line += f", test accuracy {100 * result['test_accuracy']:.2f}%"
    print(line, flush=True)
    summary = result.get("summary")
    if summary and not as_json:
        print(
            f"rank 0: last modes {summary['timeline'][-1]} over {', '.join(summary['units'])}; "
            f"modeled speedup {summary['modeled_speedup']:.2f}x, cache "
            f"{summary['cache']['state']} ({summary['cache']['hits']} hits), safety net "
            f"interventions: {len(summary['safety_net'] or [])}",
            flush=True,
        )
    if as_json:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
