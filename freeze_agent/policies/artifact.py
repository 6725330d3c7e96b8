"""The policy artifact: a folder ``policies/NAME/`` that deploys without executing pickled code.

* ``policy.safetensors``: the ``UnitAttentionPolicy`` weights;
* ``policy.json``: the card, with everything needed to rebuild the network (observation spec
  version and feature lists, ``max_units``, the meaning of each action, the architecture) and
  what the caller records (training tasks, timesteps, seed, evaluation results), plus the
  versions of the packages it was trained with;
* ``model.zip``: MaskablePPO's own save, only for resuming training (it holds pickles).

``LearnedPolicy.load`` reads the card and the safetensors file only, and refuses an artifact
whose observation spec differs from this version's: a column that changed meaning would be
read silently wrong.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from sb3_contrib import MaskablePPO

from freeze_agent.core.modes import Mode
from freeze_agent.policies.network import UnitAttentionPolicy
from freeze_agent.signals.observation import (
    GLOBAL_FEATURES,
    OBSERVATION_VERSION,
    UNIT_FEATURES,
)

WEIGHTS_FILE, CARD_FILE, MODEL_FILE = "policy.safetensors", "policy.json", "model.zip"
ACTION_MEANINGS = [mode.name for mode in Mode]
# Card fields that describe the weights: written by save_policy, never by update_card.
SPEC_FIELDS = (
    "observation_version",
    "unit_features",
    "global_features",
    "max_units",
    "action_meanings",
    "architecture",
    "versions",
)
_PACKAGES = ("torch", "stable-baselines3", "sb3-contrib", "gymnasium", "safetensors")


class PolicyArtifactError(ValueError):
    """A policy artifact that cannot be used with this freeze-agent: missing files, or an
    observation spec other than the current one."""


def save_policy(model: MaskablePPO, directory: str | Path, metadata: dict[str, Any]) -> Path:
    """Write the artifact of ``model`` (a MaskablePPO with a ``UnitAttentionPolicy``) to
    ``directory`` and return the folder.

    ``metadata`` (JSON-serializable: training tasks, timesteps, seed, evaluation...) goes into
    the card next to the spec fields, which it may not override.
    """
    policy = model.policy
    if not isinstance(policy, UnitAttentionPolicy):
        raise TypeError(
            "save_policy needs a MaskablePPO with a UnitAttentionPolicy, got "
            f"{type(policy).__name__}"
        )
    clashes = sorted(set(metadata) & {*SPEC_FIELDS, "name"})
    if clashes:
        raise ValueError(f"metadata may not set {', '.join(clashes)}: save_policy writes them")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    card = {
        "name": directory.resolve().name,
        **metadata,
        "observation_version": OBSERVATION_VERSION,
        "unit_features": list(UNIT_FEATURES),
        "global_features": list(GLOBAL_FEATURES),
        "max_units": policy.max_units,
        "action_meanings": ACTION_MEANINGS,
        "architecture": dict(policy.architecture),
        "versions": _versions(),
    }
    state = {key: value.detach().cpu().contiguous() for key, value in policy.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    model.save(directory / MODEL_FILE)
    _write_card(directory, card)  # last: a card means the weights are complete
    return directory


def load_card(directory: str | Path) -> dict[str, Any]:
    """The card (``policy.json``) of the artifact in ``directory``."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise PolicyArtifactError(
            f"{path} not found: {directory} is not a policy artifact; save one with "
            "freeze_agent.policies.artifact.save_policy"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PolicyArtifactError(f"{path} is not valid JSON ({error})") from error


def update_card(directory: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the card and return it: a dict merges into an existing dict (so
    ``evaluation={"val": ...}`` keeps earlier evaluation results), anything else replaces."""
    forbidden = sorted(set(fields) & set(SPEC_FIELDS))
    if forbidden:
        raise ValueError(
            f"{', '.join(forbidden)} describe the weights and cannot be updated; save the policy "
            "again instead"
        )
    card = _merge(load_card(directory), fields)
    _write_card(Path(directory), card)
    return card


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _write_card(directory: Path, card: dict[str, Any]) -> None:
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in (*_PACKAGES, "freeze-agent"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


def check_card(card: dict[str, Any], path: Path) -> None:
    """Refuse a card whose observation spec or actions differ from this version's."""
    trained_with = card.get("versions", {}).get("freeze-agent", "unknown")
    remedy = (
        "retrain the policy with this freeze-agent, or install the freeze-agent it was trained "
        f"with ({trained_with})"
    )
    recorded = card.get("observation_version")
    if recorded != OBSERVATION_VERSION:
        raise PolicyArtifactError(
            f"{path} records observation spec version {recorded!r}, this freeze-agent builds "
            f"version {OBSERVATION_VERSION!r}: the policy would misread its inputs; {remedy}"
        )
    for key, current in (("unit_features", UNIT_FEATURES), ("global_features", GLOBAL_FEATURES)):
        stored = card.get(key)
        if stored != list(current):
            raise PolicyArtifactError(
                f"{path}: {key} differ from this freeze-agent's although both are spec version "
                f"{OBSERVATION_VERSION!r} ({_difference(stored, current)}); {remedy}"
            )
    if card.get("action_meanings") != ACTION_MEANINGS:
        raise PolicyArtifactError(
            f"{path}: action_meanings {card.get('action_meanings')} differ from this "
            f"freeze-agent's {ACTION_MEANINGS}; {remedy}"
        )
    missing = [key for key in ("max_units", "architecture") if key not in card]
    if missing:
        raise PolicyArtifactError(f"{path} lacks {', '.join(missing)}; save the policy again")


def _difference(stored: Any, current: tuple[str, ...]) -> str:
    if not isinstance(stored, list):
        return f"recorded {stored!r}"
    removed = [name for name in stored if name not in current]
    added = [name for name in current if name not in stored]
    if removed or added:
        return f"recorded only: {removed}, current only: {added}"
    return "same columns in another order"
