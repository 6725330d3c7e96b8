"""Measure the shipped policy deployed through one of the examples (a plain loop, Lightning, the
Hugging Face Trainer, or DDP under torchrun) on models that no freeze-agent task uses, against
the same example without freezing.

For every model and seed it runs the example once with `--policy none` and once under each
policy (the shipped one, or published methods beside it: `--policy default autofreeze egeria`),
each in a fresh process, rotating which goes first (so drift in machine load falls on every
side), and reports per policy and model the training-time speedup (no-freeze seconds over policy
seconds, the controller's own overhead included), the modeled speedup, the share of the policy
run's training time spent deciding (observing and the policy's forward), the test-accuracy
change in points and the controller's summary. Records are appended to `OUT/records.jsonl` as
they finish, so an interrupted run resumes where it stopped.

    python scripts/examples/bench_examples.py --out docs/bench/plain_loop
    python scripts/examples/bench_examples.py --example lightning_fit --out docs/bench/lightning
    python scripts/examples/bench_examples.py --example hf_finetune --out docs/bench/hf
    python scripts/examples/bench_examples.py --example ddp --models resnet --out docs/bench/ddp
    python scripts/examples/bench_examples.py --policy default autofreeze egeria freezeout \
        --out docs/bench/methods
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = {
    # example: (default models, whether it takes --model)
    "plain_loop": (["gpt2", "vit", "resnet"], True),
    "lightning_fit": (["vit", "resnet"], True),
    "hf_finetune": (["minilm"], False),
    "ddp": (["resnet"], True),
}


def command_for(example: str, model: str, policy: str, seed: int, args) -> list[str]:
    script = str(HERE / f"{example}.py")
    if example == "ddp":
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [str(torchrun), "--standalone", "--nproc_per_node", "2", script]
    else:
        command = [sys.executable, script]
    command += ["--model", model] if EXAMPLES[example][1] else []
    command += ["--policy", policy, "--seed", str(seed), "--json"]
    command += ["--epochs", str(args.epochs)] if args.epochs else []
    command += ["--threads", str(args.threads)] if args.threads else []
    return command


def run_once(example: str, model: str, policy: str, seed: int, args) -> dict:
    command = command_for(example, model, policy, seed, args)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    results = [r for r in map(json_or_none, done.stdout.splitlines()) if isinstance(r, dict)]
    if not results:
        raise RuntimeError(f"{' '.join(command)} printed no JSON result:\n{done.stdout[-3000:]}")
    # the result is the last line; under torchrun every rank prints one, and rank 0's holds the
    # summary
    results = [r for r in results if "train_seconds" in r] or results
    record = next((r for r in reversed(results) if r.get("rank", 0) == 0), results[-1])
    record.update(example=example, model=model, policy=policy, seed=seed)
    if len(results) > 1:
        keys = ("rank", "checksum", "bytes_saved")
        record["ranks"] = [{key: r.get(key) for key in keys} for r in results]
    return record


def json_or_none(line: str) -> object:
    """The JSON value on ``line``, or None (frameworks print dict-like lines of their own)."""
    try:
        return json.loads(line)
    except ValueError:
        return None


HEADER = (
    "| model | seeds | speedup (measured) | modeled | deciding | test accuracy change | "
    "safety net |"
)


def table(records: list[dict], policy: str) -> str:
    rows = [f"policy `{policy}` against no freezing:\n"]
    rows += [HEADER, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
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
        deciding = [run["summary"]["decision_seconds"] / run["train_seconds"] for _, run in pairs]
        events = sum(len(run["summary"]["safety_net"] or []) for _, run in pairs)
        speedups.extend(ratios)
        rows.append(
            f"| {model} | {len(pairs)} | {geomean(ratios):.2f}x "
            f"({', '.join(f'{r:.2f}' for r in ratios)}) | {geomean(modeled):.2f}x | "
            f"{100 * sum(deciding) / len(deciding):.1f}% | "
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
    parser.add_argument("--example", choices=sorted(EXAMPLES), default="plain_loop")
    parser.add_argument("--models", nargs="+", help="default: the example's models")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--policy", nargs="+", default=["default"], help="one or more policies")
    parser.add_argument("--epochs", type=int, help="default: the example's")
    parser.add_argument("--out", type=Path, help="default: runs/bench_EXAMPLE")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
    args = parser.parse_args()
    models = args.models or EXAMPLES[args.example][0]
    out = args.out or Path(f"runs/bench_{args.example}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    records = [json.loads(line) for line in path.open()] if path.exists() else []
    done = {(r["model"], r["policy"], r["seed"]) for r in records}
    for i, (seed, model) in enumerate((s, m) for s in args.seeds for m in models):
        arms = ["none", *args.policy]
        for policy in arms[i % len(arms) :] + arms[: i % len(arms)]:
            if (model, policy, seed) in done:
                continue
            record = run_once(args.example, model, policy, seed, args)
            records.append(record)
            with path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            print(
                f"{args.example} {model} seed {seed} {policy}: {record['train_seconds']:.1f} s, "
                f"test {100 * record['test_accuracy']:.2f}%",
                flush=True,
            )
    report = "\n\n".join(table(records, policy) for policy in args.policy)
    (out / "summary.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
