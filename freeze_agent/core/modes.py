"""The three things a unit can do in an iteration, and which combinations make sense."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

from freeze_agent.core.units import Unit


class Mode(IntEnum):
    """What a unit does in a training iteration.

    TRAIN: ordinary back-propagation (forward + gradient to the input + gradient to the weights).
    LOCAL: the localized learning rule of LoCal+SGD, applied during the forward pass; no backward
    through the unit, its output is detached.
    FROZEN: no update at all; norm statistics and dropout are frozen too.
    """

    TRAIN = 0
    LOCAL = 1
    FROZEN = 2


_BY_LETTER = {mode.name[0]: mode for mode in Mode}


def parse_modes(modes: Sequence[Mode | int | str], n_units: int) -> list[Mode]:
    """Turn ints (0/1/2), names ("TRAIN", "local", ...), letters ("T", "L", "F", as a
    timeline prints them; so a timeline string such as ``"FFTTT"`` is a whole sequence) or
    ``Mode`` values into ``Mode``s."""
    if len(modes) != n_units:
        raise ValueError(f"got {len(modes)} modes for {n_units} units; pass one mode per unit")
    parsed = []
    for i, mode in enumerate(modes):
        try:
            parsed.append(_parse_one(mode))
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(
                f"unit {i}: {mode!r} is not a mode; use one of "
                f"{', '.join(m.name for m in Mode)} (or 0, 1, 2, or T, L, F)"
            ) from error
    return parsed


def _parse_one(mode: Mode | int | str) -> Mode:
    if not isinstance(mode, str):
        return Mode(int(mode))
    name = mode.upper()
    return _BY_LETTER[name] if len(name) == 1 else Mode[name]


def effective_modes(requested: Sequence[Mode | int | str], units: Sequence[Unit]) -> list[Mode]:
    """The modes that actually apply when ``requested`` is asked for.

    * The head is always TRAIN.
    * A LOCAL unit detaches its output, so a TRAIN unit upstream of it would receive no gradient:
      such a unit becomes FROZEN.
    * LOCAL on a unit the local rule cannot train (embeddings, attention, recurrent layers...)
      is an error rather than a silent change, since it says the caller misunderstood the unit.
    """
    modes = parse_modes(requested, len(units))
    for unit, mode in zip(units, modes, strict=True):
        if mode is Mode.LOCAL and not unit.supports_local:
            raise ValueError(
                f"unit {unit.index} ({unit.name}, kind {unit.kind.value}) cannot be LOCAL: the "
                "local rule trains only conv and linear weights; use TRAIN or FROZEN for it"
            )
    modes[-1] = Mode.TRAIN
    last_local = max((i for i, m in enumerate(modes) if m is Mode.LOCAL), default=-1)
    for i in range(last_local):
        if modes[i] is Mode.TRAIN:
            modes[i] = Mode.FROZEN
    return modes
