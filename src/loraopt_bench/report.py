"""Small reporting helpers shared by the benchmarks: mean ± std curves on a log scale, markdown tables, and
output files written atomically (a reader never sees half a file; a failed write leaves the old file in place)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

__all__ = [
    "CurveBand",
    "plot_curve_bands",
    "markdown_table",
    "format_number",
    "OutputPathError",
    "check_output_dir",
    "check_output_file",
    "write_atomic",
    "save_figure_atomic",
]


class OutputPathError(ValueError):
    """An output path that cannot be written: a file where a folder is needed (or the reverse), a read-only or
    missing location. A user error, reported in one line before any work is done."""


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, what: str, target: Path) -> None:
    """Create and remove a file in ``folder``: the only test that works for every kind of refusal (permissions,
    read-only mounts, ACLs, root on a read-only file system)."""
    try:
        handle, name = tempfile.mkstemp(prefix=".loraopt-write-test-", dir=folder)
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise OutputPathError(f"{what} {target}: cannot write in {folder} ({error.strerror or error}); choose a "
                              "writable location") from None


def check_output_dir(path: Union[str, Path], what: str = "output folder") -> Path:
    """Check, without creating anything, that ``path`` is or can become a writable folder; returns it.

    Raises OutputPathError naming the problem: ``path`` is a file, a parent is a file, or the first existing
    folder on the way is not writable.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file, not a folder; pass the path of a folder (it is created if "
                              "missing)")
    anchor = _nearest_existing(path)
    if not anchor.is_dir():
        raise OutputPathError(f"{what} {path}: {anchor} is a file, so no folder can be created under it")
    _probe_writable(anchor, what, path)
    return path


def check_output_file(path: Union[str, Path], what: str = "output file") -> Path:
    """Check, without creating anything, that the file ``path`` can be written (atomically, through its folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder; pass a file path such as {path / 'scores.json'}")
    if not path.name:
        raise OutputPathError(f"{what} {str(path)!r} has no file name")
    check_output_dir(path.parent, what=f"{what} {path}: folder")
    return path


def write_atomic(path: Union[str, Path], data: Union[str, bytes]) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``: readers see the
    old file or the new one, never a partial one. Creates the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_figure_atomic(fig: Any, path: Union[str, Path], **savefig_kwargs: Any) -> Path:
    """``fig.savefig`` through :func:`write_atomic` (the format comes from ``path``'s suffix, default PNG)."""
    import io

    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=(path.suffix.lstrip(".") or "png").lower(), **savefig_kwargs)
    return write_atomic(path, buffer.getvalue())


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
    save_figure_atomic(fig, path, dpi=120)
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
