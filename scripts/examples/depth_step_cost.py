"""Time a training step of a `plain_loop.py` model with each frozen prefix, the activation cache
serving it, against all-TRAIN steps measured in between (interleaved, in one process).

For each depth d it freezes the first d units, trains one epoch while the cache fills and one
while it serves, then one all-TRAIN epoch, and prints the mean milliseconds per step of each:
what the cost model's modeled speedup turns into on this machine.

    python scripts/examples/depth_step_cost.py --model vit --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from plain_loop import build_model, digits, logits_and_loss, python_docs
from torch.utils.data import DataLoader

from freeze_agent import FreezeController


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["gpt2", "vit", "resnet"], default="vit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--signals", action="store_true", help="keep the signals on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = python_docs(0) if args.model == "gpt2" else digits(0)
    model = build_model(args.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    key = "input_ids" if args.model == "gpt2" else "pixel_values"
    example = {key: data["train"][:32][0]}
    controller = FreezeController(model, optimizer, example, signals=args.signals, reference=False)
    loader = DataLoader(data["train"], batch_size=32, shuffle=True, drop_last=True)
    batches = controller.wrap_loader(loader)

    def epoch_ms() -> float:
        started, steps = time.perf_counter(), 0
        for inputs, targets in batches:
            _, loss = logits_and_loss(model, args.model, inputs, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            controller.step(loss)
            steps += 1
        return 1000 * (time.perf_counter() - started) / steps

    units = len(controller.units)
    print("units:", ", ".join(unit.name for unit in controller.units))
    epoch_ms()  # warm-up
    print("frozen | filling ms/step | served ms/step | all-TRAIN ms/step | served/all-TRAIN")
    for depth in range(units):
        controller.set_modes(["FROZEN"] * depth + ["TRAIN"] * (units - depth))
        filling, served = epoch_ms(), epoch_ms()
        controller.set_modes(["TRAIN"] * units)
        train = epoch_ms()
        print(
            f"{depth:6d} | {filling:15.1f} | {served:14.1f} | {train:17.1f} | {served / train:.2f}"
        )
    controller.close()


if __name__ == "__main__":
    main()
