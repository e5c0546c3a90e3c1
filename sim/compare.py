"""Several sweeps side by side: final accuracy, true ε spent and rounds to target per ε.

For sweeps of the same grid run under different mechanisms (e.g. the `tutorial`,
`tutorial-honest` and `tutorial-dpsgd` presets): one row per series and ε, one column group
per sweep. Accuracy is what the nodes hold (FedAvg's global model, gossip's mean over node
models); the rounds-to-target target is `fraction` of the same sweep's own non-private final
accuracy. Everything comes from the stored results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sim.plots import TARGET_FRACTION, SweepData, choose_targets, eps_label, rounds_table
from sim.report import final_summary, format_number, markdown_table
from sim.tidy import eps_order, series_tuple


def _key(row: Any, by: Sequence[str]) -> tuple[Any, ...]:
    return (*series_tuple(row, by), float(row["eps"]))


def compare(
    outs: Sequence[Path], names: Sequence[str] | None = None, fraction: float = TARGET_FRACTION
) -> str:
    """Markdown: final accuracy (%) and ε spent, then rounds to target, per sweep."""
    names = list(names or [p.name for p in outs])
    if len(names) != len(outs):
        raise ValueError(f"{len(names)} names for {len(outs)} sweeps")
    loaded = [SweepData.load(out) for out in outs]
    by = list(dict.fromkeys(k for data in loaded for k in data.by))
    finals: list[dict[tuple[Any, ...], Any]] = []
    rounds: list[dict[tuple[Any, ...], Any]] = []
    targets: list[str] = []
    keys: list[tuple[Any, ...]] = []
    for data in loaded:
        data.by = by  # align series keys across sweeps (absent keys read as None)
        for k in by:
            if k not in data.tidy:
                data.tidy[k] = math.nan
        summary = final_summary(data)
        finals.append({_key(r, by): r for _, r in summary.iterrows()})
        chosen = choose_targets(data, fraction=fraction)
        targets.append(chosen.how)
        table = rounds_table(data, chosen) if chosen.values else None
        rounds.append({} if table is None else {_key(r, by): r for _, r in table.iterrows()})
        keys += [k for k in finals[-1] if k not in keys]
    order = {e: i for i, e in enumerate(eps_order(k[-1] for k in keys))}
    keys.sort(key=lambda k: (tuple(str(x) for x in k[:-1]), order[k[-1]]))

    def label(key: tuple[Any, ...]) -> list[str]:
        return ["" if v is None else str(v) for v in key[:-1]] + [eps_label(key[-1])]

    header = [*by, "ε"]
    for name in names:
        header += [f"{name}: accuracy (%)", f"{name}: ε spent"]
    acc_rows = []
    for key in keys:
        row = label(key)
        for table in finals:
            r = table.get(key)
            row += (
                ["–", "–"]
                if r is None
                else [format_number(r["mean"] * 100, ".1f"), format_number(r["eps_spent"], ".3g")]
            )
        acc_rows.append(row)
    rounds_header = [*by, "ε", *(f"{name}: rounds" for name in names)]
    rounds_rows = []
    for key in keys:
        row = label(key)
        for table in rounds:
            r = table.get(key)
            if r is None:
                row.append("–")
            elif math.isnan(r["rounds"]):
                row.append(f"not in {int(r['max_round'])}")
            else:
                row.append(str(int(r["rounds"])))
        rounds_rows.append(row)
    notes = [f"- {name}: target {how}" for name, how in zip(names, targets, strict=True)]
    return "\n".join(
        [
            markdown_table(header, acc_rows),
            "",
            f"Rounds to reach {fraction:.0%} of the same sweep's non-private final accuracy:",
            "",
            markdown_table(rounds_header, rounds_rows),
            "",
            *notes,
            "",
        ]
    )
