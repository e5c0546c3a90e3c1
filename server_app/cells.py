"""A sweep in one Flower run: the ServerApp runs each cell of the `cells` list in turn.

Each cell runs exactly as `flwr run . --run-config <its keys>` would (same checks, same
results folder); only the start-up (simulation process, Ray actors, imports) is shared. Its
messages carry the cell's id and keys (`CellGrid`), so the nodes train, account and keep
their ledgers per cell. A failed cell is recorded and the next one runs; the sweep reads the
status file (flower_app/cells.py) to learn each cell's end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import ERROR, INFO
from typing import Any

from flwr.app import ConfigRecord, Message
from flwr.common import log
from flwr.serverapp import Grid

from flower_app.cells import (
    COMPLETED,
    FAILED,
    Cell,
    cell_run_config,
    read_cells,
    record_status,
)
from flower_app.config import ConfigError
from flower_app.wire import CELL, CELL_ID
from server_app.rejections import RunRejected, fail


class CellGrid:
    """Wraps a Grid: every message it sends carries the cell's id and run-config keys."""

    def __init__(self, grid: Grid, cell: Cell) -> None:
        """Tag the messages of `cell` sent through `grid`."""
        self._grid, self._cell = grid, cell

    def _tagged(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            msg.content[CELL] = ConfigRecord({CELL_ID: self._cell.id, **self._cell.run_config})
        return messages

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push the tagged messages."""
        return self._grid.push_messages(self._tagged(messages))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send the tagged messages and wait for their replies."""
        return self._grid.send_and_receive(self._tagged(messages), timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped grid's."""
        return getattr(self._grid, name)


def run_cells(
    grid: Grid,
    run_config: Mapping[str, Any],
    run_one: Callable[[Grid, Mapping[str, Any]], None],
) -> None:
    """`run_one` each cell of the run's `cells` list; record how each ended, then the next."""
    path = str(run_config["cells"])
    try:
        cells = read_cells(path)
    except ConfigError as err:
        fail(f"invalid run: {err}")
    for i, cell in enumerate(cells, 1):
        log(INFO, "Cell %d of %d: %s", i, len(cells), cell.id)
        t0 = time.monotonic()
        status, error = COMPLETED, None
        try:
            run_one(CellGrid(grid, cell), cell_run_config(run_config, cell))
        except RunRejected as err:  # already logged as its one line
            status, error = FAILED, str(err)
        except Exception as err:  # noqa: BLE001 - one cell's failure must not stop the others
            log(ERROR, "Cell %s failed", cell.id, exc_info=True)
            status, error = FAILED, f"{type(err).__name__}: {err}"
        record_status(path, cell.id, status, error, time.monotonic() - t0)
