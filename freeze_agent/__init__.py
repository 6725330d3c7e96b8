"""freeze-agent: decide, layer by layer and while training runs, which layers of a network keep
training, which learn by a cheap local rule and which freeze."""

import gymnasium

from freeze_agent.controller import FreezeController
from freeze_agent.core.modes import Mode, effective_modes
from freeze_agent.core.units import Unit, UnitKind, partition
from freeze_agent.policies.base import Policy
from freeze_agent.policies.registry import make_policy
from freeze_agent.policies.schedules import LinearPrefix, NoFreeze
from freeze_agent.signals.observation import OBSERVATION_VERSION
from freeze_agent.tasks.spec import Task, TaskSpecError, list_tasks, load_task
from freeze_agent.tasks.trainer import RunResult, Trainer

__version__ = "0.1.0"

if "freeze_agent/FreezeTraining-v0" not in gymnasium.registry:
    gymnasium.register(
        id="freeze_agent/FreezeTraining-v0", entry_point="freeze_agent.rl.env:FreezeTrainingEnv"
    )

__all__ = [
    "OBSERVATION_VERSION",
    "FreezeController",
    "LinearPrefix",
    "Mode",
    "NoFreeze",
    "Policy",
    "RunResult",
    "Task",
    "TaskSpecError",
    "Trainer",
    "Unit",
    "UnitKind",
    "__version__",
    "effective_modes",
    "list_tasks",
    "load_task",
    "make_policy",
    "partition",
]
