"""`fl-sweep tune`: each (strategy, ε) cell at its best, chosen on validation data only.

Stage 1 (`<out>/search/`, a sweep folder) runs every candidate of a small search space for
every cell of the grid with `evaluate-on=validation`: those runs score the validation split
carved off the training set and never touch the test set. Each cell's candidate with the
best final validation accuracy of what a node holds (FedAvg: the global model; gossip: the
mean over nodes of each node's own model) is chosen (`<out>/tune.json`). Stage 2
(`<out>/final/`, a sweep folder) runs each choice with the grid's seeds on the test set.
Both stages resume like `fl-sweep run`; the choice is made only once every search run has
completed, so a resumed tune never changes its mind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from flower_app.results import format_eps, write_json
from sim.analysis.tidy import CORE, HEADLINE, read_tidy
from sim.sweeps.runner import COMPLETED, Sweep
from sim.sweeps.spec import Cell, SweepError, SweepSpec, expand, make_cell, split_scope, swept_keys

SEARCH, FINAL = "search", "final"
CHOICES = "tune.json"
# Keys that change nothing without DP: not searched at eps=inf (their runs would repeat).
DP_ONLY = ("max-grad-norm",)


@dataclass
class TuneSpec:
    """The grid to tune (its seeds are the final runs'), the search space, the search seeds."""

    base: SweepSpec
    search: dict[str, list[Any]] = field(default_factory=dict)
    tune_seeds: list[int] = field(default_factory=list)

    def final_seeds(self) -> list[int]:
        """The seeds each chosen configuration is run with on the test set."""
        if "seed" in self.base.grid:
            return [int(s) for s in self.base.grid["seed"]]
        return [int(self.base.fixed.get("seed", 7))]

    def search_seeds(self) -> list[int]:
        """The seeds of the search runs (default: the first final seed)."""
        return self.tune_seeds or self.final_seeds()[:1]


@dataclass(frozen=True)
class Group:
    """One cell of the grid without its seed: what gets its own choice."""

    key: str  # its cell id without the seed, e.g. `fedavg-eps8`
    coords: dict[str, Any]  # strategy, eps and the grid's other swept keys
    params: dict[str, Any]  # its full run-config overrides, seed left out


def _seedless(cell_id: str, seed: Any) -> str:
    return cell_id.replace(f"-seed{seed}", "", 1)


def groups(tune: TuneSpec) -> list[Group]:
    """The grid's cells with one seed, each standing for all its seeds."""
    spec = tune.base.copy()
    seed = tune.final_seeds()[0]
    spec.sweep("seed", [seed])
    seeded_noise = "noise-seed" in spec.fixed or "noise-seed" in spec.grid
    out = []
    for cell in expand(spec):
        params = {k: v for k, v in cell.params.items() if k != "seed"}
        if not seeded_noise:
            params.pop("noise-seed", None)  # the sweep seeds noise per cell from its seed
        coords = {k: v for k, v in cell.coords.items() if k != "seed"}
        out.append(Group(_seedless(cell.id, seed), coords, params))
    return out


def _check_search(tune: TuneSpec) -> None:
    if not tune.search:
        raise SweepError("fl-sweep tune needs a search space: --search KEY=V1,V2 (repeatable)")
    for key, values in tune.search.items():
        scope, name = split_scope(key)
        if name in ("strategy", "eps", "seed", "evaluate-on", "validation-samples"):
            raise SweepError(f"--search {key}: {name} is not a hyperparameter to tune")
        if not values:
            raise SweepError(f"--search {key}= has no values")
        if name in tune.base.grid or any(split_scope(k)[1] == name for k in tune.base.grid):
            raise SweepError(f"--search {key}: {name} is already swept in the grid")
    validation = tune.base.fixed.get("validation-samples", 0)
    if not isinstance(validation, int) or validation <= 0:
        raise SweepError(
            "fl-sweep tune needs a validation split to choose on: --set validation-samples=N "
            "(N > 0 training examples, carved off before partitioning)"
        )


def search_space(tune: TuneSpec, group: Group) -> dict[str, list[Any]]:
    """The keys and values searched for one group (its strategy's scoped keys included)."""
    strategy = group.coords["strategy"]
    private = math.isfinite(float(group.coords["eps"]))
    space: dict[str, list[Any]] = {}
    for key, values in tune.search.items():
        scope, name = split_scope(key)
        if scope not in (None, strategy) or (name in DP_ONLY and not private):
            continue
        space[name] = list(values)
    return space


def search_cells(tune: TuneSpec) -> tuple[SweepSpec, list[Cell]]:
    """The search stage: its manifest spec and every candidate run of every group."""
    _check_search(tune)
    cells: list[Cell] = []
    for group in groups(tune):
        # The group's own swept coordinates stay coordinates, so run ids never collide.
        own = {k: [v] for k, v in group.coords.items() if k not in CORE}
        spec = SweepSpec(
            fixed={k: v for k, v in group.params.items() if k not in own}
            | {"evaluate-on": "validation"},
            grid={**own, "seed": tune.search_seeds(), **search_space(tune, group)},
            nodes=tune.base.nodes,
        )
        cells += expand(spec)
    # What the manifest records: the grid's keys, the search seeds, the search space.
    spec = tune.base.copy()
    spec.set("evaluate-on", "validation")
    spec.sweep("seed", tune.search_seeds())
    for key, values in tune.search.items():
        spec.sweep(key, values)
    return spec, cells


def _candidate_key(cell: Mapping[str, Any], space: Sequence[str]) -> tuple[Any, ...]:
    return tuple(cell["params"].get(k) for k in space)


def choose(search: Sweep, tune: TuneSpec) -> list[dict[str, Any]]:
    """Each group's chosen hyperparameters, by final validation accuracy of what a node holds.

    Ties go to the candidate listed first. Raises SweepError unless every search run
    completed (a choice among some candidates could change on resume).
    """
    if pending := [c.id for c in search.cells if search.status(c.id) != COMPLETED]:
        raise SweepError(
            f"{len(pending)} search run(s) did not complete ({', '.join(pending[:3])}); "
            "re-run the same command to retry them before anything is chosen"
        )
    tidy = read_tidy(search.out)
    metric = HEADLINE if HEADLINE in tidy else "accuracy"
    last = tidy[tidy["round"] == tidy.groupby("cell")["round"].transform("max")]
    score = dict(zip(last["cell"], last[metric], strict=True))
    entries = [search.entries[c.id] for c in search.cells]
    out = []
    for group in groups(tune):
        space = list(search_space(tune, group))
        mine = [
            e
            for e in entries
            if all(e["params"].get(k) == v for k, v in group.params.items() if k != "noise-seed")
        ]
        candidates: dict[tuple[Any, ...], list[float]] = {}
        for e in mine:
            candidates.setdefault(_candidate_key(e, space), []).append(float(score[e["id"]]))
        ranked = [
            {"params": dict(zip(space, key, strict=True)), "validation_accuracy": _mean(accs)}
            for key, accs in candidates.items()
        ]
        best = max(ranked, key=lambda c: _sortable(c["validation_accuracy"]))
        out.append(
            {
                "group": group.key,
                "coords": group.coords,
                "chosen": best["params"],
                "validation_accuracy": best["validation_accuracy"],
                "candidates": ranked,
            }
        )
    return out


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _sortable(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def final_cells(tune: TuneSpec, choices: Sequence[Mapping[str, Any]]) -> list[Cell]:
    """Each group's choice with every final seed, scored on the test set."""
    chosen = {c["group"]: c["chosen"] for c in choices}
    swept = [k for k in swept_keys(tune.base) if k not in CORE]
    cells = []
    for group in groups(tune):
        for seed in tune.final_seeds():
            params = {**group.params, **chosen[group.key], "seed": seed, "evaluate-on": "test"}
            cells.append(make_cell(params, swept))
    return cells


def write_choices(out: Path, tune: TuneSpec, choices: Sequence[Mapping[str, Any]]) -> Path:
    """`<out>/tune.json`: the space, the seeds and every group's ranked candidates."""
    path = out / CHOICES
    write_json(
        path,
        {
            "chosen_by": "final-round validation accuracy of what a node holds (FedAvg: the "
            "global model; gossip: the mean over nodes of each node's own model)",
            "validation_samples": tune.base.fixed.get("validation-samples"),
            "search": tune.search,
            "search_seeds": tune.search_seeds(),
            "final_seeds": tune.final_seeds(),
            "groups": list(choices),
        },
    )
    return path


def chosen_table(choices: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per group: strategy, ε, the chosen values and their validation accuracy."""
    rows = []
    for c in choices:
        row = {"group": c["group"], **c["coords"], **c["chosen"]}
        row["validation_accuracy"] = c["validation_accuracy"]
        row["candidates"] = len(c["candidates"])
        rows.append(row)
    return pd.DataFrame(rows)


def describe(choice: Mapping[str, Any]) -> str:
    """`fedavg ε=8: lr=0.5 max-grad-norm=0.2 (validation 81.2%)`."""
    coords = choice["coords"]
    values = " ".join(f"{k}={v}" for k, v in choice["chosen"].items())
    return (
        f"{coords['strategy']} ε={format_eps(float(coords['eps']))}: {values} "
        f"(validation {choice['validation_accuracy'] * 100:.1f}%)"
    )
