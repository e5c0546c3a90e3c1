"""Figures of a sweep, drawn from its stored results alone (sweep.csv, manifest, summaries).

Every figure is written as PNG and SVG to `<out>/figures`, sized for print: large fonts, the
Okabe-Ito colour-blind-safe palette, markers and line styles that survive grey-scale, and
ε = ∞ labelled "∞ (no DP)". A figure whose data is absent is skipped with a logged reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402

from flower_app.config import RunConfig  # noqa: E402
from flower_app.results import format_eps  # noqa: E402
from sim.analysis.tidy import (  # noqa: E402
    HEADLINE,
    cell_table,
    curve,
    eps_order,
    final_rows,
    read_manifest,
    read_tidy,
    rounds_to_target,
    series_keys,
    series_tuple,
    summarize,
    targets_from_nonprivate,
)

log = logging.getLogger(__name__)

FIGURES = "figures"
FIGURE_NAMES = (
    "accuracy_vs_round",
    "final_accuracy_vs_eps",
    "rounds_to_target",
    "consensus_distance",
    "eps_spent_vs_round",
    "topologies",
    "accuracy_vs_bytes",
)
BYTES = "bytes_sent_cum_per_node"
TARGET_FRACTION = 0.9
# Okabe & Ito (2008); yellow last, it is faint on white paper.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
STYLE = {
    "font.size": 14,
    "axes.titlesize": 15,
    "axes.labelsize": 15,
    "xtick.labelsize": 13,
    "ytick.labelsize": 13,
    "legend.fontsize": 12,
    "lines.linewidth": 2.2,
    "lines.markersize": 7,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "fl-sweep",  # stable SVG ids, so regenerated figures diff cleanly
}


@dataclass(frozen=True)
class Figure:
    """A written figure: stem name, title, caption and its files."""

    name: str
    title: str
    caption: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class Skipped:
    """A figure not drawn, and why."""

    name: str
    reason: str


@dataclass
class SweepData:
    """What the figures and the report read: the tidy table, per-cell facts, series keys."""

    out: Path
    manifest: dict[str, Any]
    tidy: pd.DataFrame
    cells: pd.DataFrame
    by: list[str]

    @classmethod
    def load(cls, out: Path) -> SweepData:
        """Read `<out>/{manifest.json, sweep.csv, runs/*/summary.json}`."""
        manifest = read_manifest(out)
        by = series_keys(manifest)
        tidy = read_tidy(out)
        for key in by:
            if key not in tidy:
                tidy[key] = np.nan
        return cls(out, manifest, tidy, cell_table(out, manifest), by)

    @property
    def finals(self) -> pd.DataFrame:
        """Last round of every completed cell."""
        return final_rows(self.tidy)

    @cached_property
    def series(self) -> list[tuple[Any, ...]]:
        """Distinct curves (strategy and other swept keys), in grid order."""
        seen: dict[tuple[Any, ...], None] = {}
        for _, row in self.tidy[self.by].iterrows():
            seen.setdefault(series_tuple(row, self.by), None)
        return list(seen)

    def label(self, series: Sequence[Any]) -> str:
        """`gossip (topology=ring)`."""
        extra = [f"{k}={v}" for k, v in zip(self.by[1:], series[1:], strict=True) if v is not None]
        return f"{series[0]} ({', '.join(extra)})" if extra else str(series[0])

    def style(self, series: Sequence[Any]) -> dict[str, Any]:
        """Colour, marker and line style of a series, stable across figures."""
        i = self.series.index(tuple(series))
        return {
            "color": PALETTE[i % len(PALETTE)],
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)],
        }

    def eps_style(self, eps: float) -> dict[str, Any]:
        """Colour, marker and line style of an ε, stable across figures."""
        i = eps_order(self.tidy["eps"]).index(eps)
        return {
            "color": PALETTE[i % len(PALETTE)],
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)],
        }

    def on_graphs(self, df: pd.DataFrame) -> pd.DataFrame:
        """Rows of cells whose summary.json names a topology (gossip, not FedAvg)."""
        if "topology_name" not in self.cells:
            return df
        graph = self.cells.loc[self.cells["topology_name"].notna(), "cell"]
        return df[df["cell"].isin(graph)]

    def rows_of(self, df: pd.DataFrame, series: Sequence[Any]) -> pd.DataFrame:
        """Rows of `df` belonging to `series` (None matches a key the strategy lacks)."""
        mask = pd.Series(True, index=df.index)
        for key, value in zip(self.by, series, strict=True):
            mask &= df[key].isna() if value is None else df[key] == value
        return df[mask]

    def seed_note(self) -> str:
        """What the intervals are, and that there are none with a single seed."""
        counts = self.finals.groupby([*self.by, "eps"], dropna=False).size()
        if counts.empty or counts.max() < 2:
            return "One seed per cell, so no confidence interval is shown."
        if counts.min() < 2:
            return (
                "Bands and bars are 95% Student-t intervals over seeds where a cell has "
                f"at least two seeds ({counts.min()} to {counts.max()} seeds)."
            )
        return f"Mean over {counts.max()} seeds; bands and bars are 95% Student-t intervals."

    @cached_property
    def split(self) -> str:
        """What the runs' accuracy was scored on: `test`, `validation` (evaluate-on), or both."""
        column = self.cells.get("evaluate_on", pd.Series([], dtype=object)).dropna()
        splits = sorted(set(column)) or ["test"]
        return splits[0] if len(splits) == 1 else f"{' or '.join(splits)} (per cell)"

    def delta_text(self) -> str:
        """δ as a label fragment."""
        # A cell that does not set delta ran with the run config's default.
        column = self.cells.get("delta", pd.Series([None] * len(self.cells), dtype=float))
        deltas = sorted({float(d) for d in column.fillna(RunConfig().delta)})
        return ", ".join(f"{d:g}" for d in deltas) if deltas else f"{RunConfig().delta:g}"


