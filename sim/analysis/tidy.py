"""The tidy sweep table (one row per cell × round) and the statistics over seeds.

`sweep.csv` is rebuilt from the completed cells' `rounds.csv` files, never appended to, so it
cannot hold duplicate or half rows. Metric columns are read from the files, so columns a
strategy adds (gossip's consensus distance, ...) appear without code changes here.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from flower_app.results import CONFIG, ROUNDS, RunSummary, atomic_write_text, csv_text
from sim.analysis.names import CORE, MANIFEST, RUNS, TIDY

ID_COLUMNS = ("cell", *CORE)
CONFIDENCE = 0.95


# The accuracy compared across strategies: the mean over nodes of the model each node holds
# (rounds.csv's node_acc_mean). For FedAvg that is the global model (it equals `accuracy`);
# for gossip no global model exists and `accuracy` (of the average of all node models) is
# only a diagnostic. Results without node_acc_mean fall back to `accuracy`.
HEADLINE = "held_accuracy"


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Mean and half-width of the Student-t interval; half-width is NaN below two values."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, float(stats.t.ppf(0.5 + confidence / 2, df=x.size - 1)) * sem


def tidy_columns(coord_keys: Sequence[str], metric_columns: Iterable[str]) -> list[str]:
    """cell, strategy, eps, seed, other swept keys, round, then the metrics (no repeats)."""
    columns = list(ID_COLUMNS) + [k for k in coord_keys if k not in ID_COLUMNS] + ["round"]
    for col in metric_columns:
        if col not in columns:
            columns.append(col)
    return columns


def write_tidy(out: Path, cells: Sequence[Mapping[str, Any]], coord_keys: Sequence[str]) -> int:
    """Rewrite `<out>/sweep.csv` atomically from the completed cells; return its row count.

    `cells` are manifest entries (id, coords, status) in grid order; `coord_keys` are the
    swept keys, so the header is stable even before any gossip cell has finished.
    """
    rows: list[dict[str, Any]] = []
    metrics: list[str] = []
    for cell in cells:
        if cell["status"] != "completed":
            continue
        path = out / RUNS / cell["id"] / ROUNDS
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            metrics += [c for c in reader.fieldnames or [] if c not in metrics]
            cell_rows = list(reader)
        ids = {"cell": cell["id"]} | {k: _csv_value(v) for k, v in cell["coords"].items()}
        rows += [{**row, **ids} for row in cell_rows]
    columns = tidy_columns(coord_keys, metrics)
    atomic_write_text(out / TIDY, csv_text(rows, columns))
    return len(rows)


def _csv_value(value: Any) -> Any:
    return "inf" if value == "inf" or (isinstance(value, float) and math.isinf(value)) else value


def read_tidy(out: Path) -> pd.DataFrame:
    """`sweep.csv` as a DataFrame (eps as float, inf for no DP)."""
    df = pd.read_csv(out / TIDY)
    if "eps" in df:
        df["eps"] = df["eps"].astype(float)
    if "accuracy" in df:
        held = df["node_acc_mean"] if "node_acc_mean" in df else pd.Series(float("nan"), df.index)
        df[HEADLINE] = held.fillna(df["accuracy"])
    return df


def read_manifest(out: Path) -> dict[str, Any]:
    """The sweep's manifest.json."""
    return json.loads((out / MANIFEST).read_text(encoding="utf-8"))


def series_keys(manifest: Mapping[str, Any]) -> list[str]:
    """Columns that tell one curve from another: strategy plus swept keys other than ε, seed."""
    swept = [k.rpartition(":")[2] for k in manifest.get("swept", {})]
    swept += [k.rpartition(":")[2] for v in manifest.get("variants", []) for k in v]
    return ["strategy", *[k for k in dict.fromkeys(swept) if k not in CORE]]


def final_rows(tidy: pd.DataFrame) -> pd.DataFrame:
    """The last round of every cell."""
    if tidy.empty:
        return tidy
    last = tidy.groupby("cell")["round"].transform("max")
    return tidy[tidy["round"] == last].reset_index(drop=True)


def summarize(finals: pd.DataFrame, by: Sequence[str], metric: str | None = None) -> pd.DataFrame:
    """Per group: seeds, mean ± CI half-width of `metric`, mean ε spent and wall time.

    `metric` defaults to HEADLINE (falling back to `accuracy` for results without it).
    """
    if metric is None:
        metric = HEADLINE if HEADLINE in finals else "accuracy"
    out = []
    for key, group in finals.groupby(list(by), dropna=False, sort=False):
        mean, half = t_interval(group[metric])
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        row |= {"n": len(group), "mean": mean, "half": half}
        for col in ("eps_spent", "wall_s"):
            row[col] = float(group[col].mean()) if col in group else math.nan
        out.append(row)
    return pd.DataFrame(out, columns=[*by, "n", "mean", "half", "eps_spent", "wall_s"])


