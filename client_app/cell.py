"""Which experiment a message belongs to: the run itself, or one cell of a sweep run.

A sweep runs many cells in one Flower run (flower_app/cells.py). Each message of a cell
carries the cell's id and run-config keys; the node then trains under the cell's config and
keeps its ledger and sealed-relay state under the cell's own key, exactly as for a run of
its own. The node's policy applies to a cell's config as to any run config.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message

from flower_app.cells import Cell, cell_run_config
from flower_app.wire import CELL, CELL_ID


def run_of(msg: Message, context: Context) -> tuple[dict[str, Any], str]:
    """The run config `msg` trains under, and the key the node keeps its run state under."""
    base = dict(context.run_config)
    if CELL not in msg.content:
        return base, str(context.run_id)
    record = msg.content[CELL]
    cell = Cell(str(record[CELL_ID]), {k: v for k, v in record.items() if k != CELL_ID})
    return cell_run_config(base, cell), f"{context.run_id}:{cell.id}"