def eps_label(eps: float) -> str:
    """ε for titles and legends, with ∞ spelled out as no DP."""
    return "∞ (no DP)" if math.isinf(eps) else format_eps(eps)


def save_figure(fig: Any, out: Path, name: str) -> tuple[Path, ...]:
    """Write `fig` as `<out>/figures/<name>.png` and `.svg` and close it; return both paths."""
    folder = out / FIGURES
    folder.mkdir(parents=True, exist_ok=True)
    png, svg = folder / f"{name}.png", folder / f"{name}.svg"
    fig.savefig(png, dpi=200, bbox_inches="tight")
    fig.savefig(svg, bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return png, svg


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


def _band(
    ax: Axes,
    df: pd.DataFrame,
    scale: float,
    x_column: str = "round",
    x_scale: float = 1.0,
    **style: Any,
) -> None:
    """The seed-mean curve of `df` against `x_column`, with its 95% band where there is one."""
    x, mean = df[x_column].to_numpy() * x_scale, df["mean"].to_numpy() * scale
    ax.plot(x, mean, markevery=max(1, len(x) // 10), **style)
    half = df["half"].to_numpy() * scale
    if np.isfinite(half).any():
        ax.fill_between(x, mean - half, mean + half, color=style["color"], alpha=0.18, lw=0)


def _round_axis(ax: Axes) -> None:
    ax.set_xlabel("communication round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def accuracy_vs_round(data: SweepData) -> Figure | Skipped:
    """1) Accuracy (test or validation) per round, one panel per ε, strategies overlaid."""
    curves = curve(data.tidy, [*data.by, "eps"], HEADLINE if HEADLINE in data.tidy else "accuracy")
    eps_values = eps_order(curves["eps"])
    fig, axes = panels(len(eps_values))
    for ax, eps in zip(axes, eps_values, strict=True):
        for series in data.series:
            rows = data.rows_of(curves[curves["eps"] == eps], series)
            if not rows.empty:
                _band(ax, rows, 100, label=data.label(series), **data.style(series))
        ax.set_title(f"ε = {eps_label(eps)}")
        _round_axis(ax)
    for ax in axes[:: min(len(axes), 3)]:
        ax.set_ylabel(f"{data.split} accuracy (%)")
    axes[0].legend(loc="best")
    fig.tight_layout()
    return Figure(
        "accuracy_vs_round",
        f"{data.split.capitalize()} accuracy per round",
        f"Central {data.split} accuracy after each round, one panel per privacy budget ε "
        f"(per node, δ = {data.delta_text()}). {data.seed_note()}",
        save_figure(fig, data.out, "accuracy_vs_round"),
    )


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


def final_accuracy_vs_eps(data: SweepData) -> Figure | Skipped:
    """2) Final accuracy against ε, one line per strategy, with error bars."""
    summary = summarize(data.finals, [*data.by, "eps"])
    if summary["eps"].nunique() < 2:
        return Skipped("final_accuracy_vs_eps", "needs at least two values of ε")
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    eps_lines(ax, data, summary, "mean", "half", 100)
    ax.set_ylabel(f"final {data.split} accuracy (%)")
    ax.legend(loc="best")
    fig.tight_layout()
    return Figure(
        "final_accuracy_vs_eps",
        "Final accuracy against the privacy budget",
        f"{data.split.capitalize()} accuracy after the last round against ε (log scale; "
        f"∞ = no DP, placed right of the axis break). {data.seed_note()}",
        save_figure(fig, data.out, "final_accuracy_vs_eps"),
    )


@dataclass(frozen=True)
class Targets:
    """Target accuracy per series, and how it was chosen."""

    values: dict[tuple[Any, ...], float]
    how: str


def choose_targets(
    data: SweepData, target: float | None = None, fraction: float = TARGET_FRACTION
) -> Targets:
    """An absolute target for all series, else `fraction` of each series' ε=∞ final accuracy."""
    if target is not None:
        return Targets({s: target for s in data.series}, f"a fixed {target:.1%} for all")
    summary = summarize(data.finals, [*data.by, "eps"])
    values = targets_from_nonprivate(summary, data.by, fraction) if len(summary) else {}
    parts = [f"{data.label(s)} {v:.1%}" for s, v in values.items()]
    missing = [data.label(s) for s in data.series if s not in values]
    how = f"{fraction:.0%} of the series' non-private (ε = ∞) final accuracy"
    how += f": {', '.join(parts)}" if parts else ""
    if missing:
        how += f" (no ε = ∞ cell, so not shown: {', '.join(missing)})"
    return Targets(values, how)


def rounds_table(data: SweepData, targets: Targets) -> pd.DataFrame:
    """Rounds for the seed-mean accuracy to reach each series' target, per ε."""
    curves = curve(data.tidy, [*data.by, "eps"], HEADLINE if HEADLINE in data.tidy else "accuracy")
    return rounds_to_target(curves, data.by, targets.values)


def rounds_to_target_vs_eps(data: SweepData, targets: Targets) -> Figure | Skipped:
    """3) Rounds to reach the target accuracy against ε; not reached is marked, not dropped."""
    name = "rounds_to_target"
    if not targets.values:
        return Skipped(name, "no ε = ∞ cell to set the default target; pass --target-accuracy")
    table = rounds_table(data, targets)
    if table["eps"].nunique() < 1 or table.empty:
        return Skipped(name, "no cell of a series with a target")
    ceiling = int(table["max_round"].max()) + 1
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    eps_lines(ax, data, table, "rounds", None, 1, missing_at=ceiling)
    ax.axhline(ceiling - 0.5, color="grey", linestyle=":", lw=1)
    ax.set_ylim(0, ceiling + 0.6)
    ticks = [int(t) for t in MaxNLocator(integer=True).tick_values(0, ceiling - 1)]
    ticks = [t for t in ticks if 0 <= t < ceiling]
    ax.set_yticks([*ticks, ceiling])
    ax.set_yticklabels([*map(str, ticks), "not\nreached"])
    ax.set_ylabel("rounds to reach target accuracy")
    ax.legend(loc="best")
    fig.tight_layout()
    return Figure(
        name,
        "Rounds to reach the target accuracy",
        f"Rounds until the seed-mean {data.split} accuracy first reaches the target, "
        f"{targets.how}. "
        f"× at “not reached”: the target was not reached within {ceiling - 1} rounds.",
        save_figure(fig, data.out, name),
    )


def _has(data: SweepData, column: str) -> bool:
    return column in data.tidy and data.tidy[column].notna().any()


def _metric_by_eps(
    data: SweepData, tidy: pd.DataFrame, column: str, ylabel: str
) -> tuple[Any, list[Axes]] | None:
    """Panels per series, one line per ε, for a per-round metric; None if nothing to draw."""
    curves = curve(tidy, [*data.by, "eps"], column)
    if curves.empty:
        return None
    series = [s for s in data.series if not data.rows_of(curves, s).empty]
    eps_values = eps_order(curves["eps"])
    fig, axes = panels(len(series))
    for ax, s in zip(axes, series, strict=True):
        rows = data.rows_of(curves, s)
        for eps in eps_values:
            r = rows[rows["eps"] == eps]
            if not r.empty:
                _band(ax, r, 1, label=f"ε = {eps_label(eps)}", **data.eps_style(eps))
        ax.set_title(data.label(s))
        _round_axis(ax)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(loc="best")
    return fig, axes


def consensus_vs_round(data: SweepData) -> Figure | Skipped:
    """4a) Gossip consensus distance per round, one line per ε."""
    name, column = "consensus_distance", "consensus_distance"
    if not _has(data, column):
        return Skipped(name, f"no {column} column with values in sweep.csv")
    tidy = data.on_graphs(data.tidy)
    drawn = _metric_by_eps(data, tidy, column, "consensus distance (parameter space)")
    if drawn is None:
        return Skipped(name, f"no cell with a topology (gossip) has {column} values")
    fig, axes = drawn
    values = tidy[column].dropna()
    if (values > 0).all() and values.max() / values.min() > 50:
        for ax in axes:
            ax.set_yscale("log")
    fig.tight_layout()
    return Figure(
        name,
        "Consensus distance of gossip",
        "How far the nodes' models are from their average after each round (as the gossip "
        f"strategy logs it), one line per ε. {data.seed_note()}",
        save_figure(fig, data.out, name),
    )


def eps_spent_vs_round(data: SweepData) -> Figure | Skipped:
    """4b) Cumulative ε spent per round for the private cells, target ε dashed."""
    name, column = "eps_spent_vs_round", "eps_spent"
    if not _has(data, column):
        return Skipped(name, f"no {column} column with values in sweep.csv")
    drawn = _metric_by_eps(
        data,
        data.tidy[np.isfinite(data.tidy["eps"])],
        column,
        f"ε spent, cumulative (δ = {data.delta_text()})",
    )
    if drawn is None:
        return Skipped(name, "no private (finite ε) cell")
    fig, axes = drawn
    for ax in axes:
        for eps in {e for e in data.tidy["eps"] if math.isfinite(e)}:
            ax.axhline(eps, color=data.eps_style(eps)["color"], linestyle="--", lw=1, alpha=0.7)
    fig.tight_layout()
    return Figure(
        name,
        "Privacy spent per round",
        "Largest cumulative ε over the nodes after each round, as their accountant reports "
        "it; dashed lines are the targets the noise was calibrated to reach by the last round.",
        save_figure(fig, data.out, name),
    )


def bar_gaps(
    finals: pd.DataFrame, cells: pd.DataFrame, bar_keys: Sequence[str]
) -> dict[tuple[Any, ...], float]:
    """Spectral gap per bar (values of `bar_keys`), from the cells' summary.json.

    The gap belongs to the (topology, gossip mode) pair a cell ran, so it is looked up per
    bar, never averaged over modes that share a graph.
    """
    gap_col = "topology_spectral_gap"
    if gap_col not in cells:
        return {}
    with_gap = finals.merge(cells[["cell", gap_col]], on="cell", how="left")
    gaps: dict[tuple[Any, ...], float] = {}
    for key, group in with_gap.dropna(subset=[gap_col]).groupby(list(bar_keys), dropna=False):
        gaps[key if isinstance(key, tuple) else (key,)] = float(group[gap_col].mean())
    return gaps


def topologies(data: SweepData) -> Figure | Skipped:
    """5) Gossip final accuracy per topology at each ε, labelled with the spectral gap."""
    name = "topologies"
    if "topology" not in data.by:
        return Skipped(name, "topology is not swept")
    finals, cells = data.finals, data.cells[data.cells["status"] == "completed"]
    with_topo = data.on_graphs(finals[finals["topology"].notna()])
    if with_topo["topology"].nunique() < 2:
        return Skipped(name, "fewer than two topologies have completed cells")
    bar_keys = ["topology", *[k for k in data.by if k not in ("strategy", "topology")]]
    if with_topo["strategy"].nunique() > 1:
        bar_keys.insert(0, "strategy")
    summary = summarize(with_topo, [*bar_keys, "eps"])
    gaps = bar_gaps(with_topo, cells, bar_keys)
    eps_values = eps_order(summary["eps"])
    fig, axes = panels(len(eps_values), width=6.0)
    for ax, eps in zip(axes, eps_values, strict=True):
        rows = summary[summary["eps"] == eps].reset_index(drop=True)
        x = np.arange(len(rows))
        means, halves = rows["mean"] * 100, np.nan_to_num(rows["half"]) * 100
        ax.bar(x, means, yerr=halves, width=0.6, capsize=5, color=PALETTE[2], edgecolor="black")
        labels = []
        for _, r in rows.iterrows():
            label = "\n".join(str(r[k]) for k in bar_keys if pd.notna(r[k]))
            gap = gaps.get(tuple(r[k] for k in bar_keys))
            if gap is not None:
                label += f"\ngap {gap:.3g}"
            labels.append(label)
        ax.set_xticks(x)
        ax.set_xticklabels(labels)
        others = finals[~finals["cell"].isin(with_topo["cell"]) & (finals["eps"] == eps)]
        for i, (strategy, group) in enumerate(others.groupby("strategy")):
            ax.axhline(
                group[HEADLINE if HEADLINE in group else "accuracy"].mean() * 100,
                color=PALETTE[(i + 3) % len(PALETTE)],
                linestyle=LINESTYLES[(i + 1) % len(LINESTYLES)],
                label=str(strategy),
            )
        ax.set_title(f"ε = {eps_label(eps)}")
        ax.set_xlabel("topology")
        ax.grid(axis="x", visible=False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    axes[0].set_ylabel(f"final {data.split} accuracy (%)")
    fig.tight_layout()
    gap_note = (
        "Tick labels give each topology's spectral gap from summary.json (larger: faster "
        "mixing); horizontal lines are strategies without a topology at the same ε."
        if len(gaps)
        else "summary.json reports no spectral gap, so bars are not labelled with one."
    )
    return Figure(
        name,
        "Gossip across topologies",
        f"Final {data.split} accuracy of the cells with a topology, per ε. {gap_note} "
        f"{data.seed_note()}",
        save_figure(fig, data.out, name),
    )


def accuracy_vs_bytes(data: SweepData) -> Figure | Skipped:
    """Accuracy against the bytes each node has sent so far, one panel per ε."""
    if not _has(data, BYTES):
        return Skipped("accuracy_vs_bytes", f"no {BYTES} column (results from before it)")
    metric = HEADLINE if HEADLINE in data.tidy else "accuracy"
    keys = [*data.by, "eps"]
    acc, sent = curve(data.tidy, keys, metric), curve(data.tidy, keys, BYTES)
    merged = acc.merge(sent[[*keys, "round", "mean"]], on=[*keys, "round"], suffixes=("", "_x"))
    eps_values = eps_order(merged["eps"])
    fig, axes = panels(len(eps_values))
    for ax, eps in zip(axes, eps_values, strict=True):
        for series in data.series:
            rows = data.rows_of(merged[merged["eps"] == eps], series).sort_values("round")
            if rows.empty:
                continue
            style = data.style(series)
            _band(ax, rows, 100, "mean_x", 1e-6, label=data.label(series), **style)
        ax.set_title(f"ε = {eps_label(eps)}")
        ax.set_xlabel("MB sent per node, cumulative")
    for ax in axes[:: min(len(axes), 3)]:
        ax.set_ylabel("accuracy of what a node holds (%)")
    axes[0].legend(loc="best")
    fig.tight_layout()
    return Figure(
        "accuracy_vs_bytes",
        "Accuracy vs communication",
        "The accuracy of the model each node holds (FedAvg: the global model; gossip: the "
        "mean over nodes of each node's own model) against the model bytes a node has sent "
        "so far (FedAvg: its uploads; gossip: the models it sent to neighbours; downloads "
        f"are not counted), one panel per ε (per node, δ = {data.delta_text()}). "
        f"{data.seed_note()}",
        save_figure(fig, data.out, "accuracy_vs_bytes"),
    )


def plot_all(
    out: Path, *, target: float | None = None, fraction: float = TARGET_FRACTION
) -> tuple[list[Figure], list[Skipped]]:
    """Draw every figure the stored results support; log why the others are skipped."""
    data = SweepData.load(out)
    results: list[Figure | Skipped] = []
    if data.tidy.empty:
        results = [Skipped(n, "no completed cell in sweep.csv") for n in FIGURE_NAMES]
    else:
        targets = choose_targets(data, target, fraction)
        with plt.rc_context(STYLE):
            results.append(accuracy_vs_round(data))
            results.append(final_accuracy_vs_eps(data))
            results.append(rounds_to_target_vs_eps(data, targets))
            results.append(consensus_vs_round(data))
            results.append(eps_spent_vs_round(data))
            results.append(topologies(data))
            results.append(accuracy_vs_bytes(data))
    skipped = [r for r in results if isinstance(r, Skipped)]
    for s in skipped:
        log.info("figure %s skipped: %s", s.name, s.reason)
    return [r for r in results if isinstance(r, Figure)], skipped
