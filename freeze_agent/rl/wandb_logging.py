"""Weights & Biases logging for policy training: PPO statistics and one record per episode.

Three pieces, all safe to use when logging is off (``run is None``):

* ``start_run`` opens a run. With no credentials it runs *offline*: everything lands in a
  local folder that ``wandb sync`` uploads later, so training never needs the network.
* ``WandbOutputFormat`` is a stable-baselines3 logger output: every record SB3 dumps
  (``train/loss``, ``train/entropy_loss``, ``train/explained_variance``, ``rollout/ep_rew_mean``,
  ``time/fps``...) goes to the run.
* ``EpisodeLogger`` is an SB3 callback: for each finished episode (an env info carrying
  ``"episode_summary"``) it logs the scalars and, every ``media_every`` episodes, the per-unit
  mode timeline as an image (``plot_timeline``) and as a table. It also attaches a
  ``WandbOutputFormat`` to the logger of the ``learn`` call it serves.

The x axis. Both writers log a ``global_step`` field (the PPO ``num_timesteps``, i.e. decisions
taken so far) and ``start_run`` declares it the step metric of every other metric. Nothing
passes wandb's own ``step=``: that counter must only grow, and SB3 dumps at
``num_timesteps = N`` after the episodes of that rollout were logged, a resumed run restarts
the process, and a caller may log in between; each would silently drop rows. With an explicit
step metric, every row is kept and plotted at the right decision count.

wandb is imported only when a run is started or media is built, so importing this module (or
``freeze_agent``) does not pay for it.
"""

from __future__ import annotations

import netrc
import numbers
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger

from freeze_agent.core.mode_timeline import (
    figure_to_array,
    plot_timeline,
    timeline_matrix,
)
from freeze_agent.core.modes import Mode

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm
    from wandb.sdk.wandb_run import Run

STEP_METRIC = "global_step"
FORMAT_NAME = "wandb"  # name to pass in SB3 ``logger.record(..., exclude=...)`` to skip wandb
DEFAULT_DIRECTORY = "runs/wandb"
DEFAULT_HOST = "https://api.wandb.ai"
RUN_ID_FILE = "wandb_run_id"
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")

# Summary fields also logged per task, so each task gets its own curve.
PER_TASK_KEYS = (
    "return",
    "modeled_speedup",
    "measured_speedup",
    "accuracy_delta_pp",
    "val_accuracy",
)


# ---------------------------------------------------------------------------------------------
# Starting a run


def has_credentials(environ: Mapping[str, str] | None = None) -> bool:
    """Whether wandb would find credentials for its server, checked without any network call.

    Mirrors wandb's own lookup (``wandb.sdk.lib.wbauth``): ``WANDB_API_KEY`` or
    ``WANDB_IDENTITY_TOKEN_FILE`` in the environment, else an entry with a password for the
    server's host (``WANDB_BASE_URL``, default api.wandb.ai) in the netrc file (``$NETRC``,
    else ``~/.netrc``, else ``~/_netrc``). The key is not validated: that needs the server.
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(env.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    if not host:
        return False
    if env.get("NETRC"):
        path = Path(env["NETRC"]).expanduser()
    else:
        path = next(
            (p for p in (Path("~/.netrc"), Path("~/_netrc")) if p.expanduser().exists()),
            Path("~/.netrc"),
        ).expanduser()
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(environ: Mapping[str, str] | None = None) -> str:
    """The wandb mode a run gets: ``WANDB_MODE`` if set, else online with credentials, else
    offline.

    Offline is the safe default: training machines here have no network, and an online run
    without credentials would stop to prompt for a key.
    """
    env = os.environ if environ is None else environ
    mode = env.get("WANDB_MODE", "").strip().lower()
    if mode:
        if mode not in WANDB_MODES:
            raise ValueError(
                f"WANDB_MODE={env['WANDB_MODE']!r} is not a wandb mode; use one of "
                f"{', '.join(WANDB_MODES[:3])} (or unset it)"
            )
        return mode
    return "online" if has_credentials(env) else "offline"


def start_run(
    *,
    project: str,
    config: dict[str, Any],
    enabled: bool = True,
    directory: str | Path | None = None,
    name: str | None = None,
    resume_id: str | None = None,
) -> Run | None:
    """Open a wandb run for policy training, or return None when logging is off.

    Logging is off when ``enabled`` is False (``--no-wandb``) or the mode resolves to
    ``disabled``. The mode comes from ``resolve_mode``. Run files go to
    ``<directory>/wandb/`` (``directory`` defaults to ``$WANDB_DIR``, else ``runs/wandb``).

    Pass a previous run's id (``run.id``, kept with ``save_run_id``) as ``resume_id`` to go
    on logging into the same run: online, wandb appends to it; offline, the new session gets
    its own folder with the same id, and ``wandb sync`` uploads the folders of one id in order.

    Every metric is plotted against ``global_step`` (see the module docstring).
    """
    if not enabled:
        return None
    mode = resolve_mode()
    if mode == "disabled":
        return None
    import wandb

    root = Path(directory or os.environ.get("WANDB_DIR") or DEFAULT_DIRECTORY)
    root.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project,
        config=config,
        name=name,
        dir=str(root),
        mode=mode,
        id=resume_id,
        resume="allow" if resume_id else None,
    )
    run.define_metric(STEP_METRIC, hidden=True)
    run.define_metric("*", step_metric=STEP_METRIC)
    hint = sync_hint(run)
    if hint:
        print(hint, file=sys.stderr, flush=True)
    return run


def sync_hint(run: Run | None) -> str | None:
    """For an offline run, a line saying where it lies and how to upload it; else None."""
    if run is None or run.settings.mode not in ("offline", "dryrun"):
        return None
    folder = Path(run.settings.sync_dir)
    return (
        f"wandb: offline run {run.id} is saved in {folder}; upload it with "
        f"`wandb sync {folder}` (every session of this run: "
        f"`wandb sync {folder.parent}/offline-run-*-{run.id}`)"
    )


def save_run_id(run: Run | None, folder: str | Path) -> Path | None:
    """Write ``run.id`` to ``folder/wandb_run_id`` so a resumed training continues this run."""
    if run is None:
        return None
    path = Path(folder) / RUN_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run.id + "\n")
    return path


def load_run_id(folder: str | Path) -> str | None:
    """The run id ``save_run_id`` wrote in ``folder``, or None if there is none."""
    path = Path(folder) / RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


# ---------------------------------------------------------------------------------------------
# PPO statistics


def _as_number(value: Any) -> int | float | None:
    """``value`` as a plain int or float, or None if it is not a single real number."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # 0-d numpy arrays and torch tensors
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


