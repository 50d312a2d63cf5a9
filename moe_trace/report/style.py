"""The report's look: colours readable with colour-vision deficiencies (Okabe-Ito, ``cividis``), one
matplotlib style applied per figure without touching the caller's settings, shared axes helpers, PNG output.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
DPI = 150
HEATMAP_BINS = 400  # step bins per heatmap row: finer than a printed page resolves, coarse enough to draw fast


def pyplot():
    import matplotlib.pyplot as plt

    return plt


def styled(plot):
    """Draw ``plot`` in the report's style without touching the caller's matplotlib settings."""

    @functools.wraps(plot)
    def draw(*args, **kwargs):
        import matplotlib

        pyplot()
        style = {"axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO), "axes.grid": True, "grid.alpha": 0.3,
                 "font.size": 9}
        with matplotlib.rc_context(style):
            fig = plot(*args, **kwargs)
            # Jupyter's inline backend switches interactive mode on at its first figure; leaving the context
            # would switch it off again and later figures would no longer show, so carry it out.
            interactive = matplotlib.is_interactive()
        matplotlib.interactive(interactive)
        return fig

    return draw


def mark_stable(ax, stable_from: int | None, label: bool = False) -> None:
    if stable_from is not None:
        ax.axvline(stable_from, color="black", linestyle="--", linewidth=1,
                   label="stable phase starts" if label else None)


def layer_grid(plt, n_layers: int, title: str):
    """A grid of small panels, one per layer, two columns, shared axes."""
    n_rows = (n_layers + 1) // 2
    fig, axes = plt.subplots(n_rows, 2, figsize=(8, 0.6 + 1.9 * n_rows), sharex=True, sharey=True,
                             squeeze=False)
    for ax in axes.flat[n_layers:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes.flat[:n_layers]


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG at the report resolution and release its memory."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path
