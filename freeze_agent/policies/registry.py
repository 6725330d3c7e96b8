"""``make_policy``: a policy from its command-line spec.

A spec is a trained policy's folder (``policies/default``, or just ``default`` for one shipped in
``policies/``) or a registered policy's name with optional arguments after a colon
(``linear-prefix:0.1``, ``teacher:tolerance=0.02``). Importing this module imports every method
family, so each has registered its name (``freeze_agent.policies.base``).
"""

from __future__ import annotations

from pathlib import Path

from freeze_agent.core.resources import POLICIES_DIR
from freeze_agent.policies import (
    autofreeze,
    egeria,
    freezeout,
    localsgd,
    oracle,
    random_prefix,
    schedules,
    smartfrz,
    teacher,
)
from freeze_agent.policies.artifact import CARD_FILE
from freeze_agent.policies.base import Policy, registered_policies
from freeze_agent.policies.learned import LearnedPolicy

# the modules whose classes register a name: one per method family
METHOD_FAMILIES = (
    schedules,
    freezeout,
    autofreeze,
    egeria,
    smartfrz,
    localsgd,
    random_prefix,
    oracle,
    teacher,
)


def shipped_policies() -> list[str]:
    """Names of the trained policies shipped in ``policies/``."""
    return sorted(p.parent.name for p in POLICIES_DIR.glob(f"*/{CARD_FILE}"))


def make_policy(spec: str) -> Policy:
    """The policy a spec names (see the module docstring)."""
    for folder in (Path(spec), POLICIES_DIR / spec):
        if (folder / CARD_FILE).is_file():
            return LearnedPolicy.load(folder)
    name, _, arguments = spec.partition(":")
    registry = registered_policies()
    if name not in registry:
        raise ValueError(
            f"unknown policy {spec!r}: not a policy folder (no {CARD_FILE} there) nor a "
            f"registered policy; choose a folder, one of the shipped policies "
            f"({', '.join(shipped_policies()) or 'none yet'}) or one of "
            f"{', '.join(registered_policies(aliases=False))} (`freeze-agent policies`)"
        )
    return registry[name].from_arguments(arguments)
