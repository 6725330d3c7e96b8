"""The interface every freeze policy implements, learned or hand-written, and the registry that
names them for ``--policy`` and ``make_policy``.

A policy maps an observation (``freeze_agent.signals.observation``) to one mode per real unit.
Hand-written policies register themselves by declaring a ``registry_name`` (as Gymnasium's
``register`` or stable-baselines3's ``policy_aliases`` do), and are built from a command-line
spec such as ``linear-prefix:0.1`` or ``egeria:window=30,tolerance=1e-4`` by ``from_arguments``,
which reads the constructor's own parameters: a policy class declares its parameters once, in
its signature.
"""

from __future__ import annotations

import copy
import inspect
import typing
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

from freeze_agent.core.modes import Mode

Observation = dict[str, np.ndarray]


class ReferenceRun(Protocol):
    """What a privileged policy may know of the episode: the same task and seed trained with
    every unit in TRAIN (``freeze_agent.rl.trajectories.ReferenceTrajectory`` is one)."""

    val_losses: Sequence[float]


class Policy(ABC):
    """Decides the mode of every unit from an observation.

    ``decide`` returns one mode per real unit (the observation's ``mask`` says how many); the
    controller turns the request into effective modes. ``reset`` is called before each run. A
    *privileged* policy (a teacher, an oracle) also reads the run's all-TRAIN reference at
    ``reset``; it cannot be deployed, only compared with.
    """

    name: str = "policy"
    registry_name: ClassVar[str | None] = None
    aliases: ClassVar[tuple[str, ...]] = ()  # other names that reach the same class
    privileged: ClassVar[bool] = False
    reads_signals: ClassVar[bool] = True
    """Whether ``decide`` reads the measured signals (gradient and weight dynamics, plasticity,
    the attention score). A policy that does not (a fixed schedule reads only progress) is
    deployed without them: ``FreezeController.from_pretrained`` then builds no signal machinery
    (no per-step gradient sums, probe forwards or reference worker), so it pays nothing for
    what it never reads."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("registry_name")
        if name is not None:
            for key in (name, *cls.__dict__.get("aliases", ())):
                if key in _REGISTRY and _REGISTRY[key] is not cls:
                    raise ValueError(f"two policies register the name {key!r}")
                _REGISTRY[key] = cls

    @abstractmethod
    def decide(self, observation: Observation) -> list[Mode]: ...

    def state_dict(self) -> dict[str, Any]:
        """What the policy learned of the current run, for a checkpoint: by convention the
        state a run builds up lives in underscore attributes that ``reset`` sets, so these are
        saved (copied); a policy whose state is not plain data overrides this pair."""
        return {k: copy.deepcopy(v) for k, v in vars(self).items() if k.startswith("_")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, copy.deepcopy(value))

    def learning_rate_scales(self) -> list[float] | None:
        """Per-unit multipliers of the learning rate that go with the last ``decide`` (None:
        all 1). The controller applies them (``FreezeController.set_learning_rate_scales``);
        only a policy whose rule is also a learning-rate schedule (FreezeOut) needs this."""
        return None

    def reset(self, reference: ReferenceRun | None = None) -> None:
        """Forget any state kept from a previous run.

        Args:
            reference: the run's all-TRAIN reference, given to privileged policies only.
        """
        if self.privileged and reference is None:
            raise ValueError(
                f"policy {self.name} is privileged: it decides from the all-TRAIN reference run "
                "of the same task and seed, which only the freeze environment has; play it "
                f"there (freeze-agent evaluate {self.registry_name or self.name})"
            )

    @classmethod
    def summary(cls) -> str:
        """The class docstring's first paragraph on one line: what ``freeze-agent policies``
        lists."""
        return " ".join((inspect.getdoc(cls) or "").split("\n\n", 1)[0].split())

    @classmethod
    def from_arguments(cls, arguments: str = "") -> Policy:
        """The policy for the argument part of a spec (after ``name:``): comma-separated values,
        positional (in the constructor's order) or ``key=value``, converted to the types the
        constructor declares."""
        return cls(**parse_arguments(cls, arguments))


_REGISTRY: dict[str, type[Policy]] = {}


def registered_policies(*, aliases: bool = True) -> dict[str, type[Policy]]:
    """Every registered policy class by name, aliases included unless ``aliases=False`` (import
    ``freeze_agent.policies.registry`` first so that every method family has registered)."""
    return {
        name: cls for name, cls in sorted(_REGISTRY.items()) if aliases or name == cls.registry_name
    }


def parse_arguments(cls: type[Policy], arguments: str) -> dict[str, Any]:
    """Keyword arguments for ``cls`` from ``"0.1"``, ``"window=30,tolerance=1e-4"`` or ``""``."""
    parameters = [
        p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    hints = typing.get_type_hints(cls.__init__)
    name = cls.registry_name or cls.__name__
    known = ", ".join(p.name for p in parameters) or "none"
    values: dict[str, Any] = {}
    for position, item in enumerate(a.strip() for a in arguments.split(",") if a.strip()):
        key, sep, text = item.partition("=")
        if sep:
            key = key.strip()
        elif position < len(parameters):
            key, text = parameters[position].name, item
        else:
            raise ValueError(f"policy {name} takes at most {len(parameters)} arguments ({known})")
        if key not in {p.name for p in parameters}:
            raise ValueError(f"policy {name} has no parameter {key!r}; its parameters: {known}")
        if key in values:
            raise ValueError(f"policy {name}: {key} is given twice")
        values[key] = _convert(name, key, text.strip(), hints.get(key, str))
    return values


def _convert(policy: str, key: str, text: str, kind: Any) -> Any:
    options = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
    target = options[0]
    try:
        if target is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return target(text)
    except (TypeError, ValueError):
        expected = getattr(target, "__name__", str(target))
        raise ValueError(f"policy {policy}: {key}={text!r} is not a {expected}") from None
