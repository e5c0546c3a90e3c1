"""Figures of curves over a run: accuracy per round and per byte sent, consensus, ε spent."""

from __future__ import annotations

import math
import textwrap
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from sim.analysis.drawing import Figure, Skipped, finish, panels
from sim.analysis.style import eps_label
from sim.analysis.sweep_data import SweepData
from sim.analysis.tidy import HEADLINE, curve, eps_order

BYTES = "bytes_sent_cum_per_node"


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


def accuracy_ylabel(data: SweepData) -> str:
    """`test accuracy of what a node holds (%)`: gossip has no global model to score."""
    return f"{data.split} accuracy (%)\nof the model a node holds"


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
        ax.set_ylabel(accuracy_ylabel(data))
    finish(fig, axes, [data.measure_note(), data.interval_note()])
    return Figure(
        "accuracy_vs_round",
        f"{data.split.capitalize()} accuracy per round",
        f"{data.split.capitalize()} accuracy of the model each node holds after each round, one "
        f"panel per privacy budget ε (per node, δ = {data.delta_text()}). "
        f"{data.measure_note()} {data.seed_note()}",
        figure=fig,
    )


def _has(data: SweepData, column: str) -> bool:
    return column in data.tidy and data.tidy[column].notna().any()


def _metric_by_eps(
    data: SweepData, tidy: pd.DataFrame, column: str, ylabel: str
) -> tuple[Any, list[Axes]] | None:
    """Panels per series, one line per ε, for a per-round metric; None if nothing to draw.

    A series whose values are all zero (FedAvg's consensus distance: one model) gets no panel.
    """
    curves = curve(tidy, [*data.by, "eps"], column)
    if curves.empty:
        return None
    series = [s for s in data.series if (data.rows_of(curves, s)["mean"] != 0).any()]
    if not series:
        return None
    eps_values = eps_order(curves["eps"])
    fig, axes = panels(len(series))
    for ax, s in zip(axes, series, strict=True):
        rows = data.rows_of(curves, s)
        for eps in eps_values:
            r = rows[rows["eps"] == eps]
            if not r.empty:
                _band(ax, r, 1, label=f"ε = {eps_label(eps)}", **data.eps_style(eps))
        ax.set_title(textwrap.fill(data.label(s), 34))  # long series names: two lines, no overlap
        _round_axis(ax)
    axes[0].set_ylabel(ylabel)
    return fig, axes


def consensus_vs_round(data: SweepData) -> Figure | Skipped:
    """4a) Gossip consensus distance per round, one line per ε."""
    name, column = "consensus_distance", "consensus_distance"
    if not _has(data, column):
        return Skipped(name, f"no {column} column with values in sweep.csv")
    tidy = data.on_graphs(data.tidy)
    drawn = _metric_by_eps(data, tidy, column, "consensus distance (parameter space)")
    if drawn is None:
        return Skipped(name, f"no cell with a topology (gossip) has non-zero {column} values")
    fig, axes = drawn
    values = tidy[column].dropna()
    if (values > 0).all() and values.max() / values.min() > 50:
        for ax in axes:
            ax.set_yscale("log")
    finish(fig, axes, [data.interval_note()])
    return Figure(
        name,
        "Consensus distance of gossip",
        "How far the nodes' models are from their average after each round (as the gossip "
        f"strategy logs it), one line per ε. {data.seed_note()}",
        figure=fig,
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
    note = "Dashed: the target ε the noise was calibrated to reach by the last round."
    finish(fig, axes, [note, data.interval_note()])
    return Figure(
        name,
        "Privacy spent per round",
        "Largest cumulative ε over the nodes after each round, as their accountant reports "
        "it; dashed lines are the targets the noise was calibrated to reach by the last round.",
        figure=fig,
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
        ax.set_ylabel(accuracy_ylabel(data))
    sent = (
        "Bytes: FedAvg counts a node's uploads, gossip the models it sent to neighbours; "
        "downloads are not counted."
    )
    finish(fig, axes, [data.measure_note(), sent, data.interval_note()])
    return Figure(
        "accuracy_vs_bytes",
        "Accuracy vs communication",
        "The accuracy of the model each node holds (FedAvg: the global model; gossip: the "
        "mean over nodes of each node's own model) against the model bytes a node has sent "
        "so far (FedAvg: its uploads; gossip: the models it sent to neighbours; downloads "
        f"are not counted), one panel per ε (per node, δ = {data.delta_text()}). "
        f"{data.seed_note()}",
        figure=fig,
    )
