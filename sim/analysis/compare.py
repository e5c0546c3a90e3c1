"""Several sweeps side by side: final accuracy, true ε spent and rounds to target per ε.

For sweeps of the same grid run under different mechanisms (e.g. the `tutorial`,
`tutorial-honest` and `tutorial-dpsgd` presets): one row per series and ε, one column group
per sweep. Accuracy is what the nodes hold (FedAvg's global model, gossip's mean over node
models); the rounds-to-target target is `fraction` of the same sweep's best non-private final
accuracy, one target for every series. Everything comes from the stored results.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from sim.analysis.drawing import eps_lines, finish, panels
from sim.analysis.final_figures import TARGET_FRACTION, choose_targets, rounds_table
from sim.analysis.report import final_summary, format_number, markdown_table
from sim.analysis.style import STYLE, eps_label
from sim.analysis.sweep_data import SweepData
from sim.analysis.tidy import eps_order, series_tuple, summarize

# Ten classes (MNIST and Fashion-MNIST): what a model guessing one class scores.
CHANCE = 0.1
# Below this share of its non-private gain over chance, a curve counts as "at chance".
AT_CHANCE = 0.05


def retained(acc_private: float, acc_nonprivate: float, chance: float = CHANCE) -> float:
    """Share of the non-private accuracy's gain over chance that is kept under DP (0 to ~1)."""
    gain = acc_nonprivate - chance
    return math.nan if gain <= 0 else max(0.0, (acc_private - chance) / gain)


def verdicts(
    finals: Mapping[str, Mapping[float, float]], rounds: Mapping[str, Mapping[float, float]]
) -> list[str]:
    """The tutorial's two claims, judged on one sweep's FedAvg and gossip numbers.

    `finals[strategy][eps]` is the final accuracy, `rounds[strategy][eps]` the rounds to the
    target (NaN: never reached). Claim 1: FedAvg converges faster under weak privacy (no DP
    and the largest finite ε). Claim 2: gossip degrades more gracefully (keeps a larger share
    of its gain over chance at the smallest ε). A claim whose evidence is all at chance is
    called untestable, not confirmed.
    """
    if not {"fedavg", "gossip"} <= set(finals):
        return ["- needs both fedavg and gossip cells"]
    eps = sorted(set(finals["fedavg"]) & set(finals["gossip"]))
    finite = [e for e in eps if math.isfinite(e)]
    if math.inf not in eps or not finite:
        return ["- needs ε = ∞ and at least one finite ε for both strategies"]

    def r(strategy: str, e: float) -> float:
        value = rounds.get(strategy, {}).get(e, math.nan)
        return math.inf if math.isnan(value) else value

    def text(value: float) -> str:
        if math.isinf(value):
            return "never"
        return f"{value:g} round{'' if value == 1 else 's'}"

    weak = max(finite)
    pairs = [(e, r("fedavg", e), r("gossip", e)) for e in (math.inf, weak)]
    detail = "; ".join(
        f"ε={'∞' if math.isinf(e) else f'{e:g}'}: FedAvg {text(f)}, gossip {text(g)}"
        for e, f, g in pairs
    )
    faster = [f < g for _, f, g in pairs if not (math.isinf(f) and math.isinf(g))]
    if not faster:
        claim1 = f"untestable (neither reaches the target: {detail})"
    elif not all(faster):
        claim1 = f"does not hold ({detail})"
    elif len(faster) < len(pairs):
        claim1 = f"holds only without DP; under DP neither reaches the target ({detail})"
    else:
        claim1 = f"holds ({detail})"
    strong = min(finite)
    kept = {s: retained(finals[s][strong], finals[s][math.inf]) for s in ("fedavg", "gossip")}
    detail = (
        f"share of the gain over chance kept at ε={strong:g}: FedAvg {kept['fedavg']:.0%}, "
        f"gossip {kept['gossip']:.0%}"
    )
    if any(math.isnan(v) for v in kept.values()):
        claim2 = "untestable (a strategy is at chance even without DP)"
    elif all(v < AT_CHANCE for v in kept.values()):
        claim2 = f"untestable: both strategies are at chance ({detail})"
    else:
        holds = kept["gossip"] > kept["fedavg"]
        claim2 = f"{'holds' if holds else 'does not hold'} ({detail})"
    return [
        f"- FedAvg converges faster under weak privacy: {claim1}",
        f"- gossip degrades more gracefully as noise grows: {claim2}",
    ]


def _common_rounds(data: SweepData, fraction: float) -> dict[tuple[Any, ...], Any]:
    """Rounds per (series, ε) to `fraction` of the best series' non-private final accuracy."""
    targets = choose_targets(data, fraction=fraction)
    if not targets.values:
        return {}
    return {_key(r, data.by): r for _, r in rounds_table(data, targets).iterrows()}


def _key(row: Any, by: Sequence[str]) -> tuple[Any, ...]:
    return (*series_tuple(row, by), float(row["eps"]))


Key = tuple[Any, ...]  # the series coordinates, then ε


