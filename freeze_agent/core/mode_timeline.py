"""A run's mode timeline, drawn: one row per unit, one column per decision, one color per mode.

A timeline is a list of strings, one per decision, holding one mode letter per unit (``T``, ``L``,
``F``). The W&B episode log, the benchmark report and ``FreezeController.plot_timeline`` all draw
it with the functions here, so a timeline looks the same wherever it appears.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from freeze_agent.core.modes import Mode

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# One character per mode in a timeline, and how each mode is drawn.
MODE_CHARS: dict[str, Mode] = {mode.name[0]: mode for mode in Mode}  # T, L, F
MODE_COLORS: dict[Mode, str] = {
    Mode.TRAIN: "#2ca02c",  # green
    Mode.LOCAL: "#ffae1a",  # orange-yellow
    Mode.FROZEN: "#1f5fb4",  # blue
}


def timeline_matrix(unit_names: Sequence[str], timeline: Sequence[str]) -> np.ndarray:
    """The timeline as an int array (units x decisions) of ``Mode`` values.

    Raises ValueError on a decision string of the wrong length or an unknown mode character.
    """
    matrix = np.empty((len(unit_names), len(timeline)), dtype=np.int64)
    for d, modes in enumerate(timeline):
        if len(modes) != len(unit_names):
            raise ValueError(
                f"decision {d} has {len(modes)} modes for {len(unit_names)} units: {modes!r}"
            )
        for u, char in enumerate(modes):
            if char not in MODE_CHARS:
                raise ValueError(
                    f"decision {d}, unit {u}: {char!r} is not a mode character "
                    f"({', '.join(MODE_CHARS)})"
                )
            matrix[u, d] = MODE_CHARS[char]
    return matrix


def draw_modes(ax: Any, matrix: np.ndarray) -> None:
    """Draw a ``timeline_matrix`` on ``ax``: units down, decisions across, one color per mode."""
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([MODE_COLORS[m] for m in Mode])
    ax.imshow(
        matrix,
        cmap=cmap,
        vmin=-0.5,
        vmax=len(Mode) - 0.5,
        aspect="auto",
        interpolation="nearest",
        origin="upper",
    )


def plot_timeline(unit_names: Sequence[str], timeline: Sequence[str], title: str = "") -> Figure:
    """Draw an episode's modes: units on the y axis (unit 0 at the top), decisions on the x
    axis, one color per mode, with a legend.

    Built on ``matplotlib.figure.Figure`` with an Agg canvas, without pyplot, so it neither
    touches the user's backend nor registers the figure anywhere (nothing to close).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    matrix = timeline_matrix(unit_names, timeline)
    n_units, n_decisions = matrix.shape
    height = min(12.0, max(2.5, 1.3 + 0.22 * n_units))
    fig = Figure(figsize=(8.0, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    modes = list(Mode)
    if n_decisions and n_units:
        draw_modes(ax, matrix)
    else:
        ax.text(0.5, 0.5, "no decisions", ha="center", va="center", transform=ax.transAxes)
    step = max(1, -(-n_units // 40))  # at most ~40 unit labels
    ax.set_yticks(range(0, n_units, step), [unit_names[i] for i in range(0, n_units, step)])
    ax.tick_params(axis="y", labelsize=7 if n_units > 16 else 9)
    ax.set_xlabel("decision")
    ax.set_ylabel("unit")
    if title:
        ax.set_title(title, fontsize=9)
    handles = [Patch(facecolor=MODE_COLORS[m], label=m.name) for m in modes]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` to an RGB uint8 array (height x width x 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
