"""`<out>/report.md`: figures, final accuracy with confidence intervals, privacy unit and δ.

Everything comes from the stored results, so a report can be regenerated (or re-targeted)
long after the sweep ran.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from flower_app.privacy import PRIVACY_UNIT, TRUST_MODEL
from flower_app.results import atomic_write_text, project_root
from sim.analysis.drawing import Figure, Skipped
from sim.analysis.final_figures import TARGET_FRACTION, choose_targets, rounds_table
from sim.analysis.plots import plot_all
from sim.analysis.style import eps_label
from sim.analysis.sweep_data import SweepData
from sim.analysis.tidy import eps_order, summarize

REPORT = "report.md"


def final_summary(data: SweepData) -> pd.DataFrame:
    """Per series and ε: seeds, final accuracy mean ± CI half-width, ε spent, wall time."""
    if data.tidy.empty:
        return pd.DataFrame(columns=[*data.by, "eps", "n", "mean", "half", "eps_spent", "wall_s"])
    summary = summarize(data.finals, [*data.by, "eps"])
    return _ordered(data, summary)


def _ordered(data: SweepData, df: pd.DataFrame) -> pd.DataFrame:
    """Rows in series order, then ∞ first and decreasing ε."""
    order = {s: i for i, s in enumerate(data.series)}
    eps_rank = {e: i for i, e in enumerate(eps_order(df["eps"]))}
    keys = [
        (order.get(tuple(None if _nan(r[k]) else r[k] for k in data.by), 0), eps_rank[r["eps"]])
        for _, r in df.iterrows()
    ]
    return df.iloc[sorted(range(len(df)), key=keys.__getitem__)].reset_index(drop=True)


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def privacy_units(data: SweepData) -> list[str]:
    """The distinct privacy units the runs recorded (sample-level when none did)."""
    units = data.cells["privacy_unit"].dropna() if "privacy_unit" in data.cells else []
    return list(dict.fromkeys(u for u in units if u != "none")) or [PRIVACY_UNIT]


def preset_of(command: str) -> str | None:
    """The `--preset` a recorded `fl-sweep run` command used, if any."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, word in enumerate(words):
        name = words[i + 1] if word == "--preset" and i + 1 < len(words) else None
        name = word.partition("=")[2] if word.startswith("--preset=") else name
        if name:
            return name
    return None


def _has_values(df: pd.DataFrame, column: str) -> bool:
    return column in df and df[column].notna().any()


def format_accuracy(mean: float, half: float) -> str:
    """`81.2 ± 1.3` in percent; no ± with a single seed."""
    if _nan(mean):
        return "–"
    return f"{mean * 100:.1f}" if _nan(half) else f"{mean * 100:.1f} ± {half * 100:.1f}"


def format_number(value: Any, spec: str = ".2f") -> str:
    """A number for a table cell, or a dash."""
    return "–" if value is None or _nan(value) else format(value, spec)


