"""How every figure looks: the colour-blind-safe palette, markers, line styles, fonts, ε labels.

Sized for print: large fonts, the Okabe-Ito palette, markers and line styles that survive
grey-scale, and ε = ∞ labelled "∞ (no DP)".
"""

from __future__ import annotations

import math

from flower_app.results import format_eps

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


def eps_label(eps: float) -> str:
    """ε for titles and legends, with ∞ spelled out as no DP."""
    return "∞ (no DP)" if math.isinf(eps) else format_eps(eps)
