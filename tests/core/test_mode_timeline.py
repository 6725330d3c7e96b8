"""The mode timeline figure: layout, colors and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from freeze_agent.core.mode_timeline import MODE_COLORS, figure_to_array, plot_timeline
from freeze_agent.core.modes import Mode

UNITS = ["stem", "block0", "block1", "head"]


def test_plot_timeline_layout_and_colors():
    timeline = ["TTTT", "LTTT", "FLTT", "FFLT", "FFFT", "FFFT"]
    fig = plot_timeline(UNITS, timeline, title="t")
    image = figure_to_array(fig)
    width, height = fig.get_size_inches() * fig.dpi
    assert image.shape == (round(height), round(width), 3) and image.dtype == np.uint8
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == UNITS

    def color_at(decision: int, unit: int) -> np.ndarray:
        x, y = ax.transData.transform((decision, unit))
        return image[image.shape[0] - 1 - round(y), round(x)].astype(int)

    def rgb(mode: Mode) -> np.ndarray:
        hex_color = MODE_COLORS[mode].lstrip("#")
        return np.array([int(hex_color[i : i + 2], 16) for i in (0, 2, 4)])

    # unit 0 is at the top: its cell is drawn above unit 3's
    assert ax.transData.transform((0, 0))[1] > ax.transData.transform((0, 3))[1]
    for decision, unit, mode in [(0, 0, Mode.TRAIN), (1, 0, Mode.LOCAL), (5, 2, Mode.FROZEN)]:
        assert np.abs(color_at(decision, unit) - rgb(mode)).max() <= 2
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {m.name for m in Mode}


def test_plot_timeline_rejects_bad_input():
    with pytest.raises(ValueError, match="decision 1 has 3 modes"):
        plot_timeline(UNITS, ["TTTT", "TTT"])
    with pytest.raises(ValueError, match="not a mode character"):
        plot_timeline(UNITS, ["TTXT"])
    figure_to_array(plot_timeline(UNITS, []))  # no decisions: an empty plot