def curve(tidy: pd.DataFrame, by: Sequence[str], metric: str) -> pd.DataFrame:
    """Per group and round: seeds, mean and CI half-width of `metric`."""
    out = []
    data = tidy.dropna(subset=[metric])
    for key, group in data.groupby([*by, "round"], dropna=False, sort=True):
        mean, half = t_interval(group[metric])
        row = dict(zip([*by, "round"], key, strict=True))
        out.append(row | {"n": len(group), "mean": mean, "half": half})
    return pd.DataFrame(out, columns=[*by, "round", "n", "mean", "half"])


def eps_order(values: Iterable[float]) -> list[float]:
    """ε from least to most private: ∞ (no DP) first, then descending."""
    return sorted(set(values), key=lambda e: -e)


def cell_table(out: Path, manifest: Mapping[str, Any]) -> pd.DataFrame:
    """One row per cell: coordinates, status, error and summary facts (topology flattened)."""
    rows = []
    for cell in manifest["cells"]:
        row: dict[str, Any] = {"cell": cell["id"], **cell["coords"]}
        row |= {"status": cell["status"], "error": cell.get("error")}
        summary = RunSummary.read(out / RUNS / cell["id"]) or RunSummary(status="missing")
        row["final_accuracy"] = summary.final_accuracy
        # What a node holds (gossip: its own model) when the run says.
        if summary.final_node_accuracy is not None:
            row["final_accuracy"] = summary.final_node_accuracy
        row["eps_spent"] = summary.eps_spent if summary.status != "missing" else None
        row["wall_s"] = summary.wall_s
        privacy = summary.privacy
        row["delta"] = privacy.get("delta")
        row["privacy_unit"] = privacy.get("unit")
        row["eps_per_round_claimed"] = privacy.get("eps_per_round_claimed")
        # privacy-unit=network: ε is the target beyond this distance, not each node's spend.
        row["network_min_distance"] = (privacy.get("network_plan") or {}).get("min_distance")
        row["noise_seed"] = privacy.get("noise_seed")
        row["noise"] = privacy.get("noise")  # absent in runs from before noise was secret
        row["evaluate_on"] = _evaluated_on(out / RUNS / cell["id"])
        for key, value in (summary.topology or {}).items():
            row[f"topology_{key}"] = value
        rows.append(row)
    df = pd.DataFrame(rows)
    if "eps" in df:
        df["eps"] = df["eps"].astype(float)
    return df


def _evaluated_on(folder: Path) -> str | None:
    """The split a run's central evaluation scored (`test` in runs from before the key)."""
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return str(config.get("evaluate-on", "test"))


def rounds_to_target(
    curves: pd.DataFrame, by: Sequence[str], targets: Mapping[tuple[Any, ...], float]
) -> pd.DataFrame:
    """First round at which the seed-mean accuracy reaches the series' target (NaN: never)."""
    out = []
    for key, group in curves.groupby([*by, "eps"], dropna=False, sort=False):
        series, eps = tuple(_key(k) for k in key[:-1]), key[-1]
        target = targets.get(series)
        if target is None:
            continue
        hit = group[group["mean"] >= target]["round"]
        out.append(
            dict(zip(by, series, strict=True))
            | {
                "eps": eps,
                "target": target,
                "rounds": float(hit.min()) if len(hit) else math.nan,
                "max_round": int(group["round"].max()),
            }
        )
    return pd.DataFrame(out, columns=[*by, "eps", "target", "rounds", "max_round"])


def targets_from_nonprivate(
    summary: pd.DataFrame, by: Sequence[str], fraction: float = 0.9
) -> dict[tuple[Any, ...], float]:
    """`fraction` of each series' mean non-private (ε=∞) final accuracy."""
    ref = summary[np.isinf(summary["eps"].astype(float))]
    return {tuple(_key(r[k]) for k in by): fraction * r["mean"] for _, r in ref.iterrows()}


def _key(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def series_tuple(row: Mapping[str, Any], by: Sequence[str]) -> tuple[Any, ...]:
    """A hashable series key where NaN (key not used by that strategy) becomes None."""
    return tuple(_key(row[k]) for k in by)
