"""Figures with matplotlib's object-oriented API (no pyplot state): labelled heat-maps of expert load."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def heatmap_panels(
    panels: Sequence[tuple[str, np.ndarray, Sequence[str]]],
    xlabel: str,
    colorbar_label: str,
    title: str = "",
    vmax: float | None = None,
) -> Figure:
    """Side-by-side heat-maps sharing one colour scale, e.g. layer x expert load, one panel per task.

    Args:
        panels: (panel title, matrix (rows, columns) with NaN where a cell does not exist, row labels).
        xlabel: Label of the column axis (columns are numbered from 0).
        colorbar_label: What the colours measure.
        title: Figure title.
        vmax: Top of the colour scale; default the largest finite value.

    Returns:
        The figure (draw it with ``savefig`` or TensorBoard's ``add_figure``).
    """
    finite = [m[np.isfinite(m)] for _, m, _ in panels]
    top = vmax if vmax is not None else max((float(v.max()) for v in finite if v.size), default=1.0)
    rows = max(m.shape[0] for _, m, _ in panels)
    width = sum(max(2.0, 0.35 * m.shape[1] + 1.2) for _, m, _ in panels) + 1.5
    fig = Figure(figsize=(width, max(2.5, 0.22 * rows + 1.5)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (name, matrix, labels) in zip(axes, panels, strict=True):
        image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
        ax.set_facecolor("0.85")  # cells that do not exist (fewer experts in that layer)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=6 if len(labels) > 20 else 8)
    fig.colorbar(image, ax=list(axes), label=colorbar_label, shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
