"""Learn a freeze policy: MaskablePPO on the freeze environment, with checkpoints, resume,
best-on-validation selection and Weights & Biases logging (``freeze-agent train``).

Read top to bottom: the configuration, the environments, the model (new or resumed), the
callbacks, ``learn``, and the artifact written to ``out``. Environment steps are whole training
intervals (seconds each), so the PPO hyper-parameters favour small rollouts and several epochs
per update.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from freeze_agent.core.checks import require_int
from freeze_agent.policies.artifact import update_card
from freeze_agent.policies.learned import LearnedPolicy
from freeze_agent.policies.network import UnitAttentionPolicy
from freeze_agent.policies.teacher import PlateauTeacher
from freeze_agent.rl.env import FreezeTrainingEnv
from freeze_agent.rl.episodes import Evaluation
from freeze_agent.rl.imitation import Demonstrations, clone, collect
from freeze_agent.rl.learning_curve import (
    CURVE_FIELDS,
    EPISODES_FILE,
    EpisodeRecorder,
    learning_curve,
    read_episodes,
    training_wall_seconds,
)
from freeze_agent.rl.rewards import RewardConfig
from freeze_agent.rl.validation import SaveBestPolicy, ValidationCallback, recorded_best
from freeze_agent.rl.wandb_logging import EpisodeLogger, attach_to, start_run
from freeze_agent.tasks.spec import resolve_tasks

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "train_config.json"
KICKSTART_FILE = "kickstart.json"


def _help(text: str) -> dict[str, str]:
    """Field metadata: the option's help (``freeze-agent train`` is generated from the fields)."""
    return {"help": text}


