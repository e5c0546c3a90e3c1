"""What every figure is drawn with: its result, panels, the ε axis, notes, writing PNG and SVG."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from flower_app.results import format_eps  # noqa: E402
from sim.analysis.sweep_data import SweepData  # noqa: E402

FIGURES = "figures"


FORMATS = ("png", "svg")


@dataclass(frozen=True)
class Figure:
    """A drawn figure: stem name, title, caption, the matplotlib figure and the files written.

    Plot functions return it unsaved (`files` empty), so a notebook can show or restyle
    `figure`; `save` writes it (the CLI's job).
    """

    name: str
    title: str
    caption: str
    files: tuple[Path, ...] = ()
    figure: Any = field(default=None, repr=False, compare=False)

    def save(self, out: Path, formats: Sequence[str] = FORMATS, dpi: int = 200) -> Figure:
        """Write the figure under `<out>/figures` in `formats`; this figure with its files."""
        return replace(self, files=save_figure(self.figure, out, self.name, formats, dpi))


@dataclass(frozen=True)
class Skipped:
    """A figure not drawn, and why."""

    name: str
    reason: str


def save_figure(
    fig: Any, out: Path, name: str, formats: Sequence[str] = FORMATS, dpi: int = 200
) -> tuple[Path, ...]:
    """Write `fig` as `<out>/figures/<name>.<format>` and close it; return the paths written."""
    folder = out / FIGURES
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = folder / f"{name}.{fmt}"
        meta = {"Date": None} if fmt == "svg" else {}
        fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata=meta)
        paths.append(path)
    plt.close(fig)
    return tuple(paths)


def finish(fig: Any, axes: Sequence[Axes], notes: Sequence[str], legend: bool = True) -> None:
    """Lay out; one legend right of the panels (never over data); `notes` printed below.

    The notes (what is measured, seeds, interval) live inside the figure, so they survive
    being copied into slides without the report's caption.
    """
    fig.tight_layout()
    handles: dict[str, Any] = {}
    for ax in axes if legend else ():
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="upper left",
            bbox_to_anchor=(1.0, 0.97),
            bbox_transform=fig.transFigure,
        )
    width = max(40, int(fig.get_figwidth() * 11.5))
    text = "\n".join(textwrap.fill(n, width) for n in notes if n)
    if text:
        fig.text(0.005, -0.01, text, ha="left", va="top", fontsize=11, color="#333333")


def panels(n: int, width: float = 5.6, height: float = 4.4) -> tuple[Any, list[Axes]]:
    """A figure of `n` panels, at most three a row, sharing the y axis."""
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, sharey=True
    )
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _eps_positions(eps_values: Sequence[float]) -> dict[float, float]:
    """Positions on a log x axis; ∞ sits to the right of the largest finite ε."""
    finite = sorted(e for e in eps_values if math.isfinite(e))
    pos = {e: e for e in finite}
    if any(math.isinf(e) for e in eps_values):
        pos[math.inf] = finite[-1] * 3.0 if finite else 1.0
    return pos


def _eps_axis(ax: Axes, pos: dict[float, float], delta: str) -> None:
    ax.set_xscale("log")
    ax.set_xticks(list(pos.values()))
    ax.set_xticklabels(["∞\n(no DP)" if math.isinf(e) else format_eps(e) for e in pos])
    ax.xaxis.set_minor_locator(NullLocator())
    xs = list(pos.values())
    ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
    finite = [e for e in pos if math.isfinite(e)]
    if finite and math.inf in pos:  # broken axis: ∞ is not on the log scale
        ax.annotate(
            "//",
            xy=(math.sqrt(max(finite) * pos[math.inf]), 0),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="center",
            fontsize=15,
            fontweight="bold",
            bbox={"fc": "white", "ec": "none", "pad": 0.5},
            annotation_clip=False,
        )
    ax.set_xlabel(f"privacy budget ε per node (δ = {delta}; log scale, smaller = more private)")


def _offset(i: int, n: int) -> float:
    """Multiplicative x nudge so error bars of overlaid series do not hide each other."""
    return 1.045 ** (i - (n - 1) / 2)


def eps_lines(
    ax: Axes,
    data: SweepData,
    df: pd.DataFrame,
    y: str,
    yerr: str | None,
    scale: float,
    missing_at: float | None = None,
) -> None:
    """One line per series over the ε axis; the hop to ∞ is dotted (not on the scale).

    With `missing_at`, a NaN value is drawn as × at that height in the series' colour.
    """
    pos = _eps_positions(df["eps"].tolist())
    for i, series in enumerate(data.series):
        rows = data.rows_of(df, series).sort_values("eps")
        if rows.empty:
            continue
        style = data.style(series)
        x = np.array([pos[e] for e in rows["eps"]]) * _offset(i, len(data.series))
        mean = rows[y].to_numpy(dtype=float) * scale
        err = None if yerr is None else np.nan_to_num(rows[yerr].to_numpy(dtype=float)) * scale
        finite = np.isfinite(rows["eps"].to_numpy(dtype=float))
        for part, label in ((finite, data.label(series)), (~finite, None)):
            if part.any() or label:
                ax.errorbar(
                    x[part],
                    mean[part],
                    yerr=None if err is None else err[part],
                    capsize=4,
                    label=label,
                    **(style if label else style | {"linestyle": "none"}),
                )
        if finite.any() and (~finite).any():
            ends = [mean[finite][-1], mean[~finite][0]]
            ax.plot([x[finite][-1], x[~finite][0]], ends, color=style["color"], linestyle=":")
        if missing_at is not None and np.isnan(mean).any():
            ax.scatter(
                x[np.isnan(mean)],
                np.full(np.isnan(mean).sum(), missing_at),
                marker="X",
                s=140,
                color=style["color"],
                edgecolors="black",
                linewidths=0.8,
                zorder=5,
            )
    _eps_axis(ax, pos, data.delta_text())
