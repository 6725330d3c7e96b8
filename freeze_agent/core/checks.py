"""Argument checks shared by the layers that take budgets, counts and seeds from a user."""

from __future__ import annotations

from typing import Any


def require_int(name: str, value: Any, minimum: int) -> None:
    """Refuse anything but an integer >= ``minimum`` (a bool is not a count), naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
