"""Measure the shipped policy deployed through `from_pretrained` on Hugging Face models that no
freeze-agent task uses, against the same loop without freezing.

For every model and seed it runs `plain_loop.py` twice, once under the policy and once with
`--policy none`, each in a fresh process, alternating which goes first (so drift in machine load
falls on both sides), and reports per model the training-time speedup (no-freeze seconds over
policy seconds, the controller's own overhead included), the test-accuracy change in points and
the controller's summary. Records are appended to `OUT/records.jsonl` as they finish, so an
interrupted run resumes where it stopped.

    python scripts/examples/bench_plain_loop.py --out docs/bench/deploy
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_once(model: str, policy: str, seed: int, epochs: int, threads: int | None) -> dict:
    command = [sys.executable, str(HERE / "plain_loop.py"), "--model", model, "--policy", policy]
    command += ["--seed", str(seed), "--epochs", str(epochs), "--json"]
    command += ["--threads", str(threads)] if threads else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(records: list[dict], policy: str) -> str:
    rows = ["| model | seeds | speedup (measured) | modeled | test accuracy change | safety net |"]
    rows.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    speedups = []
    for model in sorted({r["model"] for r in records}):
        pairs = []
        for seed in sorted({r["seed"] for r in records if r["model"] == model}):
            by = {r["policy"]: r for r in records if r["model"] == model and r["seed"] == seed}
            if policy in by and "none" in by:
                pairs.append((by["none"], by[policy]))
        if not pairs:
            continue
        ratios = [base["train_seconds"] / run["train_seconds"] for base, run in pairs]
        deltas = [100 * (run["test_accuracy"] - base["test_accuracy"]) for base, run in pairs]
        modeled = [run["summary"]["modeled_speedup"] for _, run in pairs]
        events = sum(len(run["summary"]["safety_net"] or []) for _, run in pairs)
        speedups.extend(ratios)
        rows.append(
            f"| {model} | {len(pairs)} | {geomean(ratios):.2f}x "
            f"({', '.join(f'{r:.2f}' for r in ratios)}) | {geomean(modeled):.2f}x | "
            f"{sum(deltas) / len(deltas):+.2f}pp ({', '.join(f'{d:+.2f}' for d in deltas)}) | "
            f"{events} |"
        )
    if speedups:
        rows.append(f"\ngeometric-mean measured speedup over all runs: {geomean(speedups):.2f}x")
    return "\n".join(rows)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "vit", "resnet"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--policy", default="default")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_plain_loop"))
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "records.jsonl"
    records = [json.loads(line) for line in path.open()] if path.exists() else []
    done = {(r["model"], r["policy"], r["seed"]) for r in records}
    for i, (seed, model) in enumerate((s, m) for s in args.seeds for m in args.models):
        order = [args.policy, "none"] if i % 2 == 0 else ["none", args.policy]
        for policy in order:
            if (model, policy, seed) in done:
                continue
            record = run_once(model, policy, seed, args.epochs, args.threads)
            records.append(record)
            with path.open("a") as out:
                out.write(json.dumps(record) + "\n")
            print(
                f"{model} seed {seed} {policy}: {record['train_seconds']:.1f} s, "
                f"test {100 * record['test_accuracy']:.2f}%",
                flush=True,
            )
    report = table(records, args.policy)
    (args.out / "summary.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
