"""Figures of a sweep, drawn from its stored results alone (sweep.csv, manifest, summaries).

Every figure is written as PNG and SVG to `<out>/figures`, sized for print: large fonts, the
Okabe-Ito colour-blind-safe palette, markers and line styles that survive grey-scale, and
ε = ∞ labelled "∞ (no DP)". A figure whose data is absent is skipped with a logged reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from sim.analysis.curve_figures import (  # noqa: E402
    accuracy_vs_bytes,
    accuracy_vs_round,
    consensus_vs_round,
    eps_spent_vs_round,
)
from sim.analysis.drawing import Figure, Skipped  # noqa: E402
from sim.analysis.final_figures import (  # noqa: E402
    TARGET_FRACTION,
    choose_targets,
    final_accuracy_vs_eps,
    rounds_to_target_vs_eps,
    topologies,
)
from sim.analysis.style import STYLE  # noqa: E402
from sim.analysis.sweep_data import SweepData  # noqa: E402

log = logging.getLogger(__name__)

FIGURE_NAMES = (
    "accuracy_vs_round",
    "final_accuracy_vs_eps",
    "rounds_to_target",
    "consensus_distance",
    "eps_spent_vs_round",
    "topologies",
    "accuracy_vs_bytes",
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
