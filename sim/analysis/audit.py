"""An audit grid's results: audit.csv, audit.md and two figures, from the run folders alone.

Reads `<out>/manifest.json` and every completed cell's `runs/<cell>/audit.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from flower_app.results import atomic_write_text, format_eps  # noqa: E402
from sim.analysis.drawing import finish, save_figure  # noqa: E402
from sim.analysis.style import MARKERS, PALETTE, STYLE  # noqa: E402
from sim.analysis.tidy import RUNS, read_manifest  # noqa: E402

AUDIT_JSON = "audit.json"
AUDIT_CSV = "audit.csv"
AUDIT_MD = "audit.md"
AUDIT_FIGURES = ("audit_bound_vs_accountant", "audit_bound_vs_distance")
COLUMNS = [
    "cell",
    "strategy",
    "eps",
    "seed",
    "observer",
    "distance",
    "canaries",
    "guesses",
    "correct",
    "eps_lower",
    "eps_accountant",
    "mode",  # canaries (images in the data) or whitebox (directions in the update)
]


def _eps(value: Any) -> float:
    return math.inf if value in ("inf", "Infinity") else float(value)


def collect(out: Path) -> pd.DataFrame:
    """One row per (completed cell, observer), in grid order."""
    rows = []
    for cell in read_manifest(out)["cells"]:
        path = out / RUNS / cell["id"] / AUDIT_JSON
        if cell["status"] != "completed" or not path.is_file():
            continue
        audit = json.loads(path.read_text(encoding="utf-8"))
        for o in audit["observers"]:
            rows.append(
                {
                    "cell": cell["id"],
                    "strategy": audit["strategy"],
                    "eps": _eps(audit["eps_target"]),
                    "seed": cell["params"].get("seed"),
                    **{k: o.get(k) for k in COLUMNS[4:9]},
                    "eps_lower": float(o["eps_lower"]),
                    "eps_accountant": _eps(o["eps_accountant"]),
                    "mode": audit.get("mode", "canaries"),
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def _shown(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:.3g}"


def violations(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose lower bound exceeds the accountant's ε: the audit or the accounting is wrong."""
    return df[df["eps_lower"] > df["eps_accountant"]]


def markdown(df: pd.DataFrame) -> str:
    """The audit table: per strategy, ε and observer, the bound beside the accountant's ε."""
    # A swept key (topology, ...) makes several runs share strategy and ε: name the run.
    named = bool(len(df)) and df.groupby(["strategy", "eps", "seed"])["cell"].nunique().max() > 1
    lines = [
        ("| run " if named else "")
        + "| strategy | ε target | observer | distance | guesses | correct | ε lower (95%) "
        "| ε accountant |",
        ("| --- " if named else "") + "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in df.iterrows():
        distance = "–" if pd.isna(r["distance"]) else str(int(r["distance"]))
        lines.append(
            (f"| {r['cell']} " if named else "")
            + f"| {r['strategy']} | {_shown(r['eps'])} | {r['observer']} | {distance} | "
            f"{r['guesses']} | {r['correct']} | {r['eps_lower']:.2f} | "
            f"{_shown(r['eps_accountant'])} |"
        )
    return "\n".join(lines) + "\n"


def bound_vs_accountant(df: pd.DataFrame) -> Any:
    """The ε lower bound of every observer against the accountant's ε, per strategy (unsaved)."""
    private = df[df["eps_accountant"].apply(math.isfinite)]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 5.5))
        top = max(private["eps_accountant"].max() if len(private) else 1.0, 1.0) * 1.1
        ax.plot([0, top], [0, top], color="grey", linestyle="--", label="bound = accountant ε")
        for i, (strategy, part) in enumerate(private.groupby("strategy", sort=True)):
            ax.scatter(
                part["eps_accountant"],
                part["eps_lower"],
                s=60,
                marker=MARKERS[i % len(MARKERS)],
                color=PALETTE[i % len(PALETTE)],
                label=f"{strategy} (every observer)",
                edgecolor="black",
                zorder=3,
            )
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("accountant's ε (upper bound)")
        ax.set_ylabel("audit's ε (95% lower bound)")
        ax.set_title("One-run audit vs accountant, DP runs")
        point = "Each point is one observer of one run: its 95% lower bound against the "
        finish(fig, [ax], _notes(df, point + "accountant's ε for that observer."))
        return fig