def summary_rows(data: SweepData, summary: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and text rows of the final-accuracy table (shared by Markdown and rich)."""
    header = [
        *data.by,
        "ε",
        "seeds",
        "final accuracy (%)",
        "ε spent",
        "wall time (s)",
    ]
    rows = [
        [
            *("" if _nan(r[k]) else str(r[k]) for k in data.by),
            eps_label(r["eps"]),
            str(r["n"]),
            format_accuracy(r["mean"], r["half"]),
            format_number(r["eps_spent"], ".3g"),
            format_number(r["wall_s"], ".0f"),
        ]
        for _, r in summary.iterrows()
    ]
    return header, rows


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = [line(header), line(["---"] * len(header))]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _values(values: Any) -> str:
    if isinstance(values, list):
        return "{" + ", ".join(_value(v) for v in values) + "}"
    return _value(values)


def _value(value: Any) -> str:
    return "∞" if value in ("inf", math.inf) else str(value)


def noise_note(data: Any) -> str:
    """Whether the cells' DP noise was seeded (repeatable), secret, or not recorded."""
    cells = data.cells
    private = cells[cells["eps"].astype(float).map(math.isfinite)] if "eps" in cells else cells
    if private.empty:
        return "- DP noise: none (no private cell)."
    if "noise" not in private or private["noise"].isna().all():
        return (
            "- DP noise: these runs predate secret noise; their noise was derived from the run's "
            "`seed`, so it was repeatable and not private against anyone who knows the seed."
        )
    if "noise_seed" in private and private["noise_seed"].notna().any():
        return (
            "- **DP noise is seeded** (`noise-seed` = each cell's seed, set by fl-sweep) so every "
            "cell repeats bit for bit; seeded noise is NOT private against anyone who knows "
            "`noise-seed`: right for measuring accuracy under DP in simulation, never for real "
            "data (set `noise-seed=-1` for secret noise)."
        )
    return (
        "- DP noise: secret, keyed in each node by a fresh OS key (cells do not repeat bit "
        "for bit)."
    )


def display_path(path: Path) -> str:
    """`path` relative to the project (or the working directory) when inside it.

    Committed reports must not carry one machine's absolute paths.
    """
    for base in (project_root(), Path.cwd()):
        if base is not None:
            try:
                return path.resolve().relative_to(base.resolve()).as_posix()
            except ValueError:
                continue
    return str(path)


def _setup_section(m: dict[str, Any]) -> list[str]:
    cells = m["cells"]
    count = {s: sum(c["status"] == s for c in cells) for s in ("completed", "failed", "pending")}
    text = ["## Setup", ""]
    if m.get("command"):
        text.append(f"- Command: `{m['command']}`")
        if preset := preset_of(m["command"]):
            about = f": {m['description']}" if m.get("description") else ""
            text.append(f"- Preset `{preset}`{about}")
    return text + [
        f"- Simulated nodes: {m.get('nodes')}",
        "- Fixed: "
        + (", ".join(f"`{k}={_value(v)}`" for k, v in m.get("fixed", {}).items()) or "nothing"),
        "- Swept: "
        + ("; ".join(f"`{k}` ∈ {_values(v)}" for k, v in m.get("swept", {}).items()) or "nothing"),
        f"- Cells: {count['completed']} completed, {count['failed']} failed, "
        f"{count['pending']} pending (of {len(cells)}).",
        "",
    ]


def _privacy_section(data: SweepData) -> list[str]:
    if _has_values(data.cells, "eps_per_round_claimed"):
        budget = (
            "- **Cells with `accounting=per-round` (as the tutorial) label ε per round**: "
            "their ε is the uncomposed one-shot label of the classic Gaussian mechanism, "
            "NOT a budget; `ε spent` below is the true ε composed over the rounds each "
            "node trained (RDP accountant, δ as above)."
        )
    else:
        budget = (
            "- ε is the budget each node spends over the whole run (not per round); the "
            "noise is calibrated so each node ends at its target."
        )
    return [
        "## Privacy",
        "",
        *[f"- Privacy unit: {unit}." for unit in privacy_units(data)],
        f"- Trust model: {TRUST_MODEL}.",
        f"- δ = {data.delta_text()} per node. ε = ∞ means no DP: plain SGD, no clipping, no noise.",
        budget,
        *_network_unit_note(data),
        noise_note(data),
        "",
    ]


def _network_unit_note(data: SweepData) -> list[str]:
    """privacy-unit=network cells: their ε column is an observer class's, not the spend."""
    if not _has_values(data.cells, "network_min_distance"):
        return []
    far = sorted({int(d) for d in data.cells["network_min_distance"].dropna()})
    return [
        "- **Cells with `privacy-unit=network`** calibrate σ so that every observer at "
        f"graph distance ≥ {' or '.join(map(str, far))} gets at most ε; closer observers, "
        "and anyone holding a node's own releases, get more: `ε spent` below is that local "
        "ε, and each run's network_privacy.json has every distance's."
    ]


def _accuracy_section(data: SweepData, target: float | None, fraction: float) -> list[str]:
    text = ["## Final accuracy", ""]
    summary = final_summary(data)
    if summary.empty:
        return text + ["No completed cell yet.", ""]
    text += [
        markdown_table(*summary_rows(data, summary)),
        "",
        f"Final {data.split} accuracy: mean ± half-width of the 95% Student-t interval over "
        "seeds. "
        f"{data.seed_note()} ε spent is the largest over the nodes, averaged over seeds; "
        "wall time is per cell.",
        "",
    ]
    targets = choose_targets(data, target, fraction)
    text += ["## Rounds to reach the target accuracy", "", f"Target: {targets.how}.", ""]
    if not targets.values:
        return text
    table = rounds_table(data, targets)
    table = _ordered(data, table) if len(table) else table
    rows = [
        [
            *("" if _nan(r[k]) else str(r[k]) for k in data.by),
            eps_label(r["eps"]),
            f"{r['target'] * 100:.1f}",
            f"not reached in {r['max_round']}" if _nan(r["rounds"]) else str(int(r["rounds"])),
        ]
        for _, r in table.iterrows()
    ]
    return text + [
        markdown_table([*data.by, "ε", "target (%)", "rounds"], rows),
        "",
        "Counted on the seed-mean accuracy curve, one target for every series.",
        "",
    ]


def _figures_section(out: Path, drawn: list[Figure], skipped: list[Skipped]) -> list[str]:
    text = ["## Figures", ""]
    for fig in drawn:
        # Link only what was written and is there: a report never points at a missing file.
        files = {p.suffix: p.relative_to(out).as_posix() for p in fig.files if p.exists()}
        if ".png" in files:
            text += [f"### {fig.title}", "", f"![{fig.title}]({files['.png']})", ""]
        else:
            text += [f"### {fig.title}", ""]
        svg = f" ([SVG]({files['.svg']}))" if ".svg" in files else ""
        text += [f"{fig.caption}{svg}", ""]
    if skipped:
        text += ["Figures not drawn:", ""]
        text += [f"- `{s.name}`: {s.reason}." for s in skipped]
        text.append("")
    return text


def _failed_section(cells: list[dict[str, Any]]) -> list[str]:
    if not (failed := [c for c in cells if c["status"] == "failed"]):
        return []
    return [
        "## Failed cells",
        "",
        *[f"- `{c['id']}`: {(c.get('error') or '?').splitlines()[0]}" for c in failed],
        "",
        "Re-run the sweep's command with the same `--out` to retry them.",
        "",
    ]


def write_report(
    out: Path,
    *,
    target: float | None = None,
    fraction: float = TARGET_FRACTION,
    figures: tuple[list[Figure], list[Skipped]] | None = None,
) -> Path:
    """Draw the figures (unless given) and write `<out>/report.md`."""
    drawn, skipped = figures if figures is not None else plot_all(out, target=target)
    data = SweepData.load(out)
    text = [
        f"# Privacy sweep `{data.manifest.get('name', out.name)}`",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from the stored results in this "
        "folder (`sweep.csv`, `manifest.json`, `runs/*/summary.json`); regenerate with "
        f"`fl-sweep report {display_path(out)}`.",
        "",
        *_setup_section(data.manifest),
        *_privacy_section(data),
        *_accuracy_section(data, target, fraction),
        *_figures_section(out, drawn, skipped),
        *_failed_section(data.manifest["cells"]),
    ]
    path = out / REPORT
    atomic_write_text(path, "\n".join(text).rstrip("\n") + "\n")
    return path
