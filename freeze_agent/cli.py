"""The ``freeze-agent`` command line: list tasks, train one under a policy, profile it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from freeze_agent.tasks import DEFAULT_TASK, list_tasks, load_task

console = Console()
_MODE_STYLE = {"T": "green", "L": "yellow", "F": "blue"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-predictor"]:  # its own parser owns every option after the name
        from freeze_agent.predictor import train_predictor_command

        return train_predictor_command(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freeze-agent",
        description="Learned layer freezing: decide per layer, while training runs, "
        "which layers train, learn locally or freeze.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    envs = commands.add_parser("envs", help="list the training tasks in envs/")
    envs.set_defaults(handler=_envs)

    run = commands.add_parser("run", help="train a task under a freeze policy")
    run.add_argument("task", nargs="?", default=DEFAULT_TASK, help="task name or YAML path")
    run.add_argument(
        "--policy",
        default="default",
        help="a trained policy's folder or the name of one in policies/, or a baseline: "
        "none | linear-prefix[:START] (default: %(default)s, the shipped policy)",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--epochs", type=int, default=None, help="override the task's epoch budget")
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run.add_argument("--json", type=Path, default=None, help="also write the results here")
    run.set_defaults(handler=_run)

    profile = commands.add_parser(
        "profile", help="measured vs modeled time per iteration for each frozen-prefix depth"
    )
    profile.add_argument("task", help="task name or YAML path")
    profile.add_argument("--repetitions", type=int, default=5)
    profile.add_argument("--iterations", type=int, default=3)
    profile.add_argument("--device", default=None)
    profile.add_argument("--json", type=Path, default=None)
    profile.set_defaults(handler=_profile)

    overhead = commands.add_parser(
        "overhead", help="cost of the signal machinery: training time with vs without it"
    )
    overhead.add_argument("task", nargs="?", default=DEFAULT_TASK, help="task name or YAML path")
    overhead.add_argument("--intervals", type=int, default=None, help="default: the whole run")
    overhead.add_argument("--seed", type=int, default=0)
    overhead.add_argument("--device", default=None)
    overhead.add_argument("--json", type=Path, default=None)
    overhead.set_defaults(handler=_overhead)

    train = commands.add_parser(
        "train", help="learn a freeze policy with MaskablePPO on training tasks"
    )
    train.add_argument(
        "--tasks", nargs="+", default=["envs/train"], help="task names, YAML files or folders"
    )
    train.add_argument("--val-tasks", nargs="+", default=["envs/val"])
    train.add_argument("--timesteps", type=int, default=3000, help="decisions to train on")
    train.add_argument("--n-envs", type=int, default=2, help="environment processes")
    train.add_argument("--out", type=Path, required=True, help="policy folder to write")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--n-steps", type=int, default=64, help="rollout length per env")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--learning-rate", type=float, default=3e-4)
    train.add_argument("--ent-coef", type=float, default=0.0, help="PPO entropy bonus")
    train.add_argument(
        "--reward",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="reward settings (freeze_agent.rewards.RewardConfig), e.g. accuracy_weight=1.0",
    )
    train.add_argument(
        "--imitation-rounds",
        type=int,
        default=0,
        help="kick-start: imitate the plateau teacher for this many rounds before PPO "
        "(round 1 plays the teacher, later rounds the agent: DAgger); 0: PPO from scratch",
    )
    train.add_argument(
        "--imitation-episodes", type=int, default=1, help="episodes per env and round"
    )
    train.add_argument(
        "--teacher-tolerance",
        type=float,
        default=0.05,
        help="the teacher starts freezing once the reference's val loss is within this "
        "fraction of its improvement from its best",
    )
    train.add_argument("--eval-every", type=int, default=1024, help="timesteps; 0: only at end")
    train.add_argument("--checkpoint-every", type=int, default=256, help="timesteps")
    train.add_argument(
        "--no-reference-model",
        action="store_true",
        help="no int8 reference worker: plasticity features stay missing (faster)",
    )
    train.add_argument("--wandb-project", default="freeze-agent")
    train.add_argument("--no-wandb", action="store_true", help="no Weights & Biases logging")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its saved settings",
    )
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="play a policy on tasks and compare it with training without freezing",
    )
    evaluate.add_argument("policy", help="a policy folder, a shipped policy's name or a baseline")
    evaluate.add_argument("--tasks", nargs="+", default=["envs/val", "envs/heldout"])
    evaluate.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    evaluate.add_argument(
        "--remeasure",
        action="store_true",
        help="train the no-freezing reference again right before each episode, so that the "
        "measured speedup compares runs made under the same machine load",
    )
    evaluate.add_argument("--json", type=Path, default=None)
    evaluate.add_argument(
        "--update-card", action="store_true", help="record the results in the policy's card"
    )
    evaluate.set_defaults(handler=_evaluate)

    commands.add_parser(
        "train-predictor",
        help="train SmartFRZ's attention predictor on full-training runs (CKA labels); "
        "see `freeze-agent train-predictor --help`",
    )
    return parser


# ---------------------------------------------------------------------- envs


def _envs(_args: argparse.Namespace) -> int:
    from freeze_agent.trainer import Trainer

    table = Table(title="training tasks (descriptions in the YAML specs)")
    for column in ("task", "split", "model", "dataset", "units", "epochs"):
        table.add_column(column, no_wrap=True)
    for task in list_tasks():
        try:
            units = str(len(Trainer(task, device="cpu", epochs=1).units))
        except (ImportError, RuntimeError) as error:  # optional data or model not installed
            units = f"[dim]unavailable: {type(error).__name__}[/]"
        table.add_row(
            task.name,
            task.split,
            task.family,
            task.dataset.name,
            units,
            str(task.epochs),
        )
    console.print(table)
    return 0


# ---------------------------------------------------------------------- run


def _run(args: argparse.Namespace) -> int:
    from freeze_agent.baselines import make_policy
    from freeze_agent.trainer import Trainer

    task = load_task(args.task)
    policy = make_policy(args.policy)
    console.print(
        f"[bold]{task.name}[/] ({task.family} on {task.dataset.name}), policy {policy.name}"
    )
    trainer = Trainer(task, args.seed, device=args.device, epochs=args.epochs)
    with _progress() as progress:
        bar = progress.add_task("training", total=trainer.total_steps, status="")
        result = trainer.run(
            policy,
            on_interval=lambda r: progress.update(
                bar,
                advance=r.steps,
                status=f"loss {r.mean_loss:.3f}  cost {r.cost_ratio:.2f}",
            ),
        )
    _print_run(result)
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )


def _print_run(result) -> None:
    summary = Table(show_header=False, title="result")
    summary.add_row("wall time (training)", f"{result.wall_time:.1f} s on {result.device}")
    summary.add_row(
        "modeled cost ratio",
        f"{result.modeled_cost_ratio:.3f}  ({result.modeled_speedup:.2f}x modeled speedup)",
    )
    summary.add_row("validation accuracy", f"{100 * result.val_accuracy:.2f}%")
    summary.add_row("test accuracy", f"{100 * result.test_accuracy:.2f}%")
    if result.diverged:
        summary.add_row("[red]diverged[/]", "the training loss became non-finite")
    console.print(summary)

    timeline = Table(title="mode timeline (T train, L local, F frozen; one column per decision)")
    timeline.add_column("unit", justify="right")
    timeline.add_column("name")
    timeline.add_column("kind")
    timeline.add_column("0% → 100% of training")
    for unit in result.units:
        marks = "".join(
            f"[{_MODE_STYLE[entry['modes'][unit['index']]]}]{entry['modes'][unit['index']]}[/]"
            for entry in result.timeline
        )
        timeline.add_row(str(unit["index"]), unit["name"], unit["kind"], marks)
    console.print(timeline)


# ---------------------------------------------------------------------- profile


def _profile(args: argparse.Namespace) -> int:
    from freeze_agent.cost_model import TERMS
    from freeze_agent.profiling import profile_task

    task = load_task(args.task)
    with console.status(f"profiling {task.name}"):
        profile = profile_task(
            task, repetitions=args.repetitions, iterations=args.iterations, device=args.device
        )
    units = Table(title=f"{task.name}: units")
    for column in ("unit", "name", "kind", "params", "fwd MFLOP/sample", "bwd-x", "bwd-w", "cut"):
        units.add_column(column, justify="right")
    for u in profile.units:
        units.add_row(
            str(u["index"]),
            u["name"],
            u["kind"],
            f"{u['params']:,}",
            f"{u['flops_forward'] / 1e6:.3f}",
            f"{u['flops_backward_input'] / 1e6:.3f}",
            f"{u['flops_backward_weight'] / 1e6:.3f}",
            "yes" if u["cut_point"] else "no",
        )
    console.print(units)
    constants = Table(
        title=f"cost model constants fitted to every variant below "
        f"(1 FLOP-equivalent = {1e12 * profile.seconds_per_flop:.2f} ps)"
    )
    for column in ("term", "FLOP-equivalents per unit", "share of all-TRAIN"):
        constants.add_column(column, justify="right")
    for term in TERMS:
        constants.add_row(
            term,
            f"{getattr(profile.constants, term):.4g}",
            f"{100 * profile.term_shares[term]:.1f}%",
        )
    console.print(constants)
    depths = Table(
        title=f"time per iteration ({profile.clock}, fastest of {profile.repetitions} interleaved "
        f"repetitions, batch {profile.batch_size}, {profile.device}); ratios to all-TRAIN; "
        "LOO: meas/mod with the constants fitted to the other variants"
    )
    for column in ("units", "ms/iter", "speedup", "measured", "modeled", "meas/mod", "LOO"):
        depths.add_column(column, justify="right")
    for row in profile.rows():
        loo = row["loo_measured_over_modeled"]
        depths.add_row(
            f"[cyan]{row['variant']}[/]" if row["cached"] else row["variant"],
            f"{1000 * row['seconds']:.2f}",
            f"{row['measured_speedup']:.2f}x",
            f"{row['measured_ratio']:.3f}",
            f"{row['modeled_ratio']:.3f}",
            f"{row['measured_over_modeled']:.2f}",
            "-" if loo is None else f"{loo:.2f}",
        )
    console.print(depths)
    spread, loo_spread = (
        profile.measured_over_modeled_range,
        profile.loo_measured_over_modeled_range,
    )
    if spread and loo_spread:
        console.print(
            f"measured/modeled {spread[0]:.2f}-{spread[1]:.2f} in sample, "
            f"{loo_spread[0]:.2f}-{loo_spread[1]:.2f} leave-one-out"
        )
    if args.json:
        _write_json(args.json, profile.to_dict())
    return 0


def _overhead(args: argparse.Namespace) -> int:
    from freeze_agent.profiling import measure_overhead

    task = load_task(args.task)
    with console.status(f"measuring the signal overhead on {task.name} (A/B interleaved)"):
        result = measure_overhead(
            task, seed=args.seed, intervals=args.intervals, device=args.device
        )
    table = Table(show_header=False, title=f"{task.name}: signal overhead, every unit in TRAIN")
    table.add_row("intervals (interleaved A/B)", str(result.intervals))
    table.add_row("training with signals", f"{result.seconds_with_signals:.2f} s")
    table.add_row("  of which observe()", f"{result.observe_seconds:.2f} s")
    with_plasticity = f"{result.intervals_with_plasticity} of {result.intervals}"
    table.add_row("  observations with plasticity", with_plasticity)
    table.add_row("training without", f"{result.seconds_without:.2f} s")
    table.add_row("ratio", f"{result.ratio:.3f}  ({100 * (result.ratio - 1):+.1f}%)")
    console.print(table)
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


# ---------------------------------------------------------------------- train


def _train(args: argparse.Namespace) -> int:
    from freeze_agent.training import TrainConfig, train

    if args.resume:
        console.print(f"resuming the run in {args.out} with its saved settings")
        config = TrainConfig()  # replaced by the saved one
    else:
        config = TrainConfig(
            tasks=[str(t) for t in args.tasks],
            val_tasks=[str(t) for t in args.val_tasks],
            timesteps=args.timesteps,
            n_envs=args.n_envs,
            seed=args.seed,
            n_steps=args.n_steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            ent_coef=args.ent_coef,
            reward=_reward_settings(args.reward),
            imitation_rounds=args.imitation_rounds,
            imitation_episodes=args.imitation_episodes,
            teacher_tolerance=args.teacher_tolerance,
            eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every,
            reference_model=not args.no_reference_model,
            wandb_project=args.wandb_project,
        )
    out = train(config, args.out, resume=args.resume, use_wandb=not args.no_wandb)
    console.print(f"policy written to {out}")
    return 0


def _reward_settings(pairs: list[str]) -> dict[str, float | str]:
    """``["accuracy_weight=1", "cost=measured"]`` -> RewardConfig keyword arguments."""
    from dataclasses import fields

    from freeze_agent.rewards import RewardConfig

    known = [f.name for f in fields(RewardConfig)]
    settings: dict[str, float | str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise ValueError(
                f"--reward {pair!r}: expected KEY=VALUE with KEY one of {', '.join(known)}"
            )
        try:
            settings[key] = value if key == "cost" else float(value)
        except ValueError:
            raise ValueError(f"--reward {pair!r}: {value!r} is not a number") from None
    return settings


# ---------------------------------------------------------------------- evaluate


def _evaluate(args: argparse.Namespace) -> int:
    from freeze_agent.evaluation import evaluate_policy

    report = evaluate_policy(
        args.policy, args.tasks, args.seeds, remeasure=args.remeasure, console=console
    )
    table = Table(
        title=f"{report.policy} against no freezing (mean over seeds {report.seeds}; "
        "speedups of training time, accuracy change in percentage points)"
    )
    for column in ("task", "split", "modeled", "measured", "val Δpp", "test Δpp", "worst test Δ"):
        table.add_column(column, justify="right")
    for row in report.rows():
        table.add_row(
            row["task"],
            row["split"],
            f"{row['modeled_speedup']:.2f}x",
            f"{row['measured_speedup']:.2f}x",
            f"{row['val_delta_pp']:+.2f}",
            f"{row['test_delta_pp']:+.2f}",
            f"{row['worst_test_delta_pp']:+.2f}",
        )
    console.print(table)
    if args.json:
        _write_json(args.json, report.to_dict())
    if args.update_card:
        report.record_in_card()
        console.print(f"recorded in {report.policy}/policy.json")
    return 0


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
