"""`<tune out>/tune.md`: what `fl-sweep tune` chose, on what, and what the choices reach.

Everything comes from `tune.json` and the final stage's sweep folder, so the report can be
rebuilt (`fl-sweep report <out>/final` redraws that stage's own figures and report.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from flower_app.results import atomic_write_text
from sim.analysis.curve_figures import BYTES
from sim.analysis.report import format_accuracy, markdown_table
from sim.analysis.style import eps_label
from sim.analysis.sweep_data import SweepData
from sim.analysis.tidy import HEADLINE, curve, summarize

TUNE_REPORT = "tune.md"
FINAL_DIR, SEARCH_DIR, CHOICES_FILE = "final", "search", "tune.json"

UNCOUNTED = (
    "**The tuning itself spends privacy that no ε here counts.** Every search run trained on "
    "the same nodes' data, and the choice depends on their results, so the released final "
    "models leak a little more than each run's ε says. Papernot & Steinke (ICLR 2022, "
    "'Hyperparameter tuning with Rényi differential privacy') show how to bound it, e.g. "
    "by running a random number of candidates; this tool does not, so discount the tuned "
    "numbers accordingly. The validation split keeps the choice off the test set; it does "
    "not make the choice private."
)


def _wall(out: Path) -> float:
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return math.nan
    return float(sum(c.get("wall_s") or 0 for c in manifest["cells"]))


def _hours(seconds: float) -> str:
    return "—" if math.isnan(seconds) else f"{seconds / 3600:.2f} h"


def equal_bytes(data: SweepData) -> pd.DataFrame:
    """Per ε: each strategy's accuracy once it has sent as many bytes as the thriftier one.

    The budget is the smaller of the strategies' final cumulative bytes per node (means
    over seeds); each strategy's accuracy is that of its last round within the budget.
    """
    metric = HEADLINE if HEADLINE in data.tidy else "accuracy"
    keys = [*data.by, "eps"]
    acc, sent = curve(data.tidy, keys, metric), curve(data.tidy, keys, BYTES)
    merged = acc.merge(sent[[*keys, "round", "mean"]], on=[*keys, "round"], suffixes=("", "_b"))
    rows = []
    others = [k for k in keys if k != "strategy"]
    for key, group in merged.groupby(others, dropna=False, sort=False):
        finals = group.groupby("strategy")["mean_b"].max()
        budget = float(finals.min())
        row = dict(zip(others, key if isinstance(key, tuple) else (key,), strict=True))
        row["budget_mb"] = budget / 1e6
        for strategy, rows_s in group.groupby("strategy", sort=False):
            within = rows_s[rows_s["mean_b"] <= budget * (1 + 1e-9)].sort_values("round")
            if within.empty:
                row[strategy] = "—"
                continue
            last = within.iloc[-1]
            acc_text = format_accuracy(last["mean"], last["half"])
            row[strategy] = f"{acc_text} (round {int(last['round'])})"
        rows.append(row)
    return pd.DataFrame(rows).sort_values("eps", ascending=False, kind="stable")


def write_tune_report(out: Path) -> Path:
    """Write `<out>/tune.md` from tune.json and the final stage; return its path."""
    choices = json.loads((out / CHOICES_FILE).read_text(encoding="utf-8"))
    data = SweepData.load(out / FINAL_DIR)
    lines = [
        "# Tuned comparison",
        "",
        f"Command: `{data.manifest.get('command', '')}`",
        "",
        *_how_chosen(choices),
        *_chosen_and_tested(choices, data),
        *_at_equal_bytes(data),
        *_figures(out),
        *_cost(out),
    ]
    path = out / TUNE_REPORT
    atomic_write_text(path, "\n".join(lines))
    return path


def _how_chosen(choices: dict[str, Any]) -> list[str]:
    """The split, the search space, the seeds and the criterion; what no ε counts."""
    return [
        "## How the hyperparameters were chosen",
        "",
        f"- Validation split: {choices['validation_samples']} training examples, carved off "
        "before partitioning by a fixed seed (the same split for every run seed), never in "
        "any node's data. Search runs (`search/`) evaluate on it only (`evaluate-on="
        "validation`); only the final runs (`final/`) read the test set.",
        "- Search space (product; `max-grad-norm` is not searched without DP, where it does "
        f"nothing): {', '.join(f'`{k}` ∈ {v}' for k, v in choices['search'].items())}.",
        f"- Search seed(s): {choices['search_seeds']}; final seeds: {choices['final_seeds']}.",
        f"- Chosen by the {choices['chosen_by']} after the last round.",
        "",
        UNCOUNTED,
        "",
    ]


def _chosen_and_tested(choices: dict[str, Any], data: SweepData) -> list[str]:
    """One row per (strategy, ε): what was chosen, its validation and its test accuracy."""
    summary = summarize(data.finals, [*data.by, "eps"]) if not data.tidy.empty else None
    header = ["strategy", "ε", "chosen", "validation (search)", "test accuracy", "seeds"]
    rows = []
    for c in choices["groups"]:
        coords = c["coords"]
        test, n = _test_accuracy(summary, coords, [*data.by, "eps"])
        chosen = " ".join(f"{k}={v}" for k, v in c["chosen"].items())
        rows.append(
            [
                coords["strategy"],
                eps_label(float(coords["eps"])),
                chosen,
                f"{c['validation_accuracy'] * 100:.1f}%",
                test,
                str(n),
            ]
        )
    return [
        "## Chosen hyperparameters and test accuracy",
        "",
        markdown_table(header, rows),
        "",
        "Test accuracy is that of what a node holds (FedAvg: the global model; gossip: the "
        "mean over nodes of each node's own model), after the last round: mean ± 95% "
        "t-interval over the final seeds.",
        "",
    ]


def _test_accuracy(
    summary: pd.DataFrame | None, coords: dict[str, Any], keys: list[str]
) -> tuple[str, int]:
    """The final runs' test accuracy at `coords` (mean ± half-width) and their seed count."""
    if summary is None:
        return "not run yet", 0
    match = summary
    for k in keys:
        if k in coords:
            want = float(coords[k]) if k == "eps" else coords[k]
            match = match[match[k] == want]
    if match.empty:
        return "not run yet", 0
    return format_accuracy(match.iloc[0]["mean"], match.iloc[0]["half"]), int(match.iloc[0]["n"])