def bound_vs_distance(df: pd.DataFrame) -> Any:
    """Gossip's ε lower bound against the observer's distance, FedAvg's beside it (unsaved)."""
    levels = sorted(df["eps"].unique(), key=lambda e: (math.isinf(e), e), reverse=True)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(levels), figsize=(5.2 * len(levels), 4.8), squeeze=False)
        for ax, eps in zip(axes[0], levels, strict=True):
            part = df[df["eps"] == eps]
            gossip = part[(part["strategy"] == "gossip") & part["distance"].notna()]
            if len(gossip):
                curve = gossip.groupby("distance")["eps_lower"].mean().sort_index()
                ax.plot(curve.index, curve.values, marker="o", color=PALETTE[1], label="gossip")
                avg = part[(part["strategy"] == "gossip") & (part["observer"] == "average")]
                if len(avg):
                    ax.axhline(
                        avg["eps_lower"].mean(),
                        color=PALETTE[1],
                        linestyle=":",
                        label="gossip: average model",
                    )
            fed = part[part["strategy"] == "fedavg"]
            glob = fed[fed["observer"] == "global"]
            if len(glob):
                ax.axhline(
                    glob["eps_lower"].mean(),
                    color=PALETTE[0],
                    linestyle="--",
                    label="FedAvg: global model (every node)",
                )
            own = fed[fed["observer"] == "owner"]
            if len(own):
                ax.scatter(
                    [0],
                    [own["eps_lower"].mean()],
                    marker="s",
                    s=70,
                    color=PALETTE[0],
                    edgecolor="black",
                    zorder=3,
                    label="FedAvg: upload (server's view)",
                )
            if math.isfinite(eps):
                ax.axhline(eps, color="grey", linewidth=1, label="target ε")
            ax.set_title("ε = ∞ (no DP)" if math.isinf(eps) else f"ε = {format_eps(eps)}")
            ax.set_ylim(bottom=-0.05 * max(ax.get_ylim()[1], 1.0))
        fig.supxlabel("observer's distance from the canary's owner (hops)")
        axes[0][0].set_ylabel("audit's ε (95% lower bound)")
        mean = "Gossip: the mean of the observers' 95% lower bounds at each distance."
        finish(fig, list(axes[0]), _notes(df, mean))
        return fig


def _notes(df: pd.DataFrame, what: str) -> list[str]:
    """What a point is, the seeds, and that there is no interval, inside the figure."""
    seeds = sorted({int(s) for s in df["seed"].dropna()})
    seed_text = ", ".join(map(str, seeds)) or "?"
    many = len(seeds) > 1
    return [
        what,
        f"Seed{'s' if many else ''} {seed_text}; one audit run per cell, so no interval: a "
        "lower bound is itself random, and a difference of a few tenths is not significant.",
    ]


def draw_audit(df: pd.DataFrame) -> dict[str, Any]:
    """The audit's matplotlib figures by name, unsaved (none without a row)."""
    if not len(df):
        return {}
    return dict(zip(AUDIT_FIGURES, (bound_vs_accountant(df), bound_vs_distance(df)), strict=True))


def write_audit_report(out: Path) -> tuple[pd.DataFrame, list[Path]]:
    """audit.csv, audit.md and the figures; the table and the files written."""
    df = collect(out)
    atomic_write_text(out / AUDIT_CSV, df.to_csv(index=False))
    bad = violations(df)
    kinds = {
        "canaries": "images of random sparse pixels with a random label, each in its owner's "
        "data with probability ½",
        "whitebox": "directions C·c_i added to the owner's clipped update every round, each "
        "with probability ½, scored by projection (docs/privacy-audit.md, white-box audit)",
    }
    what = "; ".join(f"{m}: {kinds[m]}" for m in sorted(set(df["mode"])) if m in kinds)
    text = [
        "# Privacy audit (one run, Steinke et al. 2023)\n",
        f"Canaries ({what or 'none'}). A lower bound is a 95% one (union bound over the "
        "guessing rules); it can only show leakage, never its absence.\n",
        markdown(df),
    ]
    if len(bad):
        text.append(
            f"\n**{len(bad)} observer(s) with a lower bound above the accountant's ε: the "
            "accounting or the audit is wrong.**\n"
        )
    atomic_write_text(out / AUDIT_MD, "\n".join(text))
    files = [out / AUDIT_CSV, out / AUDIT_MD]
    with plt.rc_context(STYLE):
        for name, fig in draw_audit(df).items():
            files += save_figure(fig, out, name)
    return df, files
