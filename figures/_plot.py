"""Figure creation shared by the figure modules (Agg canvas, no pyplot)."""

from __future__ import annotations

import numpy as np


def new_figure(figsize, **kwargs):
    """A constrained-layout `Figure` on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def class_colors(n: int):
    """``n`` distinct colours (tab10, then tab20)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def markdown_table(header, rows) -> str:
    """A markdown table from a header and rows of cells (str() of each)."""
    lines = ["| " + " | ".join(map(str, header)) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def degrees(theta) -> np.ndarray:
    return np.degrees(np.asarray(theta, np.float64))
