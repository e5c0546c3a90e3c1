"""A sweep's stored results as the figures and the report read them (no figure drawn here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flower_app.config import RunConfig
from sim.analysis.style import LINESTYLES, MARKERS, PALETTE
from sim.analysis.tidy import (
    cell_table,
    eps_order,
    final_rows,
    read_manifest,
    read_tidy,
    series_keys,
    series_tuple,
)


@dataclass
class SweepData:
    """What the figures and the report read: the tidy table, per-cell facts, series keys."""

    out: Path
    manifest: dict[str, Any]
    tidy: pd.DataFrame
    cells: pd.DataFrame
    by: list[str]

    @classmethod
    def load(cls, out: Path) -> SweepData:
        """Read `<out>/{manifest.json, sweep.csv, runs/*/summary.json}`."""
        manifest = read_manifest(out)
        by = series_keys(manifest)
        tidy = read_tidy(out)
        for key in by:
            if key not in tidy:
                tidy[key] = np.nan
        return cls(out, manifest, tidy, cell_table(out, manifest), by)

    @property
    def finals(self) -> pd.DataFrame:
        """Last round of every completed cell."""
        return final_rows(self.tidy)

    @cached_property
    def series(self) -> list[tuple[Any, ...]]:
        """Distinct curves (strategy and other swept keys), in grid order."""
        seen: dict[tuple[Any, ...], None] = {}
        for _, row in self.tidy[self.by].iterrows():
            seen.setdefault(series_tuple(row, self.by), None)
        return list(seen)

    def label(self, series: Sequence[Any]) -> str:
        """`gossip (topology=ring)`."""
        extra = [f"{k}={v}" for k, v in zip(self.by[1:], series[1:], strict=True) if v is not None]
        return f"{series[0]} ({', '.join(extra)})" if extra else str(series[0])

    def style(self, series: Sequence[Any]) -> dict[str, Any]:
        """Colour, marker and line style of a series, stable across figures."""
        i = self.series.index(tuple(series))
        return {
            "color": PALETTE[i % len(PALETTE)],
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)],
        }

    def eps_style(self, eps: float) -> dict[str, Any]:
        """Colour, marker and line style of an ε, stable across figures."""
        i = eps_order(self.tidy["eps"]).index(eps)
        return {
            "color": PALETTE[i % len(PALETTE)],
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)],
        }

    def on_graphs(self, df: pd.DataFrame) -> pd.DataFrame:
        """Rows of cells whose summary.json names a topology (gossip, not FedAvg)."""
        if "topology_name" not in self.cells:
            return df
        graph = self.cells.loc[self.cells["topology_name"].notna(), "cell"]
        return df[df["cell"].isin(graph)]

    def rows_of(self, df: pd.DataFrame, series: Sequence[Any]) -> pd.DataFrame:
        """Rows of `df` belonging to `series` (None matches a key the strategy lacks)."""
        mask = pd.Series(True, index=df.index)
        for key, value in zip(self.by, series, strict=True):
            mask &= df[key].isna() if value is None else df[key] == value
        return df[mask]

    def seeds(self) -> list[int]:
        """The seeds of the completed cells, ascending."""
        return sorted({int(s) for s in self.tidy["seed"].dropna()}) if "seed" in self.tidy else []

    def interval_note(self) -> str:
        """What a band or bar is, with the seeds by name, to print inside a figure."""
        seeds = ", ".join(map(str, self.seeds())) or "?"
        counts = self.finals.groupby([*self.by, "eps"], dropna=False).size()
        if counts.empty or counts.max() < 2:
            return f"One run per cell (seed {seeds}): no interval."
        uneven = counts.min() < counts.max()
        spread = f"; {counts.min()} to {counts.max()} seeds a cell" if uneven else ""
        return f"Mean ± 95% Student-t interval over seeds {seeds}{spread}."

    def measure_note(self) -> str:
        """What each strategy's accuracy is the accuracy of, and on how many images."""
        parts = []
        for strategy in dict.fromkeys(self.tidy.get("strategy", pd.Series([], dtype=object))):
            params = _params(self.manifest, strategy)
            central = _central_images(params)
            if strategy != "gossip":
                parts.append(f"{strategy}: the global model on {central}")
                continue
            rows = self.tidy[self.tidy["strategy"] == strategy]
            if "node_acc_mean" not in rows or rows["node_acc_mean"].isna().all():
                parts.append(f"{strategy}: the average of all node models on {central}")
                continue
            nodes = _node_images(params)
            parts.append(
                f"{strategy}: mean over the nodes of each node's own model, each on {nodes} "
                "(no global model exists)"
            )
        return f"Accuracy of what a node holds. {'; '.join(parts)}." if parts else ""

    def seed_note(self) -> str:
        """What the intervals are, and that there are none with a single seed."""
        counts = self.finals.groupby([*self.by, "eps"], dropna=False).size()
        if counts.empty or counts.max() < 2:
            return "One seed per cell, so no confidence interval is shown."
        if counts.min() < 2:
            return (
                "Bands and bars are 95% Student-t intervals over seeds where a cell has "
                f"at least two seeds ({counts.min()} to {counts.max()} seeds)."
            )
        return f"Mean over {counts.max()} seeds; bands and bars are 95% Student-t intervals."

    @cached_property
    def split(self) -> str:
        """What the runs' accuracy was scored on: `test`, `validation` (evaluate-on), or both."""
        column = self.cells.get("evaluate_on", pd.Series([], dtype=object)).dropna()
        splits = sorted(set(column)) or ["test"]
        return splits[0] if len(splits) == 1 else f"{' or '.join(splits)} (per cell)"

    def delta_text(self) -> str:
        """δ as a label fragment."""
        # A cell that does not set delta ran with the run config's default.
        column = self.cells.get("delta", pd.Series([None] * len(self.cells), dtype=float))
        deltas = sorted({float(d) for d in column.fillna(RunConfig().delta)})
        return ", ".join(f"{d:g}" for d in deltas) if deltas else f"{RunConfig().delta:g}"


