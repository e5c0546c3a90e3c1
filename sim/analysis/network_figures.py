"""ε against graph distance: what an observer at each distance from a node can learn of it.

Drawn from each gossip cell's `network_privacy.json` (server_app/network_privacy.py): the
largest ε over the ordered (owner, observer) pairs at each distance, with the smallest as a
band, beside local DP (the ε every other figure and the privacy line report: what the
owner's own noisy model gives away).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sim.analysis.drawing import Figure, Skipped, finish, panels
from sim.analysis.names import RUNS
from sim.analysis.style import eps_label
from sim.analysis.sweep_data import SweepData
from sim.analysis.tidy import eps_order, series_tuple

NETWORK_PRIVACY = "network_privacy.json"  # the ServerApp's name for it (a test keeps them equal)
AUDIT = "audit.json"  # a white-box audit's by-distance bounds (server_app/whitebox.py)


def read_network(out: Path, cell: str) -> dict[str, Any] | None:
    """A cell's network_privacy.json, or None (FedAvg, an older run, unreadable)."""
    try:
        return dict(json.loads((out / RUNS / cell / NETWORK_PRIVACY).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def read_whitebox(out: Path, cell: str) -> list[dict[str, Any]] | None:
    """A cell's white-box audit bounds by distance (audit-mode=whitebox), or None."""
    try:
        doc = json.loads((out / RUNS / cell / AUDIT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if doc.get("mode") != "whitebox" or not doc.get("by_distance"):
        return None
    return list(doc["by_distance"])


def _audit_curve(audits: list[list[dict[str, Any]]]) -> tuple[np.ndarray, np.ndarray]:
    """(distances, the largest jointly valid 95% lower bound over the runs) per distance."""
    best: dict[int, float] = {}
    for rows in audits:
        for d in rows:
            k = int(d["distance"])
            best[k] = max(best.get(k, 0.0), float(d["eps_lower_joint_max"]))
    dist = np.array(sorted(best))
    return dist, np.array([best[k] for k in dist])


def _curve(docs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(distances, ε min, ε max) over the pairs a path joins and over the docs (seeds)."""
    low: dict[int, float] = {}
    high: dict[int, float] = {}
    for doc in docs:
        for d in doc["by_distance"]:
            if d["distance"] is None:
                continue
            k = int(d["distance"])
            low[k] = min(low.get(k, np.inf), float(d["eps_min"]))
            high[k] = max(high.get(k, -np.inf), float(d["eps_max"]))
    if not high or not np.all(np.isfinite(list(high.values()))):
        return None
    dist = np.array(sorted(high))
    return dist, np.array([low[k] for k in dist]), np.array([high[k] for k in dist])


def _draw_panel(ax: Any, data: SweepData, finals: Any) -> tuple[set[str], bool]:
    """One ε's series: a line (max over pairs and seeds), its band, and any audit's bound.

    Where the run was a white-box audit, the audit's lower bound by distance is drawn dashed
    with triangles. Returns the methods used and whether any audit was drawn.
    """
    methods: set[str] = set()
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    audits: dict[tuple[Any, ...], list[list[dict[str, Any]]]] = {}
    for _, row in finals.iterrows():
        if (doc := read_network(data.out, str(row["cell"]))) is not None:
            groups.setdefault(series_tuple(row, data.by), []).append(doc)
            methods.add(str(doc["method"]).split(" (")[0].split(":")[0])
            if (rows := read_whitebox(data.out, str(row["cell"]))) is not None:
                audits.setdefault(series_tuple(row, data.by), []).append(rows)
    for series, docs in groups.items():
        if (curve := _curve(docs)) is None:
            continue
        dist, low, high = curve
        style = data.style(series)
        ax.plot(dist, high, label=data.label(series), **style)
        ax.fill_between(dist, low, high, color=style["color"], alpha=0.12, linewidth=0)
        ax.axhline(high[0], color="#777777", linestyle=":", linewidth=1.2)
        if series in audits:
            at, bound = _audit_curve(audits[series])
            ax.plot(at, bound, color=style["color"], linestyle="--", marker="v", label="_audit")
    ax.set_xlabel("graph distance (0: the node itself)")
    return methods, bool(audits)


def _seed_text(seeds: list[int]) -> str:
    if len(seeds) == 1:
        return f"One seed ({seeds[0]}), one drawn gossip schedule: no interval."
    return (
        f"Over seeds {', '.join(map(str, seeds))} (the worst, no interval): each seed draws "
        "its own gossip schedule."
    )


def eps_vs_distance(data: SweepData) -> Figure | Skipped:
    """7) ε against an observer at each graph distance, per ε target."""
    name = "eps_vs_distance"
    finals = data.finals
    with_doc = [c for c in finals["cell"] if read_network(data.out, str(c)) is not None]
    if not with_doc:
        return Skipped(name, "no cell wrote network_privacy.json (gossip runs do)")
    finals = finals[finals["cell"].isin(with_doc)]
    eps_values = [e for e in eps_order(finals["eps"]) if np.isfinite(e)]
    if not eps_values:
        return Skipped(name, "no private gossip cell (ε = ∞ bounds no observer)")
    fig, axes = panels(len(eps_values))
    methods: set[str] = set()
    audited = False
    for ax, eps in zip(axes, eps_values, strict=True):
        drawn, with_audit = _draw_panel(ax, data, finals[finals["eps"] == eps])
        methods, audited = methods | drawn, audited or with_audit
        ax.set_title(f"target ε = {eps_label(eps)}")
    axes[0].set_ylabel(f"ε against the observer (δ = {data.delta_text()})")
    notes = [
        "Largest ε over the (node, observer) pairs at each distance and over the seeds; the "
        "band reaches the smallest. Dotted: local DP, what the node's own noisy model gives "
        "away (distance 0). "
        f"Method: {'; '.join(sorted(methods))} (see each run's network_privacy.json).",
        "Dashed with triangles: the white-box audit's empirical lower bound per distance "
        "(largest over its tests, 95% jointly over all of them; audit.json). The accountant's "
        "line must lie above it everywhere."
        if audited
        else "Accounted, not audited: no empirical lower bound per distance is drawn (the "
        "canary audit finds nothing under DP at these ε; audit-mode=whitebox draws one).",
        _seed_text(data.seeds()),
    ]
    finish(fig, axes, notes)
    return Figure(
        name,
        "Privacy against observers by graph distance",
        "ε against an observer at each graph distance, from each gossip run's "
        "network_privacy.json (largest over pairs and seeds).",
        figure=fig,
    )
