"""A sweep: its grid of cells, run into one folder, resumable from its manifest.

`<out>/manifest.json` lists every cell with its status and is rewritten atomically after each
cell, `<out>/sweep.csv` is rebuilt from the completed cells, and each cell's results live in
`<out>/runs/<cell id>/`. Re-running the same command with the same `--out` skips completed
cells and re-runs failed or interrupted ones, so killing the sweep loses no completed cell.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from flower_app.results import (
    CONFIG,
    ROUNDS,
    SUMMARY,
    RunSummary,
    atomic_write_text,
    is_completed,
    to_json,
    write_json,
)
from sim.analysis.tidy import MANIFEST, RUNS, write_tidy
from sim.launch.flwr_cli import RunOutcome
from sim.sweeps.progress import Bars, progress_columns
from sim.sweeps.runners import Runner, SuperLinkDown
from sim.sweeps.spec import (
    Cell,
    SweepError,
    SweepSpec,
    swept_keys,
)

log = logging.getLogger(__name__)

PENDING, COMPLETED, FAILED = "pending", "completed", "failed"
LOGS = "logs"
FORMAT = 1


def _plain(data: Any) -> Any:
    """As the manifest stores it (inf as "inf"), so old and new grids compare equal."""
    return json.loads(to_json(data))


def grid_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """First difference between two manifests' grids (nodes and cells), or None."""
    if old.get("nodes") != new["nodes"]:
        return f"nodes {old.get('nodes')} there, {new['nodes']} now"
    before = {c["id"]: c["params"] for c in old.get("cells", [])}
    after = {c["id"]: c["params"] for c in new["cells"]}
    for label, ids in (
        ("not in it", after.keys() - before),
        ("missing now", before.keys() - after),
    ):
        if ids:
            shown = sorted(ids)
            more = f" (+{len(shown) - 3} more)" if len(shown) > 3 else ""
            return f"cells {label}: {', '.join(shown[:3])}{more}"
    for cid, params in after.items():
        if params != before[cid]:
            key = next(
                k
                for k in sorted(params.keys() | before[cid].keys())
                if params.get(k) != before[cid].get(k)
            )
            return f"cell {cid}: {key}={before[cid].get(key)!r} there, {params.get(key)!r} now"
    return None


def judge(outcome: RunOutcome, folder: Path) -> str | None:
    """Why a cell is not completed (None if it is): Flower's status AND the run's summary."""
    if not outcome.completed:
        details = outcome.details.strip()
        return f"{outcome.status}: {details}" if details else outcome.status
    summary = RunSummary.read(folder)
    if summary is None:
        return f"Flower reported {outcome.status} but {SUMMARY} is missing or unreadable"
    if not summary.completed:
        return f"Flower reported {outcome.status} but {SUMMARY} says {summary.status!r}"
    if not (folder / ROUNDS).is_file():
        return f"Flower reported {outcome.status} but {ROUNDS} is missing"
    return None