def compare(
    outs: Sequence[Path], names: Sequence[str] | None = None, fraction: float = TARGET_FRACTION
) -> str:
    """Markdown: final accuracy (%) and ε spent, then rounds to target, per sweep."""
    names = list(names or [p.name for p in outs])
    if len(names) != len(outs):
        raise ValueError(f"{len(names)} names for {len(outs)} sweeps")
    loaded = [SweepData.load(out) for out in outs]
    by = list(dict.fromkeys(k for data in loaded for k in data.by))
    finals, rounds, targets = zip(
        *(_sweep_tables(data, by, fraction) for data in loaded), strict=True
    )
    keys = list(dict.fromkeys(k for table in finals for k in table))
    order = {e: i for i, e in enumerate(eps_order(k[-1] for k in keys))}
    keys.sort(key=lambda k: (tuple(str(x) for x in k[:-1]), order[k[-1]]))
    notes = [f"- {name}: target {how}" for name, how in zip(names, targets, strict=True)]
    claims = _claims(loaded, names, finals, fraction) if by == ["strategy"] else []
    intro = (
        [
            "The tutorial's conclusion, judged on each sweep's numbers above (speed: "
            f"rounds to {fraction:.0%} of the better strategy's non-private final "
            "accuracy, one target for both):",
            "",
        ]
        if claims
        else []
    )
    return "\n".join(
        [
            _accuracy_table(by, names, keys, finals),
            "",
            f"Rounds to reach {fraction:.0%} of the same sweep's best non-private final "
            "accuracy (one target for every series of a sweep):",
            "",
            _rounds_table(by, names, keys, rounds),
            "",
            *notes,
            "",
            *intro,
            *claims,
        ]
    )


def _sweep_tables(
    data: SweepData, by: list[str], fraction: float
) -> tuple[dict[Key, Any], dict[Key, Any], str]:
    """One sweep's final-accuracy rows and rounds-to-target rows by key, and its target."""
    data.by = by  # align series keys across sweeps (absent keys read as None)
    for k in by:
        if k not in data.tidy:
            data.tidy[k] = math.nan
    final = {_key(r, by): r for _, r in final_summary(data).iterrows()}
    chosen = choose_targets(data, fraction=fraction)
    table = rounds_table(data, chosen) if chosen.values else None
    rounds = {} if table is None else {_key(r, by): r for _, r in table.iterrows()}
    return final, rounds, chosen.how


def _label(key: Key) -> list[str]:
    return ["" if v is None else str(v) for v in key[:-1]] + [eps_label(key[-1])]


def _accuracy_table(
    by: list[str], names: list[str], keys: list[Key], finals: Sequence[dict[Key, Any]]
) -> str:
    header = [*by, "ε"]
    for name in names:
        header += [f"{name}: accuracy (%)", f"{name}: ε spent"]
    rows = []
    for key in keys:
        row = _label(key)
        for table in finals:
            r = table.get(key)
            row += (
                ["–", "–"]
                if r is None
                else [format_number(r["mean"] * 100, ".1f"), format_number(r["eps_spent"], ".3g")]
            )
        rows.append(row)
    return markdown_table(header, rows)


def _rounds_table(
    by: list[str], names: list[str], keys: list[Key], rounds: Sequence[dict[Key, Any]]
) -> str:
    rows = []
    for key in keys:
        row = _label(key)
        for table in rounds:
            r = table.get(key)
            if r is None:
                row.append("–")
            elif math.isnan(r["rounds"]):
                row.append(f"not in {int(r['max_round'])}")
            else:
                row.append(str(int(r["rounds"])))
        rows.append(row)
    return markdown_table([*by, "ε", *(f"{name}: rounds" for name in names)], rows)


def _claims(
    loaded: list[SweepData],
    names: list[str],
    finals: Sequence[dict[Key, Any]],
    fraction: float,
) -> list[str]:
    """The tutorial's two claims judged per sweep (only the strategy varies).

    Speed is judged against ONE target for both strategies (90% of the better non-private
    final accuracy): against its own plateau, a strategy that barely learns "converges" at
    once.
    """
    claims: list[str] = []
    common = [_common_rounds(data, fraction) for data in loaded]
    for name, final, rnd in zip(names, finals, common, strict=True):
        per: dict[str, dict[float, float]] = {}
        per_rounds: dict[str, dict[float, float]] = {}
        for (strategy, e), row in final.items():
            per.setdefault(strategy, {})[e] = float(row["mean"])
        for (strategy, e), row in rnd.items():
            per_rounds.setdefault(strategy, {})[e] = float(row["rounds"])
        claims += [f"**{name}**", "", *verdicts(per, per_rounds), ""]
    return claims


def compare_plot(outs: Sequence[Path], names: Sequence[str]) -> Any:
    """Final accuracy against ε, one panel per sweep (shared y axis), chance level dashed."""
    loaded = [SweepData.load(out) for out in outs]
    with plt.rc_context(STYLE):
        fig, axes = panels(len(loaded), width=5.2, height=4.4)
        for ax, data, name in zip(axes, loaded, names, strict=True):
            summary = summarize(data.finals, [*data.by, "eps"])
            eps_lines(ax, data, summary, "mean", "half", 100)
            ax.axhline(CHANCE * 100, color="grey", linestyle="--", linewidth=1, label="chance")
            ax.set_title(name)
            ax.xaxis.label.set_fontsize(8)
        splits = {data.split for data in loaded}
        split = splits.pop() if len(splits) == 1 else "test or validation"
        axes[0].set_ylabel(f"final {split} accuracy of what a node holds (%)")
        notes = dict.fromkeys(n for d in loaded for n in (d.measure_note(), d.interval_note()))
        finish(fig, axes, list(notes))
    return fig


def compare_figure(outs: Sequence[Path], names: Sequence[str], path: Path) -> Path:
    """Write `compare_plot` to `path` (PNG at 150 dpi)."""
    fig = compare_plot(outs, names)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path
