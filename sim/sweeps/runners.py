"""How a sweep's cells reach Flower: a run per cell, or all of them in one Flower run.

`FlowerRunner` submits each cell as its own Flower run (`fl-sweep --run-per-cell`): every
cell pays Flower's start-up (the CLI, the simulation process, Ray actors importing torch and
Opacus). `BatchedRunner` (the default) submits, on its first call, one Flower run whose
ServerApp runs every planned cell in turn (the `cells` run-config key; server_app/cells.py),
and then answers each call from the status file that run keeps (flower_app/cells.py). Each
cell's results folder is written exactly as by a run of its own. When that run ends before a
cell did (it crashed, timed out or was stopped), the cell it was running fails and the next
call submits a new run with the cells still to come.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flower_app.cells import Cell, read_status, write_cells
from sim.launch.flwr_cli import FINISHED, MARKER_POLL_S, STATUS_EVERY_S, RunOutcome
from sim.launch.simulation import SimulationLink

BATCHES = "batches"  # <out>/batches/<n>.json: the cell lists handed to Flower


class Runner(Protocol):
    """Runs one cell to its end: Flower in production, a fake in unit tests."""

    def __call__(
        self, run_config: dict[str, Any], *, num_nodes: int, on_poll: Callable[[], None]
    ) -> RunOutcome:
        """Run with these run-config overrides; call `on_poll` while waiting."""
        ...


class SuperLinkDown(RuntimeError):
    """The SuperLink is gone, so every further cell would fail: stop the sweep."""


def ensure_running(link: SimulationLink) -> None:
    """Raise SuperLinkDown if `link`'s SuperLink process has ended."""
    if link.process is None or link.process.poll() is not None:
        raise SuperLinkDown(f"the SuperLink (PID {link.pid}) is no longer running")


class FlowerRunner:
    """Submits each cell to a running SimulationLink and waits for it."""

    def __init__(self, link: SimulationLink, timeout: float = 3600) -> None:
        """Use `link` (already started); stop a cell after `timeout` seconds."""
        self.link, self.timeout = link, timeout

    def __call__(
        self, run_config: dict[str, Any], *, num_nodes: int, on_poll: Callable[[], None]
    ) -> RunOutcome:
        """`flwr run` the cell and poll `flwr list` until it finishes."""
        ensure_running(self.link)
        run_id = self.link.submit(run_config, num_nodes=num_nodes)
        return self.link.wait(run_id, timeout=self.timeout, on_poll=on_poll)

    def logs(self, run_id: str) -> str:
        """The run's log, kept next to a failed cell's manifest entry."""
        return self.link.logs(run_id)


class Link(Protocol):
    """What a batch needs of a SuperLink (`SimulationLink`, or a test's shared one)."""

    def submit(self, run_config: Mapping[str, Any], *, num_nodes: int) -> str:
        """Start a run; its id."""
        ...

    def status(self, run_id: str) -> RunOutcome:
        """The run's status."""
        ...

    def flwr(self, *args: str, timeout: float = 120) -> Any:
        """A `flwr` command against this SuperLink."""
        ...

    @property
    def connection(self) -> str:
        """The connection name `flwr` commands use."""
        ...


@dataclass
class _Batch:
    run_id: str
    cells_path: Path
    ids: list[str]


class BatchedRunner:
    """Runs its planned cells in as few Flower runs as it can (one, when none crashes)."""

    def __init__(
        self,
        link: Link,
        folder: Path,
        timeout: float = 3600,
        check_link: Callable[[], None] | None = None,
    ) -> None:
        """Submit to `link`, keep cell lists in `folder`; fail a cell after `timeout` s.

        `check_link` raises when the SuperLink is gone (`runner.SuperLinkDown`).
        """
        self.link, self.folder, self.timeout = link, folder, timeout
        self.check_link = check_link or (lambda: None)
        self.planned: list[dict[str, Any]] = []
        self.batch: _Batch | None = None
        self.submitted = 0  # Flower runs started so far

    def plan(self, run_configs: Sequence[Mapping[str, Any]]) -> None:
        """The cells this runner will be asked for, in the order it will be asked."""
        self.planned = [dict(rc) for rc in run_configs]

    def __call__(
        self, run_config: dict[str, Any], *, num_nodes: int, on_poll: Callable[[], None]
    ) -> RunOutcome:
        """Wait for the cell `run_config` names; submit a run of it and those after it first."""
        self.check_link()
        cell_id = str(run_config["run-name"])
        if self.batch is None or cell_id not in self.batch.ids:
            self._submit(run_config, num_nodes)
        assert self.batch is not None
        try:
            return self._wait(self.batch, cell_id, on_poll)
        except BaseException:  # interrupted: the run must not go on training behind us
            self._stop(self.batch)
            raise

    def _submit(self, run_config: Mapping[str, Any], num_nodes: int) -> None:
        ids = [str(rc["run-name"]) for rc in self.planned]
        cell_id = str(run_config["run-name"])
        rest = self.planned[ids.index(cell_id) :] if cell_id in ids else [dict(run_config)]
        # Unique also across runners writing into one folder (--parallel-cells).
        path = self.folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
        write_cells(path, [Cell(str(rc["run-name"]), rc) for rc in rest])
        run_id = self.link.submit({"cells": str(path)}, num_nodes=num_nodes)
        self.submitted += 1
        self.batch = _Batch(run_id, path, [str(rc["run-name"]) for rc in rest])

    def _wait(self, batch: _Batch, cell_id: str, on_poll: Callable[[], None]) -> RunOutcome:
        """The cell's end from the status file; Flower's status now and then (a crash)."""
        deadline = time.monotonic() + self.timeout
        next_status, gap = time.monotonic() + 1.0, 1.0
        while True:
            if (ended := read_status(batch.cells_path).get(cell_id)) is not None:
                status = FINISHED + ended["status"]
                return RunOutcome(batch.run_id, status, ended.get("error") or "", ended["wall_s"])
            now = time.monotonic()
            if now >= next_status:
                run = self.link.status(batch.run_id)
                if run.status.startswith(FINISHED) and cell_id not in read_status(batch.cells_path):
                    self.batch = None  # the next call starts a new run with the cells left
                    details = run.details or "the sweep's Flower run ended before this cell did"
                    return RunOutcome(batch.run_id, FINISHED + "failed", details, run.elapsed_s)
                next_status, gap = now + gap, min(STATUS_EVERY_S, 2 * gap)
            if now > deadline:
                self._stop(batch)
                return RunOutcome(
                    batch.run_id, FINISHED + "timeout", f"timed out after {self.timeout}s", 0
                )
            on_poll()
            time.sleep(MARKER_POLL_S)

    def _stop(self, batch: _Batch) -> None:
        """Stop the batch's Flower run; the next call starts a new one."""
        self.batch = None
        try:
            self.link.flwr("stop", batch.run_id, self.link.connection)
        except Exception:  # noqa: BLE001 - a SuperLink already gone has stopped it too
            pass

    def logs(self, run_id: str) -> str:
        """The log of the whole run the cell was part of."""
        return str(self.link.logs(run_id))  # type: ignore[attr-defined]