class WandbOutputFormat(KVWriter):
    """An SB3 logger output that logs each dump of numeric records to a wandb run.

    ``step`` (SB3 passes ``num_timesteps``) is logged as ``global_step``, not as wandb's
    ``step=``. Strings, figures, videos and hyper-parameter records are skipped, and so are
    records excluded for ``"wandb"``. With ``run=None`` it does nothing.
    """

    def __init__(self, run: Run | None) -> None:
        self.run = run
        self.dumps_logged = 0

    def write(
        self,
        key_values: dict[str, Any],
        key_excluded: dict[str, tuple[str, ...]],
        step: int = 0,
    ) -> None:
        if self.run is None:
            return
        row: dict[str, int | float] = {}
        for key, value in key_values.items():
            if FORMAT_NAME in (key_excluded.get(key) or ()):
                continue
            number = _as_number(value)
            if number is not None:
                row[key] = number
        if row:
            row[STEP_METRIC] = int(step)
            self.run.log(row)
            self.dumps_logged += 1

    def close(self) -> None:
        """Nothing to release: the run belongs to the caller, who finishes it."""


def _add_writer(logger: Logger, run: Run) -> None:
    if not any(isinstance(f, WandbOutputFormat) and f.run is run for f in logger.output_formats):
        logger.output_formats.append(WandbOutputFormat(run))


def attach_to(model: BaseAlgorithm, run: Run | None) -> None:
    """Make ``model``'s SB3 logger also write to ``run``, for every later ``learn`` call.

    SB3 builds a fresh logger in each ``learn`` unless one was set with ``set_logger``; so the
    model's logger (or, before the first ``learn``, the one SB3 would have built from its
    ``verbose`` and ``tensorboard_log``) is set as the model's own, with the wandb output
    added. Idempotent. ``EpisodeLogger`` does the same for its ``learn`` call, so a caller
    using it needs this only to log PPO statistics without episodes.
    """
    if run is None:
        return
    logger: Logger | None = getattr(model, "_logger", None)
    if logger is None:
        from stable_baselines3.common.utils import configure_logger

        logger = configure_logger(model.verbose, model.tensorboard_log, type(model).__name__)
    _add_writer(logger, run)
    model.set_logger(logger)


# ---------------------------------------------------------------------------------------------
# Episodes


def _key_part(text: str) -> str:
    """``text`` made safe as one component of a wandb key (no slashes)."""
    return re.sub(r"[^\w.-]+", "_", text) or "_"


def _caption(summary: Mapping[str, Any]) -> str:
    parts = [f"{summary.get('task', '?')} seed {summary.get('seed', '?')}"]
    for key, fmt in (
        ("return", "return {:.3f}"),
        ("modeled_speedup", "speedup {:.2f}x modeled"),
        ("measured_speedup", "{:.2f}x measured"),
        ("accuracy_delta_pp", "Δacc {:+.2f} pp"),
    ):
        number = _as_number(summary.get(key))
        if number is not None and np.isfinite(number):
            parts.append(fmt.format(number))
    if summary.get("diverged"):
        parts.append("DIVERGED")
    if summary.get("reason"):
        parts.append(str(summary["reason"]))
    return ", ".join(parts)


