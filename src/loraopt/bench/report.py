"""Small reporting helpers shared by the benchmarks: mean ± std curves on a log scale and markdown tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

__all__ = ["CurveBand", "plot_curve_bands", "markdown_table", "format_number"]


class CurveBand(NamedTuple):
    """One curve: ``x`` positions, the mean over repetitions and its standard deviation (same length)."""

    x: Sequence[float]
    mean: Sequence[float]
    std: Sequence[float]


def plot_curve_bands(
    curves: Mapping[str, CurveBand],
    path: Union[str, Path],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    log_y: bool = True,
    floor: Optional[float] = None,
    floor_label: Optional[str] = None,
    styles: Optional[Mapping[str, Dict[str, Any]]] = None,
    figsize=(10.0, 5.5),
) -> Path:
    """Plot each curve's mean with a shaded ±std band and save the figure to ``path`` (PNG by extension).

    On a log axis, values below ``floor`` (including zero or negative values, e.g. a difference at machine
    precision) are drawn at ``floor``; when ``floor_label`` is given and some value was clipped, a dotted line
    marks it.  Non-finite values (a diverged run) leave a gap.  ``styles`` maps a label to extra ``Axes.plot``
    keyword arguments.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: benchmarks run on machines without a display
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=figsize)
    clipped = False
    for label, band in curves.items():
        x = np.asarray(band.x, dtype=float)
        mean = np.asarray(band.mean, dtype=float)
        std = np.asarray(band.std, dtype=float)
        low, high = mean - std, mean + std
        if log_y and floor is not None:
            clipped = clipped or bool(np.any(np.isfinite(low) & (low < floor)))
            mean, low, high = (np.where(np.isfinite(v), np.maximum(v, floor), np.nan) for v in (mean, low, high))
        elif log_y:
            # Without a floor a non-positive value has no place on a log axis: leave a gap rather than lie.
            mean = np.where(mean > 0, mean, np.nan)
            low = np.where(low > 0, low, np.nan)
        (line,) = ax.plot(x, mean, label=label, **dict((styles or {}).get(label, {})))
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.1, linewidth=0)
    if log_y:
        ax.set_yscale("log")
    if floor is not None and floor_label and clipped:  # a line nothing reaches would only stretch the axis
        ax.axhline(floor, color="0.5", linestyle=":", linewidth=1, label=floor_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    # Outside the axes: with many curves any inside position hides some of them.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_number(value: Optional[float], digits: int = 3) -> str:
    """Compact scientific notation; ``nan``/``inf`` spelled out, ``None`` as an em dash."""
    if value is None:
        return "—"
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits - 1}e}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """A GitHub-flavoured markdown table.  ``align`` has one character per column: ``l``, ``r`` or ``c``
    (default: first column left, the others right)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} characters for {len(headers)} columns")
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"
