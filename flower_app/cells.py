"""Many experiments in one Flower run: a sweep's cell list, and the status the ServerApp keeps.

A Flower simulation pays its start-up (the CLI, the simulation process, Ray actors importing
torch and Opacus) once per run. `fl-sweep` therefore hands the ServerApp a list of cells (the
run-config key `cells`, a JSON file written by `write_cells`); the ServerApp runs them one
after another, each exactly as `flwr run . --run-config <the cell's keys>` would, into its own
results folder, and records each cell's end in `<list>.status.json` (`record_status`), which
the sweep watches. Each message of a cell carries the cell's id and keys (`wire.CELL`), so a
node trains, accounts and keeps its ledger per cell, as for a run of its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flower_app.config import ConfigError
from flower_app.results import atomic_write_text

FORMAT = 1
STATUS_SUFFIX = ".status.json"
COMPLETED, FAILED = "completed", "failed"


@dataclass(frozen=True)
class Cell:
    """One experiment of a cell list: its id and its run-config keys."""

    id: str
    run_config: dict[str, Any]


def write_cells(path: Path, cells: Sequence[Cell]) -> None:
    """Write the cell list the ServerApp reads (`cells` run-config key), atomically."""
    data = {"format": FORMAT, "cells": [{"id": c.id, "run-config": c.run_config} for c in cells]}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")  # inf as Infinity: exact


def read_cells(path: str | Path) -> list[Cell]:
    """The cell list at `path`; ConfigError (one line) if it is missing or malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        cells = [Cell(str(c["id"]), dict(c["run-config"])) for c in data["cells"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"cells={str(path)!r}: not a readable cell list ({type(err).__name__}: {err}); "
            "valid: '' (one experiment) or a file fl-sweep wrote"
        ) from None
    if data.get("format") != FORMAT or len({c.id for c in cells}) != len(cells):
        raise ConfigError(f"cells={str(path)!r}: format {FORMAT} with distinct ids expected")
    return cells


def cell_run_config(base: Mapping[str, Any], cell: Cell) -> dict[str, Any]:
    """The run config of `cell`: the run's keys, the cell's over them, and no further list."""
    return {**base, **cell.run_config, "cells": ""}


def status_path(cells_path: str | Path) -> Path:
    """Where the ServerApp records which cells of `cells_path` ended, and how."""
    path = Path(cells_path)
    return path.with_name(path.name + STATUS_SUFFIX)


def read_status(cells_path: str | Path) -> dict[str, dict[str, Any]]:
    """{cell id: {"status", "error", "wall_s"}} for each cell that ended so far."""
    try:
        return dict(json.loads(status_path(cells_path).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}  # nothing ended yet (the file is replaced atomically, never half-written)


def record_status(
    cells_path: str | Path, cell_id: str, status: str, error: str | None, wall_s: float
) -> None:
    """Add one ended cell to the status file, atomically (the ServerApp is its only writer)."""
    ended = read_status(cells_path)
    ended[cell_id] = {"status": status, "error": error, "wall_s": round(wall_s, 3)}
    atomic_write_text(status_path(cells_path), json.dumps(ended, indent=2) + "\n")