def _at_equal_bytes(data: SweepData) -> list[str]:
    """Each strategy at the other's communication budget (`equal_bytes`), if bytes were kept."""
    if data.tidy.empty or BYTES not in data.tidy:
        return []
    table = equal_bytes(data)
    strategies = [s for s in ("fedavg", "gossip") if s in table]
    rows = [
        [eps_label(float(r["eps"])), f"{r['budget_mb']:.3g}", *[str(r[s]) for s in strategies]]
        for _, r in table.iterrows()
    ]
    return [
        "## At equal communication",
        "",
        "Each strategy's accuracy at the last round in which a node has sent no more model "
        "bytes than the thriftier strategy sends in its whole run (FedAvg: uploads; gossip: "
        "models sent to neighbours; downloads not counted).",
        "",
        markdown_table(["ε", "budget (MB per node)", *strategies], rows),
        "",
    ]


def _figures(out: Path) -> list[str]:
    """The final stage's figures, linked (none: no section)."""
    figures = sorted((out / FINAL_DIR / "figures").glob("*.png"))
    if not figures:
        return []
    return ["## Figures", "", *[f"![{p.stem}]({FINAL_DIR}/figures/{p.name})" for p in figures], ""]


def _cost(out: Path) -> list[str]:
    """What the search and the final runs cost in run time."""
    return [
        "## Cost",
        "",
        f"Search: {_hours(_wall(out / SEARCH_DIR))} of run time; final runs: "
        f"{_hours(_wall(out / FINAL_DIR))} (sums of the runs' wall times).",
        "",
    ]
