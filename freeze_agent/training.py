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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from freeze_agent.artifact import save_policy, update_card
from freeze_agent.env import FreezeTrainingEnv, resolve_tasks
from freeze_agent.episodes import Evaluation, evaluate, sb3_actor
from freeze_agent.imitation import Demonstrations, PlateauTeacher, agent_actor, clone, collect
from freeze_agent.learning_curve import (
    CURVE_FIELDS,
    EPISODES_FILE,
    EpisodeRecorder,
    learning_curve,
    read_episodes,
    training_wall_seconds,
)
from freeze_agent.policy_net import UnitAttentionPolicy
from freeze_agent.rewards import RewardConfig
from freeze_agent.wandb_logging import EpisodeLogger, attach_to, start_run

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "train_config.json"
KICKSTART_FILE = "kickstart.json"


@dataclass
class TrainConfig:
    """Everything that defines a policy-training run; saved next to its checkpoints so that
    ``--resume`` continues exactly the same run."""

    tasks: list[str] = field(default_factory=lambda: ["train"])
    val_tasks: list[str] = field(default_factory=lambda: ["val"])
    timesteps: int = 3000
    n_envs: int = 2
    seed: int = 0
    training_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_units: int = 32
    epochs: int | None = None  # override every task's budget (quick runs, tests)
    decisions: int | None = None
    reference_model: bool = True
    reward: dict[str, Any] = field(default_factory=dict)
    # PPO, sized for expensive steps: a rollout of n_steps * n_envs decisions per update
    n_steps: int = 64
    batch_size: int = 64
    n_epochs: int = 10
    learning_rate: float = 3e-4
    gamma: float = 0.995  # the final accuracy penalty must reach early decisions
    gae_lambda: float = 0.95
    ent_coef: float = 0.0  # the policy's initial prior, not entropy, drives exploration
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    # kick-start (freeze_agent.imitation): imitate the plateau teacher before PPO; round 1
    # plays the teacher, later rounds play the agent (DAgger); 0 rounds: PPO from scratch
    imitation_rounds: int = 0
    imitation_episodes: int = 1  # per environment and round
    imitation_epochs: int = 100
    teacher_tolerance: float = 0.05
    # bookkeeping, in environment steps (decisions)
    checkpoint_every: int = 256
    eval_every: int = 1024
    wandb_project: str | None = "freeze-agent"
    wandb_run_id: str | None = None

    def __post_init__(self) -> None:
        if self.timesteps < 1 or self.n_envs < 1:
            raise ValueError("timesteps and n_envs must be at least 1")
        if (self.n_steps * self.n_envs) % self.batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} must divide n_steps * n_envs = "
                f"{self.n_steps * self.n_envs}"
            )
        if self.imitation_rounds < 0 or self.imitation_episodes < 1:
            raise ValueError("imitation_rounds must be >= 0 and imitation_episodes >= 1")
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
        model = MaskablePPO.load(last, env=venv, device="cpu", **ppo_settings)
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

    validation = ValidationCallback(config, out, resume=last is not None)
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
            validation.evaluate_and_keep(model)
        record_training_run(out, read_episodes(episodes), model.num_timesteps)
    finally:
        venv.close()
        validation.close()
        if run is not None:
            run.finish()
    return out


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
        act = None if round_index == 0 else agent_actor(model)
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


# ---------------------------------------------------------------------- validation


class ValidationCallback(BaseCallback):
    """Every ``eval_every`` timesteps, play each validation task once (seed 0, deterministic
    actions) and write the policy artifact to ``out`` whenever the mean return improves.

    A resumed run starts from the best return recorded in ``out``; a new run ignores whatever
    an earlier run left there (its returns may come from another reward)."""

    def __init__(self, config: TrainConfig, out: Path, *, resume: bool = False) -> None:
        super().__init__()
        self.config, self.out = config, out
        self.best: float | None = _recorded_best(out) if resume else None
        self._last_eval = 0
        self.evaluated_at: int | None = None
        self.evaluate_at_start = False
        self._env: FreezeTrainingEnv | None = None

    def _on_training_start(self) -> None:
        self._last_eval = self.model.num_timesteps
        if self.evaluate_at_start:
            self.evaluate_and_keep(self.model)

    def _on_step(self) -> bool:
        if self.config.eval_every and (
            self.model.num_timesteps - self._last_eval >= self.config.eval_every
        ):
            self._last_eval = self.model.num_timesteps
            self.evaluate_and_keep(self.model)
        return True

    def evaluate_and_keep(self, model: MaskablePPO) -> None:
        if self._env is None:
            self._env = make_env(self.config, self.config.val_tasks, [0])
        result = evaluate(self._env, sb3_actor(model))
        self.evaluated_at = model.num_timesteps
        means = result.to_dict()["means"]
        for key, value in means.items():
            model.logger.record(f"eval/{key}", value)
        print(
            f"validation at {model.num_timesteps} timesteps: "
            + ", ".join(f"{k} {v:.3f}" for k, v in means.items())
        )
        if self.best is None or result.mean_return > self.best:
            self.best = result.mean_return
            save_policy(
                model,
                self.out,
                metadata={
                    "training_tasks": [t.name for t in resolve_tasks(self.config.tasks)],
                    "timesteps": model.num_timesteps,
                    "seed": self.config.seed,
                    "train_config": asdict(self.config),
                    "validation": {"timesteps": model.num_timesteps, **result.to_dict()},
                },
            )

    def close(self) -> None:
        if self._env is not None:
            self._env.close()


def _recorded_best(out: Path) -> float | None:
    card = out / "policy.json"
    if not card.is_file():
        return None
    validation = json.loads(card.read_text()).get("validation") or {}
    return validation.get("means", {}).get("return")