class Sweep:
    """A grid of cells run one after another into `out`, resumable from its manifest."""

    def __init__(
        self,
        out: Path,
        spec: SweepSpec,
        cells: Sequence[Cell],
        *,
        name: str = "sweep",
        command: str = "",
        description: str = "",
    ) -> None:
        """Plan the sweep; refuse (SweepError) if `out` holds a different grid.

        `description`: what the sweep is (a preset's), for the report.
        """
        self.out, self.spec, self.cells = out, spec, list(cells)
        self.name, self.command, self.description = name, command, description
        self.created = datetime.now(UTC).isoformat(timespec="seconds")
        self.entries: dict[str, dict[str, Any]] = {
            c.id: {
                "id": c.id,
                "params": c.params,
                "coords": c.coords,
                "status": PENDING,
                "error": None,
                "run_id": None,
                "wall_s": None,
            }
            for c in self.cells
        }
        self._lock = threading.RLock()  # entries and the files written from them
        self._stopping = threading.Event()
        self._resume()

    def folder(self, cell_id: str) -> Path:
        """The cell's run folder (results-dir/run-name)."""
        return self.out / RUNS / cell_id

    def manifest(self) -> dict[str, Any]:
        """The manifest as written to disk."""
        return {
            "format": FORMAT,
            "name": self.name,
            "command": self.command,
            "description": self.description,
            "created": self.created,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            **self.spec.to_dict(),
            "results_dir": RUNS,
            "cells": [self.entries[c.id] for c in self.cells],
        }

    def _resume(self) -> None:
        path = self.out / MANIFEST
        if not path.exists():
            return
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise SweepError(f"{path} is unreadable; choose another --out") from None
        if diff := grid_difference(old, _plain(self.manifest())):
            raise SweepError(
                f"{self.out} holds a different sweep ({diff}); repeat its command "
                f"(see {MANIFEST}) or choose another --out"
            )
        self.created = old.get("created", self.created)
        for entry in old["cells"]:
            mine = self.entries[entry["id"]]
            done = _completed_run(self.folder(entry["id"]))
            kept = {k: entry.get(k) for k in ("status", "error", "run_id", "wall_s")}
            if entry["status"] == COMPLETED and done:
                mine |= kept
            elif entry["status"] == PENDING and done and self._same_run(mine):
                # Killed after the run finished but before the manifest said so.
                mine |= kept | {"status": COMPLETED}
            elif entry["status"] == FAILED:
                mine |= kept

    def _same_run(self, entry: Mapping[str, Any]) -> bool:
        try:
            config = json.loads((self.folder(entry["id"]) / CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        params = _plain(entry["params"])
        return config.get("num-nodes") == self.spec.nodes and all(
            config.get(k) == v for k, v in params.items()
        )

    def save(self) -> None:
        """Rewrite manifest.json and rebuild sweep.csv, each atomically."""
        write_json(self.out / MANIFEST, self.manifest())
        write_tidy(self.out, list(self.entries.values()), swept_keys(self.spec))

    def status(self, cell_id: str) -> str:
        """pending, completed or failed."""
        return str(self.entries[cell_id]["status"])

    @property
    def todo(self) -> list[Cell]:
        """Cells not completed yet, in grid order."""
        return [c for c in self.cells if self.status(c.id) != COMPLETED]

    @property
    def failed(self) -> list[str]:
        """Ids of the failed cells, in grid order."""
        return [c.id for c in self.cells if self.status(c.id) == FAILED]

    def rounds_done(self, cell: Cell) -> int:
        """Rows the cell's rounds.csv holds so far (it is rewritten atomically)."""
        try:
            text = (self.folder(cell.id) / ROUNDS).read_text(encoding="utf-8")
        except OSError:
            return 0
        return max(0, len(text.strip().splitlines()) - 1)

    def run(self, runner: Runner | Sequence[Runner], console: Console | None = None) -> list[str]:
        """Run every cell not completed yet; return the ids of failed cells.

        With several runners (one per SuperLink and Ray cluster), that many cells run at
        once, each on a free runner. An interrupt (or a runner that raises) stops the
        others at their next poll; their cells stay pending, so a resume re-runs them.
        """
        runners = list(runner) if isinstance(runner, Sequence) else [runner]
        console = console or Console(stderr=True, log_path=False)
        self.save()
        todo = self.todo
        if skipped := len(self.cells) - len(todo):
            console.log(f"{skipped} of {len(self.cells)} cells already completed: skipped")
        for cell in todo:  # a failed or interrupted attempt's folder
            shutil.rmtree(self.folder(cell.id), ignore_errors=True)
        self._stopping.clear()
        with Progress(*progress_columns(), console=console) as progress:
            bars = Bars(progress, cells=len(self.cells), skipped=skipped, todo=todo)
            self._run_all(todo, runners, bars, console)
        return self.failed

    def _run_all(
        self, todo: list[Cell], runners: list[Runner], bars: Bars, console: Console
    ) -> None:
        """Run `todo`, each cell on the next free runner; log each as it finishes."""
        free: queue.Queue[Runner] = queue.Queue()
        for r in runners:
            free.put(r)
        lanes = self._lanes(todo, runners)

        def one(cell: Cell) -> Cell:
            slot = lanes[cell.id] if lanes else free.get()
            try:
                if self._stopping.is_set():  # an earlier cell was interrupted: stay pending
                    raise _Cancelled
                with self._lock:
                    bars.start(cell)
                self._run_cell(cell, slot, lambda: self._poll(bars))
                return cell
            except BaseException:
                self._stopping.set()  # before this thread takes its next cell
                raise
            finally:
                with self._lock:
                    bars.stop(cell)
                if not lanes:
                    free.put(slot)

        # One thread per lane (its cells in order), or a shared pool taking the free runner.
        workers, count = (1, len(runners)) if lanes else (len(runners), 1)
        pools = [ThreadPoolExecutor(workers, thread_name_prefix="cell") for _ in range(count)]
        try:
            futures = [
                pools[runners.index(lanes[c.id]) if lanes else 0].submit(one, c) for c in todo
            ]
            for i, future in enumerate(as_completed(futures), 1):
                cell = future.result()
                bars.finish(cell)
                self._log_outcome(console, cell, f"[{i}/{len(todo)}]")
        except BaseException:
            self._stopping.set()  # the other cells stop at their next poll, pending
            raise
        finally:
            for pool in pools:
                pool.shutdown(wait=True, cancel_futures=True)

    def _lanes(self, todo: list[Cell], runners: list[Runner]) -> dict[str, Runner]:
        """Each cell's runner when the runners plan ahead (`BatchedRunner`), else {}.

        A planning runner gets a fixed share of `todo`, in order; other runners take the next
        cell whenever they are free.
        """
        if not all(hasattr(r, "plan") for r in runners):
            return {}
        lanes = {c.id: runners[i % len(runners)] for i, c in enumerate(todo)}
        for r in runners:
            r.plan([self.run_config(c) for c in todo if lanes[c.id] is r])  # type: ignore[attr-defined]
        return lanes

    def run_config(self, cell: Cell) -> dict[str, Any]:
        """The run-config keys of `cell`: its parameters, its folder under `<out>/runs`."""
        return {**cell.params, "results-dir": str(self.out / RUNS), "run-name": cell.id}

    def _poll(self, bars: Bars) -> None:
        """A running cell's poll: stop it if the sweep stops, else show the rounds done."""
        if self._stopping.is_set():
            raise _Cancelled
        with self._lock:
            bars.show_rounds(self.rounds_done)

    def _log_outcome(self, console: Console, cell: Cell, counter: str) -> None:
        """One line per finished cell: its status, its first error line, its wall time."""
        entry = self.entries[cell.id]
        outcome = entry["status"]
        if entry["error"]:
            outcome += f": {entry['error'].splitlines()[0]}"
        console.log(
            f"{counter} {cell.id} {outcome} ({entry['wall_s']:.0f}s)",
            markup=False,
            highlight=False,
        )

    def _run_cell(self, cell: Cell, runner: Runner, on_poll: Callable[[], None]) -> None:
        entry = self.entries[cell.id]
        folder = self.folder(cell.id)
        with self._lock:
            entry |= {"status": PENDING, "error": None, "run_id": None, "wall_s": None}
            self.save()
        run_config = self.run_config(cell)
        t0 = time.monotonic()
        try:
            outcome = runner(run_config, num_nodes=self.spec.nodes, on_poll=on_poll)
        except SuperLinkDown:
            raise
        except Exception as err:  # noqa: BLE001 - one cell's failure must not stop the sweep
            if self._stopping.is_set():  # stopped from outside: stays pending
                raise _Cancelled from err
            outcome = RunOutcome("", "finished:failed", f"{type(err).__name__}: {err}", 0.0)
        error = judge(outcome, folder)
        with self._lock:
            entry |= {
                "status": FAILED if error else COMPLETED,
                "error": error,
                "run_id": outcome.run_id or None,
                "wall_s": round(time.monotonic() - t0, 3),
            }
        if error and outcome.run_id and hasattr(runner, "logs"):
            try:
                atomic_write_text(self.out / LOGS / f"{cell.id}.log", runner.logs(outcome.run_id))
            except Exception as err:  # noqa: BLE001 - a missing log must not fail the sweep
                log.warning("could not save the log of %s: %s", cell.id, err)
        with self._lock:
            self.save()


class _Cancelled(BaseException):
    """Raised in a cell's poll once the sweep stops: the cell is left pending."""


def _completed_run(folder: Path) -> bool:
    """Whether `folder` holds a finished run the tidy table can be built from."""
    return (folder / ROUNDS).is_file() and is_completed(folder)
