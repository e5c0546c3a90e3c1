"""Figures of a sweep, drawn from its stored results alone (sweep.csv, manifest, summaries).

`draw_all` returns the matplotlib figures (for a notebook); `plot_all` also writes each as PNG
and SVG to `<out>/figures` (the CLI's job). Sized for print: large fonts, the
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
from sim.analysis.drawing import FORMATS, Figure, Skipped  # noqa: E402
from sim.analysis.final_figures import (  # noqa: E402
    TARGET_FRACTION,
    choose_targets,
    final_accuracy_vs_eps,
    rounds_to_target_vs_eps,
    topologies,
)
from sim.analysis.network_figures import eps_vs_distance  # noqa: E402
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
    "eps_vs_distance",
)


def draw_all(
    data: SweepData, *, target: float | None = None, fraction: float = TARGET_FRACTION
) -> list[Figure | Skipped]:
    """Every figure the stored results support, unsaved, or why it is skipped, in order."""
    if data.tidy.empty:
        return [Skipped(n, "no completed cell in sweep.csv") for n in FIGURE_NAMES]
    targets = choose_targets(data, target, fraction)
    with plt.rc_context(STYLE):
        return [
            accuracy_vs_round(data),
            final_accuracy_vs_eps(data),
            rounds_to_target_vs_eps(data, targets),
            consensus_vs_round(data),
            eps_spent_vs_round(data),
            topologies(data),
            accuracy_vs_bytes(data),
            eps_vs_distance(data),
        ]


def plot_all(
    out: Path,
    *,
    target: float | None = None,
    fraction: float = TARGET_FRACTION,
    formats: tuple[str, ...] = FORMATS,
    dpi: int = 200,
) -> tuple[list[Figure], list[Skipped]]:
    """Draw and write every figure the stored results support; log why the others are skipped."""
    results = draw_all(SweepData.load(out), target=target, fraction=fraction)
    skipped = [r for r in results if isinstance(r, Skipped)]
    for s in skipped:
        log.info("figure %s skipped: %s", s.name, s.reason)
    with plt.rc_context(STYLE):
        drawn = [r.save(out, formats, dpi) for r in results if isinstance(r, Figure)]
    return drawn, skipped