@dataclass
class TrainConfig:
    """Everything that defines a policy-training run; saved next to its checkpoints so that
    ``--resume`` continues exactly the same run. Each field is a ``freeze-agent train`` option
    of the same name (``n_envs``: ``--n-envs``)."""

    tasks: list[str] = field(
        default_factory=lambda: ["train"],
        metadata=_help("training tasks: names, YAML files, folders or splits"),
    )
    val_tasks: list[str] = field(
        default_factory=lambda: ["val"], metadata=_help("validation tasks (best-policy selection)")
    )
    timesteps: int = field(default=3000, metadata=_help("decisions to train on"))
    n_envs: int = field(default=2, metadata=_help("environment processes"))
    seed: int = field(default=0, metadata=_help("seed of PPO and of the environments' draws"))
    training_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata=_help("training seeds an episode draws from (each needs one reference run)"),
    )
    max_units: int = field(default=32, metadata=_help("unit slots of the observation and action"))
    epochs: int | None = field(
        default=None, metadata=_help("override every task's epoch budget (quick runs, tests)")
    )
    decisions: int | None = field(
        default=None, metadata=_help("override every task's number of decisions")
    )
    reference_model: bool = field(
        default=True,
        metadata=_help("the int8 reference worker (without it plasticity features stay missing)"),
    )
    reward: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help(
            "reward settings (freeze_agent.rl.rewards.RewardConfig), e.g. accuracy_weight=1.0"
        ),
    )
    # PPO, sized for expensive steps: a rollout of n_steps * n_envs decisions per update
    n_steps: int = field(default=64, metadata=_help("PPO rollout length per environment"))
    batch_size: int = field(default=64, metadata=_help("PPO minibatch size"))
    n_epochs: int = field(default=10, metadata=_help("PPO epochs per update"))
    learning_rate: float = field(default=3e-4, metadata=_help("PPO learning rate"))
    gamma: float = field(
        default=0.995,
        metadata=_help("discount (the final accuracy penalty must reach early decisions)"),
    )
    gae_lambda: float = field(default=0.95, metadata=_help("GAE lambda"))
    ent_coef: float = field(
        default=0.0, metadata=_help("PPO entropy bonus (the initial prior drives exploration)")
    )
    policy_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata=_help("UnitAttentionPolicy arguments, e.g. embed_dim=32")
    )
    imitation_rounds: int = field(
        default=0,
        metadata=_help(
            "kick-start: imitate the plateau teacher for this many rounds before PPO (round 1 "
            "plays the teacher, later rounds the agent: DAgger); 0: PPO from scratch"
        ),
    )
    imitation_episodes: int = field(
        default=1, metadata=_help("kick-start episodes per environment and round")
    )
    imitation_epochs: int = field(
        default=100, metadata=_help("behaviour-cloning epochs per kick-start round")
    )
    teacher_tolerance: float = field(
        default=0.05,
        metadata=_help(
            "the teacher starts freezing once the reference's val loss is within this fraction of "
            "its improvement from its best"
        ),
    )
    checkpoint_every: int = field(default=256, metadata=_help("timesteps between checkpoints"))
    eval_every: int = field(
        default=1024, metadata=_help("timesteps between validations; 0: only at the end")
    )
    wandb_project: str | None = field(
        default="freeze-agent", metadata=_help("Weights & Biases project")
    )
    wandb_run_id: str | None = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        at_least = {
            "timesteps": 1,
            "n_envs": 1,
            "seed": 0,
            "max_units": 2,
            "n_steps": 1,
            "batch_size": 1,
            "n_epochs": 1,
            "imitation_rounds": 0,
            "imitation_episodes": 1,
            "imitation_epochs": 1,
            "checkpoint_every": 1,
            "eval_every": 0,
        }
        for name, minimum in at_least.items():
            require_int(name, getattr(self, name), minimum)
        for name in ("epochs", "decisions"):
            if getattr(self, name) is not None:
                require_int(name, getattr(self, name), 1)
        if not self.training_seeds or min(self.training_seeds) < 0:
            raise ValueError(f"training_seeds must be seeds >= 0, got {self.training_seeds}")
        if (self.n_steps * self.n_envs) % self.batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} must divide n_steps * n_envs = "
                f"{self.n_steps * self.n_envs}"
            )
        unknown = sorted(set(self.reward) - {f.name for f in fields(RewardConfig)})
        if unknown:
            known = ", ".join(f.name for f in fields(RewardConfig))
            raise ValueError(f"reward: unknown settings {', '.join(unknown)}; known: {known}")
        RewardConfig(**self.reward)  # validate early
        PlateauTeacher(self.teacher_tolerance)


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    use_wandb: bool = True,
    progress_bar: bool = True,
) -> Path:
    """Train a policy and write its artifact to ``out``; returns ``out``."""
    out = Path(out)
    checkpoints = out / CHECKPOINTS
    config = _load_or_save_config(config, checkpoints, resume)

    run = start_run(
        project=config.wandb_project or "freeze-agent",
        config=asdict(config),
        enabled=use_wandb and config.wandb_project is not None,
        name=out.name,
        resume_id=config.wandb_run_id,
    )
    if run is not None and config.wandb_run_id != run.id:
        config.wandb_run_id = run.id
        _write_config(config, checkpoints)

    venv = make_vec_env(config)
    last = latest_checkpoint(checkpoints) if resume else None
    # The saved config's PPO settings win over the checkpoint's, so a resumed run can be given
    # more environments (and a rollout to match) by editing train_config.json.
    ppo_settings = {
        "n_steps": config.n_steps,
        "batch_size": config.batch_size,
        "n_epochs": config.n_epochs,
        "learning_rate": config.learning_rate,
        "gamma": config.gamma,
        "gae_lambda": config.gae_lambda,
        "ent_coef": config.ent_coef,
    }
    if last is not None:
        # the class by reference, not by the pickled module path (which moves between versions)
        custom = {"policy_class": UnitAttentionPolicy}
        model = MaskablePPO.load(
            last, env=venv, device="cpu", custom_objects=custom, **ppo_settings
        )
        print(f"resuming from {last} at {model.num_timesteps} timesteps")
    else:
        model = MaskablePPO(
            UnitAttentionPolicy,
            venv,
            **ppo_settings,
            policy_kwargs=config.policy_kwargs,
            seed=config.seed,
            device="cpu",
        )
    if run is not None:
        attach_to(model, run)

    validation = ValidationCallback(
        lambda: make_env(config, config.val_tasks, [0]),
        config.eval_every,
        callback_on_new_best=SaveBestPolicy(
            out, lambda result: _card_metadata(config, model, result)
        ),
        best=recorded_best(out) if last is not None else None,
    )
    validation.init_callback(model)  # it may evaluate before learn() (kick-start) and after
    episodes = checkpoints / EPISODES_FILE
    callbacks: list[BaseCallback] = [
        EpisodeRecorder(episodes, resumed_at=model.num_timesteps if last is not None else None),
        CheckpointCallback(
            save_freq=max(1, config.checkpoint_every // config.n_envs),
            save_path=str(checkpoints),
            name_prefix="ppo",
        ),
        validation,
    ]
    if run is not None:
        callbacks.append(EpisodeLogger(run))
    try:
        if last is None and config.imitation_rounds:
            kickstart(model, venv, config, checkpoints)
            validation.evaluate_at_start = True  # the imitating policy may be the best
        remaining = config.timesteps - model.num_timesteps
        if remaining > 0:
            model.learn(
                total_timesteps=remaining,
                callback=CallbackList(callbacks),
                reset_num_timesteps=last is None,
                progress_bar=progress_bar,
            )
        model.save(checkpoints / f"ppo_{model.num_timesteps}_steps.zip")
        if validation.evaluated_at != model.num_timesteps:  # the final policy may be the best
            validation.evaluate_now()
        record_training_run(out, read_episodes(episodes), model.num_timesteps)
    finally:
        venv.close()
        validation.close()
        if run is not None:
            run.finish()
    return out


def _card_metadata(config: TrainConfig, model: MaskablePPO, result: Evaluation) -> dict[str, Any]:
    return {
        "training_tasks": [t.name for t in resolve_tasks(config.tasks)],
        "timesteps": model.num_timesteps,
        "seed": config.seed,
        "train_config": asdict(config),
        "validation": {"timesteps": model.num_timesteps, **result.to_dict()},
    }


def record_training_run(out: Path, episodes: list[dict[str, Any]], timesteps: int) -> None:
    """Write the run's learning curve and wall time into the policy card (``training_run``),
    with the kick-start's rounds when there was one."""
    run = {
        "timesteps": timesteps,
        "episodes": len(episodes),
        "wall_seconds": training_wall_seconds(episodes),
        "learning_curve": learning_curve(episodes),
    }
    kickstarted = out / CHECKPOINTS / KICKSTART_FILE
    if kickstarted.is_file():
        run["kickstart"] = json.loads(kickstarted.read_text())
    update_card(out, training_run=run)


def kickstart(model: MaskablePPO, venv: VecEnv, config: TrainConfig, checkpoints: Path) -> None:
    """Imitate the plateau teacher for ``config.imitation_rounds`` rounds (DAgger after the
    first), then save the result as the run's step-0 checkpoint so a resume starts from it."""
    teacher = PlateauTeacher(config.teacher_tolerance)
    demonstrations = Demonstrations()
    rounds = []
    for round_index in range(config.imitation_rounds):
        started = time.monotonic()
        act = None if round_index == 0 else LearnedPolicy(model.policy, name="agent")
        played = collect(venv, teacher, config.imitation_episodes, gamma=config.gamma, act=act)
        demonstrations.extend(played)
        fit = clone(model, demonstrations, epochs=config.imitation_epochs, seed=config.seed)
        rounds.append(
            {
                "actor": "teacher" if act is None else "agent",
                "means": {key: Evaluation(played.episodes).mean(key) for key in CURVE_FIELDS},
                "fit": fit,
                "episodes": [
                    {key: e[key] for key in ("task", "seed", *CURVE_FIELDS)}
                    for e in played.episodes
                ],
                "seconds": time.monotonic() - started,
            }
        )
        summary = {key: rounds[-1][key] for key in ("actor", "means", "fit")}
        print(f"kick-start round {round_index + 1}: {json.dumps(summary)}")
    (checkpoints / KICKSTART_FILE).write_text(
        json.dumps({"teacher_tolerance": config.teacher_tolerance, "rounds": rounds}, indent=2)
    )
    model.save(checkpoints / "ppo_0_steps.zip")


# ---------------------------------------------------------------------- environments


def make_vec_env(config: TrainConfig) -> VecEnv:
    """``n_envs`` environments, each in its own process when there are several. Tasks are dealt
    round-robin so that each process loads only its share of datasets; with fewer tasks than
    processes, every process draws from all of them."""
    tasks = [str(t.path) for t in resolve_tasks(config.tasks)]
    shares = (
        [tasks[i :: config.n_envs] for i in range(config.n_envs)]
        if len(tasks) >= config.n_envs
        else [tasks] * config.n_envs
    )
    threads = max(1, (os.cpu_count() or 1) // config.n_envs)
    factories = [_env_factory(config, share, threads) for share in shares]
    if config.n_envs == 1:
        return DummyVecEnv(factories)
    return SubprocVecEnv(factories, start_method="spawn")


def make_env(config: TrainConfig, tasks: list[str], seeds: list[int]) -> FreezeTrainingEnv:
    return FreezeTrainingEnv(
        tasks,
        max_units=config.max_units,
        seeds=seeds,
        reward=RewardConfig(**config.reward),
        epochs=config.epochs,
        decisions=config.decisions,
        reference_model=config.reference_model,
    )


def _env_factory(config: TrainConfig, tasks: list[str], threads: int) -> Callable[[], gym.Env]:
    # MaskablePPO seeds each environment (seed + rank) before its first reset.
    def make() -> gym.Env:
        # SubprocVecEnv starts its workers as daemons, which may not start processes; the
        # environment's reference-model worker is one, and it exits with its parent anyway.
        multiprocessing.current_process().daemon = False
        torch.set_num_threads(threads)
        return Monitor(make_env(config, tasks, config.training_seeds))

    return make


# ---------------------------------------------------------------------- checkpoints


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the most timesteps in ``directory`` (``ppo_<N>_steps.zip``)."""
    found = []
    for path in directory.glob("ppo_*_steps.zip"):
        match = re.fullmatch(r"ppo_(\d+)_steps\.zip", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _load_or_save_config(config: TrainConfig, checkpoints: Path, resume: bool) -> TrainConfig:
    saved = checkpoints / CONFIG_FILE
    if resume:
        if not saved.is_file():
            raise FileNotFoundError(
                f"--resume: no run to resume in {checkpoints.parent} ({saved} is missing); "
                "start it without --resume"
            )
        return TrainConfig(**json.loads(saved.read_text()))
    if latest_checkpoint(checkpoints) is not None:
        raise FileExistsError(
            f"{checkpoints} already holds checkpoints: pass --resume to continue that run, "
            "or choose another --out"
        )
    _write_config(config, checkpoints)
    return config


def _write_config(config: TrainConfig, checkpoints: Path) -> None:
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2))
