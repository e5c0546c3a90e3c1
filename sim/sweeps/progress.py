"""A running sweep's progress: a bar of cells and a bar of rounds, with an ETA."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sim.sweeps.spec import Cell


def progress_columns() -> tuple[Any, ...]:
    """A bar's columns: spinner, name, bar, done of total, elapsed, ETA."""
    return (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )


class Bars:
    """A sweep's two progress bars (cells, rounds) and the cells running now."""

    def __init__(self, progress: Progress, *, cells: int, skipped: int, todo: list[Cell]) -> None:
        """Add both bars; the rounds bar counts only the cells still to run."""
        self.progress = progress
        self.cells = progress.add_task("cells", total=cells, completed=skipped)
        self.rounds = progress.add_task("rounds", total=sum(c.rounds for c in todo))
        self.running: dict[str, Cell] = {}
        self.finished = 0  # rounds of the cells finished so far

    def start(self, cell: Cell) -> None:
        """`cell` is running: name it on the cells bar."""
        self.running[cell.id] = cell
        self.progress.update(self.cells, description=f"cell {', '.join(self.running)}")

    def stop(self, cell: Cell) -> None:
        """`cell` is no longer running."""
        self.running.pop(cell.id, None)

    def show_rounds(self, rounds_done: Callable[[Cell], int]) -> None:
        """The rounds of finished cells plus those the running cells have done so far."""
        now = sum(min(rounds_done(c), c.rounds) for c in self.running.values())
        self.progress.update(self.rounds, completed=self.finished + now)

    def finish(self, cell: Cell) -> None:
        """`cell` ended (completed or failed): all its rounds count, and one more cell."""
        self.finished += cell.rounds
        self.progress.update(self.rounds, completed=self.finished)
        self.progress.advance(self.cells)
