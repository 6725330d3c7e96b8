"""The ``freeze-agent`` command line: ``envs``, ``run``, ``train``, ``evaluate``, ``profile``,
``overhead`` and ``train-predictor`` (``freeze-agent COMMAND --help``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from freeze_agent.tasks.spec import DEFAULT_TASK, list_tasks, load_task

if TYPE_CHECKING:
    from freeze_agent.rl.training import TrainConfig

console = Console()
_MODE_STYLE = {"T": "green", "L": "yellow", "F": "blue"}


def _show(table: Table) -> None:
    """Print ``table`` whole. In a terminal, a cell that does not fit folds onto more lines
    instead of losing characters; piped, every row stays on one line, as wide as it needs, so
    that ``grep`` and ``cut`` see every column."""
    for column in table.columns:
        column.overflow, column.no_wrap = "fold", False
    if console.is_terminal:
        console.print(table)
    else:
        natural = Measurement.get(console, console.options.update_width(100_000), table).maximum
        width = console.width
        console.width = max(width, natural)  # print() alone never goes past the console's width
        try:
            console.print(table)
        finally:
            console.width = width


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2


def _integer_from(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be at least {minimum}, got {value}")
        return value

    return parse


_count = _integer_from(1, "a budget or count")
_seed = _integer_from(0, "a seed")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freeze-agent",
        description="Learned layer freezing: decide per layer, while training runs, "
        "which layers train, learn locally or freeze.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    envs = commands.add_parser("envs", help="list the training tasks in envs/")
    envs.set_defaults(handler=_envs)

    policies = commands.add_parser("policies", help="list the policies --policy accepts")
    policies.set_defaults(handler=_policies)

    run = commands.add_parser("run", help="train a task under a freeze policy")
    run.add_argument("task", nargs="?", default=DEFAULT_TASK, help="task name or YAML path")
    run.add_argument(
        "--policy",
        default="default",
        help="a trained policy's folder, the name of one in policies/, or a registered policy "
        "with its arguments (freeze-agent policies lists them; default: %(default)s, the "
        "shipped policy)",
    )
    run.add_argument("--seed", type=_seed, default=0)
    run.add_argument("--epochs", type=_count, default=None, help="override the task's epoch budget")
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run.add_argument("--json", type=Path, default=None, help="also write the results here")
    run.set_defaults(handler=_run)

    profile = commands.add_parser(
        "profile", help="measured vs modeled time per iteration for each frozen-prefix depth"
    )
    profile.add_argument("task", help="task name or YAML path")
    profile.add_argument("--repetitions", type=_count, default=5)
    profile.add_argument("--iterations", type=_count, default=3)
    profile.add_argument("--device", default=None)
    profile.add_argument("--json", type=Path, default=None)
    profile.set_defaults(handler=_profile)

    overhead = commands.add_parser(
        "overhead",
        help="cost of the signal machinery: repeated A/B pairs of training with vs without it",
        description="Train two copies of TASK from the same seed, A with every signal and B "
        "bare. After a warm-up, each interval is one pair: both copies train it back to back, in "
        "blocks interleaved A B B A (B A A B every other pair). Prints the median overhead of the "
        "pairs, their spread, the whole-run ratio, where A's extra time goes, and a verdict "
        "against the 2% bound (on the worst run's median with --repeats).",
    )
    overhead.add_argument("task", nargs="?", default=DEFAULT_TASK, help="task name or YAML path")
    overhead.add_argument(
        "--intervals", type=_count, default=None, help="warm-up included (default: the whole run)"
    )
    overhead.add_argument(
        "--warmup",
        type=_integer_from(0, "a warm-up"),
        default=_OVERHEAD_WARMUP,
        help="intervals trained untimed first, while the reference worker starts "
        "(default: %(default)s)",
    )
    overhead.add_argument(
        "--blocks",
        type=_count,
        default=_OVERHEAD_BLOCKS,
        help="blocks each copy trains a pair's interval in (default: %(default)s)",
    )
    overhead.add_argument(
        "--repeats", type=_count, default=1, help="run the whole A/B this many times"
    )
    overhead.add_argument(
        "--control",
        action="store_true",
        help="A/A control: both copies bare, to read the noise floor of the machine",
    )
    overhead.add_argument("--seed", type=_seed, default=0)
    overhead.add_argument("--device", default=None)
    overhead.add_argument("--json", type=Path, default=None)
    overhead.set_defaults(handler=_overhead)

    train = commands.add_parser(
        "train",
        help="learn a freeze policy with MaskablePPO on training tasks",
        description="Learn a freeze policy with MaskablePPO. Every setting of "
        "freeze_agent.rl.training.TrainConfig is an option of the same name.",
    )
    train.add_argument("--out", type=Path, required=True, help="policy folder to write")
    _add_config_options(train)
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
    evaluate.add_argument("--tasks", nargs="+", default=["val", "heldout"])
    evaluate.add_argument("--seeds", nargs="+", type=_seed, default=[0, 1, 2])
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

    bench = commands.add_parser(
        "bench",
        help="policies side by side on the same tasks and seeds, interleaved; resumable",
        description="Run every policy on every task and seed: per (task, seed) a round with "
        "`none` first and last and the others in between, speedups measured against the "
        "round's `none` runs. Rerunning the same command redoes only the missing runs.",
    )
    bench.add_argument(
        "--tasks", nargs="+", default=["heldout"], help="split names, folders, YAML or task names"
    )
    bench.add_argument(
        "--policies",
        default="default,none,linear,freezeout,autofreeze,egeria,smartfrz,localsgd-dynamic,oracle",
        help="comma-separated policy specs (default: %(default)s)",
    )
    bench.add_argument("--seeds", nargs="+", type=_seed, default=[0, 1, 2])
    bench.add_argument("--out", type=Path, required=True, help="results folder (resumable)")
    bench.add_argument("--epochs", type=_count, default=None, help="override every task's budget")
    bench.add_argument(
        "--tolerance-pp", type=float, default=0.5, help="accuracy loss counted as none (pp)"
    )
    bench.set_defaults(handler=_bench)

    predictor = commands.add_parser(
        "train-predictor",
        help="train SmartFRZ's attention predictor on full-training runs (CKA labels)",
        description="Train SmartFRZ's attention predictor on full-training runs labelled by "
        "linear CKA with the final model, and score it on held-out tasks.",
    )
    predictor.add_argument(
        "--tasks", nargs="+", default=["train"], help="task names, YAML files, folders or splits"
    )
    predictor.add_argument(
        "--val", nargs="*", default=["val"], help="held-out tasks (scored only, never trained on)"
    )
    predictor.add_argument("--out", type=Path, default=None, help="default: policies/smartfrz")
    predictor.add_argument("--seeds", type=_seed, nargs="+", default=[0])
    predictor.add_argument("--epochs", type=_count, default=None, help="predictor training epochs")
    predictor.add_argument("--lr", type=float, default=1e-3)
    predictor.add_argument("--seed", type=_seed, default=0, help="seed of the predictor's training")
    predictor.add_argument("--cka-threshold", type=float, default=None)
    predictor.add_argument("--decisions", type=_count, default=None, help="decisions per run")
    predictor.add_argument("--cache", type=Path, default=None, help="folder of recorded runs")
    predictor.add_argument("--threads", type=_count, default=None, help="torch CPU threads")
    predictor.set_defaults(handler=_train_predictor)
    return parser


# ---------------------------------------------------------------------- envs


def _envs(_args: argparse.Namespace) -> int:
    from freeze_agent.tasks.trainer import Trainer

    table = Table(title="training tasks (descriptions in the YAML specs)")
    for column in ("task", "split", "model", "dataset", "units", "epochs"):
        table.add_column(column)
    for task in list_tasks():
        try:
            units = str(len(Trainer(task, device="cpu", epochs=1, signals=False).units))
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
    _show(table)
    return 0


def _policies(_args: argparse.Namespace) -> int:
    import inspect

    from freeze_agent.policies.base import registered_policies
    from freeze_agent.policies.registry import shipped_policies

    table = Table(title="policies (--policy NAME or NAME:ARGS, e.g. egeria:window=30)")
    for column in ("policy", "parameters (defaults)", "what it does"):
        table.add_column(column)
    for name in shipped_policies():
        table.add_row(name, "", f"trained policy shipped in policies/{name}/")
    for name, cls in registered_policies(aliases=False).items():
        parameters = [
            f"{p.name}={p.default:.4g}" if isinstance(p.default, float) else f"{p.name}={p.default}"
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.default is not inspect.Parameter.empty
        ]
        aliases = f" (also {', '.join(cls.aliases)})" if cls.aliases else ""
        table.add_row(name + aliases, ", ".join(parameters), cls.summary().replace("``", "`"))
    _show(table)
    return 0


# ---------------------------------------------------------------------- run


def _run(args: argparse.Namespace) -> int:
    from freeze_agent.policies.registry import make_policy
    from freeze_agent.tasks.trainer import Trainer

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


def _count_of(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


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
    if result.signals.get("observations"):
        signals = result.signals
        summary.add_row(
            "observations with plasticity",
            f"{100 * signals['plasticity_fraction']:.0f}% of {signals['observations']}; "
            f"{_count_of(signals['reference_waits'], 'wait')} for a late reference result "
            f"({signals['reference_wait_seconds']:.2f} s)",
        )
    if result.diverged:
        summary.add_row("[red]diverged[/]", "the training loss became non-finite")
    _show(summary)

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
    _show(timeline)


# ---------------------------------------------------------------------- profile


def _profile(args: argparse.Namespace) -> int:
    from freeze_agent.bench.profiling import profile_task
    from freeze_agent.core.cost_model import TERMS

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
    _show(units)
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
    _show(constants)
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
    _show(depths)
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
    from freeze_agent.bench.overhead import BUSY_FACTOR, CHILD_CPU, PARTS, measure_overheads

    task = load_task(args.task)
    what = f"measuring the signal overhead on {task.name} (A/B pairs)"
    finished: list[Any] = []
    with console.status(what) as status:

        def on_run(run: Any) -> None:
            finished.append(run)
            done = f"run {len(finished)} of {args.repeats} done"
            status.update(f"{what}: {done}, median {_percent(run.median)}")

        result = measure_overheads(
            task,
            repeats=args.repeats,
            on_run=on_run,
            seed=args.seed,
            intervals=args.intervals,
            warmup=args.warmup,
            blocks=args.blocks,
            device=args.device,
            signals=not args.control,
        )
    runs = result.runs
    _show(_overhead_table(runs[0]) if len(runs) == 1 else _overhead_runs_table(runs))
    if not args.control:
        _show(_overhead_parts_table(runs, [*PARTS, CHILD_CPU], CHILD_CPU))
    busy = [i for i, run in enumerate(runs, 1) if run.busy > BUSY_FACTOR]
    if busy:
        which = "this run" if len(runs) == 1 else "run " + ", ".join(map(str, busy))
        console.print(
            f"[yellow]the machine was busy[/] in {which}: the median bare block took more than "
            f"{BUSY_FACTOR:g}x the fastest one; other jobs blur these figures"
        )
    if len(runs) > 1:
        console.print(
            f"{len(runs)} runs: median overhead {_percent(result.median)}, worst "
            f"{_percent(result.worst)} (each run's median over its pairs)"
        )
    which = "the median" if len(runs) == 1 else "the worst run's median"
    if args.control:
        console.print(
            f"A/A control (both copies bare): {which} {_percent(result.worst)} is the noise "
            "floor of this machine; no verdict"
        )
    else:
        verdict = "[bold green]PASS[/]" if result.meets_bound else "[bold red]FAIL[/]"
        relation = "is within" if result.meets_bound else "exceeds"
        console.print(
            f"{verdict}: {which} {_percent(result.worst)} {relation} the "
            f"{100 * result.bound:g}% bound on the signal overhead"
        )
    if args.json:
        _write_json(args.json, {**result.to_dict(), "control": args.control})
    return 0


# freeze_agent.bench.overhead's WARMUP_INTERVALS and BLOCKS (that module imports torch)
_OVERHEAD_WARMUP, _OVERHEAD_BLOCKS = 2, 2


def _percent(fraction: float) -> str:
    return f"{100 * fraction:+.1f}%"


def _waits(count: int, seconds: float) -> str:
    return f"{_count_of(count, 'wait')}, {seconds:.2f} s"


def _overhead_table(run: Any) -> Table:
    table = Table(show_header=False, title=f"{run.task}: signal overhead, every unit in TRAIN")
    q1, q3 = run.quartiles
    low, high = run.extremes
    order = "A B B A / B A A B" if run.blocks > 1 else "A B / B A"
    table.add_row(f"A/B pairs (one interval each, {order})", str(len(run.pairs)))
    table.add_row("overhead per pair: median", _percent(run.median))
    table.add_row("  quartiles", f"{_percent(q1)} to {_percent(q3)}")
    table.add_row("  min to max", f"{_percent(low)} to {_percent(high)}")
    table.add_row("training with signals (A)", f"{run.seconds_with_signals:.2f} s")
    table.add_row("  of which observe()", f"{run.observe_seconds:.2f} s")
    waits = _waits(run.reference_waits, run.reference_wait_seconds)
    table.add_row("  waits for a late reference result", waits)
    table.add_row("training without (B)", f"{run.seconds_without:.2f} s")
    table.add_row("ratio (whole run)", f"{run.ratio:.3f}  ({_percent(run.ratio - 1)})")
    plasticity = f"{run.intervals_with_plasticity} of {run.intervals}"
    table.add_row("observations with plasticity", plasticity)
    table.add_row(
        f"warm-up: {_count_of(run.warmup_intervals, 'interval')}, not in the ratios",
        f"A {run.warmup_seconds_with_signals:.2f} s "
        f"(+{run.warmup_settle_seconds:.2f} s settling), B {run.warmup_seconds_without:.2f} s; "
        + _waits(run.warmup_reference_waits, run.warmup_reference_wait_seconds),
    )
    return table


def _overhead_runs_table(runs: list[Any]) -> Table:
    table = Table(title=f"{runs[0].task}: signal overhead, every unit in TRAIN, repeated A/B")
    columns = ["run", "pairs", "median", "quartiles", "min to max", "ratio", "plasticity", "waits"]
    for column in columns:
        table.add_column(column, justify="right")
    for i, run in enumerate(runs, 1):
        q1, q3 = run.quartiles
        low, high = run.extremes
        table.add_row(
            str(i),
            str(len(run.pairs)),
            _percent(run.median),
            f"{_percent(q1)} to {_percent(q3)}",
            f"{_percent(low)} to {_percent(high)}",
            f"{run.ratio:.3f}",
            f"{run.intervals_with_plasticity} of {run.intervals}",
            _waits(run.reference_waits, run.reference_wait_seconds),
        )
    return table


def _overhead_parts_table(runs: list[Any], names: list[str], background: str) -> Table:
    bare = sum(run.seconds_without for run in runs)
    table = Table(title="where A's extra time goes (all pairs)")
    for column in ("part", "seconds", "of B's time"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for name in names:
        if all(name not in run.parts for run in runs):
            continue
        seconds = sum(run.parts.get(name, 0.0) for run in runs)
        label = f"{name} (in the background)" if name == background else name
        table.add_row(label, f"{seconds:.3f}", f"{100 * seconds / bare:.2f}%")
    parts = sum(s for run in runs for name, s in run.parts.items() if name != background)
    rest = sum(run.seconds_with_signals - run.seconds_without for run in runs) - parts
    table.add_row(
        "training itself: slower beside the signals, or noise",
        f"{rest:+.3f}",
        f"{100 * rest / bare:+.2f}%",
    )
    return table


# ---------------------------------------------------------------------- train


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per ``TrainConfig`` field, with its type, default and help."""
    from freeze_agent.rl.training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for spec in dataclasses.fields(TrainConfig):
        if not spec.metadata.get("cli", True):
            continue
        flag, default = "--" + spec.name.replace("_", "-"), getattr(defaults, spec.name)
        kind = hints[spec.name]
        origin = typing.get_origin(kind)
        options: dict[str, Any] = {"help": spec.metadata.get("help", ""), "default": default}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            options.update(nargs="+", type=typing.get_args(kind)[0])
        elif origin is dict:
            options.update(nargs="+", type=_key_value, metavar="KEY=VALUE", default=[])
        else:
            scalar = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
            options["type"] = scalar[0]
        if default is not None and not isinstance(default, dict):
            options["help"] += " (default: %(default)s)"
        parser.add_argument(flag, **options)


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` the options of ``_add_config_options`` describe."""
    from freeze_agent.rl.training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    settings = {}
    for spec in dataclasses.fields(TrainConfig):
        if spec.metadata.get("cli", True):
            value = getattr(args, spec.name)
            settings[spec.name] = (
                dict(value) if typing.get_origin(hints[spec.name]) is dict else value
            )
    return TrainConfig(**settings)


def _key_value(text: str) -> tuple[str, Any]:
    """``accuracy_weight=1.0`` -> ("accuracy_weight", 1.0): the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def _train(args: argparse.Namespace) -> int:
    from freeze_agent.rl.training import TrainConfig, train

    if args.resume:
        console.print(f"resuming the run in {args.out} with its saved settings")
        config = TrainConfig()  # replaced by the saved one
    else:
        config = _config_from_args(args)
    out = train(config, args.out, resume=args.resume, use_wandb=not args.no_wandb)
    console.print(f"policy written to {out}")
    return 0


def _train_predictor(args: argparse.Namespace) -> int:
    from freeze_agent.rl import predictor_training
    from freeze_agent.signals.predictor import DEFAULT_DIR

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = {
        name: value
        for name, value in (
            ("epochs", args.epochs),
            ("cka_threshold", args.cka_threshold),
            ("decisions", args.decisions),
        )
        if value is not None
    }
    out = args.out or DEFAULT_DIR
    card = predictor_training.train_predictor(
        args.tasks,
        args.val,
        out,
        seeds=args.seeds,
        lr=args.lr,
        seed=args.seed,
        cache=args.cache,
        **options,
    )
    _print_predictor_card(card, out)
    return 0


def _print_predictor_card(card: dict[str, Any], out: Path) -> None:
    table = Table(title=f"SmartFRZ predictor → {out}")
    for column in ("split", "task", "examples", "converged", "accuracy", "balanced acc."):
        table.add_column(column, justify="left" if column in ("split", "task") else "right")
    for split in ("train", "heldout"):
        metrics = card["metrics"][split]
        if metrics is None:
            continue
        rows = [*metrics["per_task"].items(), ("all", metrics)]
        for name, m in rows:
            table.add_row(
                split if name == "all" else "",
                f"[bold]{name}[/]" if name == "all" else name,
                str(m["examples"]),
                f"{m['positive_fraction']:.1%}",
                f"{m['accuracy']:.3f}",
                f"{m['balanced_accuracy']:.3f}",
            )
    baseline = card["metrics"]["progress_baseline"]
    if baseline["heldout"] is not None:
        table.caption = (
            f"progress-only baseline (converged from decision {baseline['from_decision']}): "
            f"held-out accuracy {baseline['heldout']['accuracy']:.3f}, "
            f"balanced {baseline['heldout']['balanced_accuracy']:.3f}"
        )
    _show(table)


# ---------------------------------------------------------------------- evaluate


def _evaluate(args: argparse.Namespace) -> int:
    from freeze_agent.bench.evaluation import evaluate_policy

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
    _show(table)
    if args.json:
        _write_json(args.json, report.to_dict())
    if args.update_card:
        report.record_in_card()
        console.print(f"recorded in {report.policy}/policy.json")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from rich.progress import TimeRemainingColumn

    from freeze_agent.bench.benchmark import Bench
    from freeze_agent.bench.report import PLOTS, write_report

    bench = Bench(
        tasks=args.tasks,
        policies=[p.strip() for p in args.policies.split(",") if p.strip()],
        seeds=args.seeds,
        out=args.out,
        epochs=args.epochs,
        tolerance_pp=args.tolerance_pp,
    )
    plan, done = bench.plan(), len(bench.finished())
    console.print(f"{len(plan)} runs ({done} already finished in {args.out})")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )
    with progress:
        bar = progress.add_task("bench", total=len(plan), completed=done, status="")

        def advance(run, skipped: bool) -> None:
            if not skipped:
                status = f"{run.task.name} seed {run.seed} {run.policy}"
                progress.update(bar, advance=1, status=status)

        records = bench.run(on_run=advance)
    command = "freeze-agent " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""
    tables = write_report(records, args.out, tolerance_pp=args.tolerance_pp, command=command)
    table = Table(title=f"policies over {len(bench.resolved)} tasks x {len(args.seeds)} seeds")
    for column in (
        "policy",
        "geomean measured",
        "modeled",
        "worst Δpp",
        "within tol.",
        "of oracle",
    ):
        table.add_column(column, justify="right")
    for row in tables["policies"]:
        of_oracle = row["of_oracle"]
        table.add_row(
            row["policy"],
            f"{row['geomean_measured_speedup']:.2f}x",
            f"{row['geomean_modeled_speedup']:.2f}x",
            f"{row['worst_change_pp']:+.2f}",
            f"{row['tasks_within_tolerance']} of {row['tasks']}",
            "-" if of_oracle is None else f"{of_oracle:.0%}",
        )
    _show(table)
    written = ", ".join(["results.json", "results.csv", "summary.md", *PLOTS])
    console.print(f"wrote {written} in {args.out}")
    return 0


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