# Test-set sizes of the datasets a run can name (`dataset`).
TEST_IMAGES = {"fashion-mnist": 10_000, "mnist": 10_000}


def _params(manifest: dict[str, Any], strategy: str) -> dict[str, Any]:
    """The run config of a strategy's first cell, with the run config's defaults filled in."""
    default = RunConfig()
    cells = manifest.get("cells", [])
    mine = [c for c in cells if c.get("coords", {}).get("strategy") == strategy]
    params = mine[0].get("params", {}) if mine else {}
    keys = ("dataset", "evaluate-on", "test-samples", "validation-samples", "node-eval-samples")
    return {k: params.get(k, getattr(default, k.replace("-", "_"))) for k in keys}


def _central_count(params: dict[str, Any]) -> int | None:
    """Images the central evaluation scores (None: the whole test set of an unknown size)."""
    if params["evaluate-on"] == "validation":
        return int(params["validation-samples"])
    total = TEST_IMAGES.get(str(params["dataset"]))
    cap = int(params["test-samples"])
    if total is None:
        return cap or None
    return min(cap, total) if cap else total


def _split_word(params: dict[str, Any]) -> str:
    return "validation" if params["evaluate-on"] == "validation" else "test"


def _central_images(params: dict[str, Any]) -> str:
    """`the 10,000 test images`."""
    n = _central_count(params)
    split = _split_word(params)
    return f"the whole {split} set" if n is None else f"the {n:,} {split} images"


def _node_images(params: dict[str, Any]) -> str:
    """`1,000 test images`: the per-node subset (`node-eval-samples`, 0 = all)."""
    n, cap = _central_count(params), int(params["node-eval-samples"])
    if cap == 0 or (n is not None and cap >= n):
        return _central_images(params)
    return f"{cap:,} {_split_word(params)} images"
