"""Figures of where runs end, against ε: final accuracy, rounds to a target, topologies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sim.analysis.drawing import Figure, Skipped, eps_lines, finish, panels  # noqa: E402
from sim.analysis.names import TARGET_FRACTION  # noqa: E402
from sim.analysis.style import LINESTYLES, PALETTE, eps_label  # noqa: E402
from sim.analysis.sweep_data import SweepData  # noqa: E402
from sim.analysis.tidy import (  # noqa: E402
    HEADLINE,
    curve,
    eps_order,
    rounds_to_target,
    summarize,
    targets_from_nonprivate,
)


def final_accuracy_vs_eps(data: SweepData) -> Figure | Skipped:
    """2) Final accuracy against ε, one line per strategy, with error bars."""
    summary = summarize(data.finals, [*data.by, "eps"])
    if summary["eps"].nunique() < 2:
        return Skipped("final_accuracy_vs_eps", "needs at least two values of ε")
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    eps_lines(ax, data, summary, "mean", "half", 100)
    ax.set_ylabel(f"final {data.split} accuracy (%)")
    finish(fig, [ax], [data.measure_note(), data.interval_note()])
    return Figure(
        "final_accuracy_vs_eps",
        "Final accuracy against the privacy budget",
        f"{data.split.capitalize()} accuracy after the last round against ε (log scale; "
        f"∞ = no DP, placed right of the axis break). {data.measure_note()} "
        f"{data.seed_note()}",
        figure=fig,
    )


@dataclass(frozen=True)
class Targets:
    """Target accuracy per series, and how it was chosen."""

    values: dict[tuple[Any, ...], float]
    how: str


def choose_targets(
    data: SweepData, target: float | None = None, fraction: float = TARGET_FRACTION
) -> Targets:
    """One target for every series: `target`, else `fraction` of the best ε=∞ final accuracy.

    One common target, so "faster" compares strategies on the same accuracy: against its own
    plateau, a strategy that barely learns would "converge" at once.
    """
    if target is not None:
        return Targets({s: target for s in data.series}, f"a fixed {target:.1%} for all")
    summary = summarize(data.finals, [*data.by, "eps"])
    own = targets_from_nonprivate(summary, data.by, 1.0) if len(summary) else {}
    if not own:
        return Targets({}, f"{fraction:.0%} of the best non-private (ε = ∞) final accuracy")
    best = max(own, key=own.__getitem__)
    value = fraction * own[best]
    how = (
        f"{value:.1%} for every series: {fraction:.0%} of the best non-private (ε = ∞) final "
        f"accuracy ({data.label(best)}, {own[best]:.1%})"
    )
    return Targets({s: value for s in data.series}, how)


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
    ax.set_yticklabels([*map(str, ticks), "not reached"])  # one line: clear of the tick below
    ax.set_ylabel("rounds to reach the target")
    shown = sorted({float(v) for v in table["target"]})
    ax.set_title(f"target: {' / '.join(f'{v:.1%}' for v in shown)} {data.split} accuracy")
    seeds = data.seeds()
    over = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    notes = [
        f"Target: {targets.how}. {data.measure_note()}",
        f"Counted on the mean curve over {over} (no interval); × at “not reached”: "
        f"not reached within {ceiling - 1} rounds.",
    ]
    finish(fig, [ax], notes)
    return Figure(
        name,
        "Rounds to reach the target accuracy",
        f"Rounds until the seed-mean {data.split} accuracy first reaches the target, "
        f"{targets.how}. "
        f"× at “not reached”: the target was not reached within {ceiling - 1} rounds.",
        figure=fig,
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


def _bar_labels(rows: pd.DataFrame, bar_keys: Sequence[str], gaps: dict) -> list[str]:
    """One tick label per bar: its keys, one a line, and the spectral gap when known."""
    labels = []
    for _, r in rows.iterrows():
        label = "\n".join(str(r[k]) for k in bar_keys if pd.notna(r[k]))
        gap = gaps.get(tuple(r[k] for k in bar_keys))
        labels.append(label + (f"\ngap {gap:.3g}" if gap is not None else ""))
    return labels


def _reference_lines(ax: Any, others: pd.DataFrame) -> None:
    """A horizontal line per strategy without a topology (FedAvg), at its mean final accuracy."""
    for i, (strategy, group) in enumerate(others.groupby("strategy")):
        ax.axhline(
            group[HEADLINE if HEADLINE in group else "accuracy"].mean() * 100,
            color=PALETTE[(i + 3) % len(PALETTE)],
            linestyle=LINESTYLES[(i + 1) % len(LINESTYLES)],
            label=f"{strategy} (no topology)",
        )


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
        ax.set_xticks(x)
        ax.set_xticklabels(_bar_labels(rows, bar_keys, gaps))
        others = ~finals["cell"].isin(with_topo["cell"]) & (finals["eps"] == eps)
        _reference_lines(ax, finals[others])
        ax.set_title(f"ε = {eps_label(eps)}")
        ax.set_xlabel("topology")
        ax.grid(axis="x", visible=False)
    axes[0].set_ylabel(f"final {data.split} accuracy (%)")
    gap_note = (
        "Tick labels give each topology's spectral gap from summary.json (larger: faster "
        "mixing); horizontal lines are strategies without a topology at the same ε."
        if len(gaps)
        else "No spectral gap is stored (the runs' summary.json files are absent or predate "
        "it), so bars are not labelled with one."
    )
    finish(fig, axes, [gap_note, data.measure_note(), data.interval_note()])
    return Figure(
        name,
        "Gossip across topologies",
        f"Final {data.split} accuracy of the cells with a topology, per ε. {gap_note} "
        f"{data.seed_note()}",
        figure=fig,
    )