def timeline_table(unit_names: Sequence[str], timeline: Sequence[str]) -> Any:
    """A ``wandb.Table`` with one row per decision: its index, the count of units in each mode,
    then one column per unit (``"<index>:<name>"``, unique and in forward order) holding the
    mode name."""
    import wandb

    matrix = timeline_matrix(unit_names, timeline)
    unit_columns = [f"{i}:{name}" for i, name in enumerate(unit_names)]
    counts = [f"n_{m.name.lower()}" for m in Mode]
    rows = [
        [d, *(int((column == m).sum()) for m in Mode), *(Mode(v).name for v in column)]
        for d, column in enumerate(matrix.T)
    ]
    return wandb.Table(columns=["decision", *counts, *unit_columns], data=rows)


class EpisodeLogger(BaseCallback):
    """An SB3 callback that logs each episode summary an env reports.

    At the terminal step the env puts ``info["episode_summary"]`` (task, seed, return,
    speedups, accuracies, unit names, mode timeline...). Every numeric field is logged as
    ``episode/<field>`` (booleans as 0/1), the main ones also as ``episode/<task>/<field>``,
    plus ``episode/index`` and the fraction of unit-decisions in each mode. Every
    ``media_every`` episodes (0: never) the timeline is logged as an image and a table under
    ``episode/<task>/timeline`` and ``.../timeline_table``; per task, so the step slider of one
    panel shows how that task's schedule evolves. Media is the bulk of a run's size: an image
    is some tens of kB and each table is stored as a small artifact.

    ``forward_sb3_logs`` also attaches a ``WandbOutputFormat`` to the logger of the
    ``learn`` call this callback serves. With ``run=None`` nothing is logged.
    """

    def __init__(
        self,
        run: Run | None,
        *,
        media_every: int = 1,
        forward_sb3_logs: bool = True,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if media_every < 0:
            raise ValueError(f"media_every must be >= 0 (0: no media), got {media_every}")
        self.run = run
        self.media_every = media_every
        self.forward_sb3_logs = forward_sb3_logs
        self.episodes_seen = 0
        self.episodes_logged = 0
        self.media_logged = 0
        self._media_warned = False

    def _init_callback(self) -> None:
        # SB3 has built the logger of this learn call by now.
        if self.run is not None and self.forward_sb3_logs:
            _add_writer(self.model.logger, self.run)

    def _on_step(self) -> bool:
        for info in self.locals.get("infos") or ():
            summary = info.get("episode_summary") if isinstance(info, Mapping) else None
            if summary is not None:
                self.log_episode(summary, step=self.num_timesteps)
        return True

    def log_episode(self, summary: Mapping[str, Any], step: int) -> None:
        """Log one episode summary at x = ``step`` (decisions taken so far)."""
        self.episodes_seen += 1
        if self.run is None:
            return
        task = _key_part(str(summary.get("task", "unknown")))
        row: dict[str, Any] = {STEP_METRIC: int(step), "episode/index": self.episodes_seen}
        for key, value in summary.items():
            number = _as_number(value)
            if number is not None:
                row[f"episode/{key}"] = number
                if key in PER_TASK_KEYS:
                    row[f"episode/{task}/{key}"] = number
        unit_names = list(summary.get("unit_names") or ())
        timeline = list(summary.get("timeline") or ())
        if unit_names and timeline:
            chars = "".join(timeline)
            for mode in Mode:
                row[f"episode/frac_{mode.name.lower()}"] = chars.count(mode.name[0]) / len(chars)
        if (
            self.media_every
            and unit_names
            and (self.episodes_seen - 1) % self.media_every == 0
            and self._add_media(row, task, summary, unit_names, timeline)
        ):
            self.media_logged += 1
        self.run.log(row)
        self.episodes_logged += 1

    def _add_media(
        self,
        row: dict[str, Any],
        task: str,
        summary: Mapping[str, Any],
        unit_names: list[str],
        timeline: list[str],
    ) -> bool:
        import wandb

        caption = _caption(summary)
        try:
            image = figure_to_array(plot_timeline(unit_names, timeline, title=caption))
            table = timeline_table(unit_names, timeline)
        except ValueError as error:
            # A malformed timeline should not stop a long training run; say so once.
            if not self._media_warned:
                warnings.warn(f"episode timeline not logged: {error}", stacklevel=2)
                self._media_warned = True
            return False
        row[f"episode/{task}/timeline"] = wandb.Image(image, caption=caption)
        row[f"episode/{task}/timeline_table"] = table
        return True
