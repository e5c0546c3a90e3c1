"""`fl-sweep`: run a privacy sweep cell by cell on one simulation SuperLink; plot; report.

`<out>/manifest.json` lists every cell with its status and is rewritten atomically after each
cell, `<out>/sweep.csv` is rebuilt from the completed cells, and each cell's results live in
`<out>/runs/<cell id>/`. Re-running the same command with the same `--out` skips completed
cells and re-runs failed or interrupted ones, so killing the sweep loses no completed cell.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from flower_app.results import (
    CONFIG,
    ROUNDS,
    SUMMARY,
    atomic_write_text,
    resolve_results_dir,
    to_json,
    write_json,
)
from sim.compare import compare, compare_figure
from sim.flower_cli import RunOutcome, SimulationLink
from sim.grid import (
    PRESETS,
    Cell,
    SweepError,
    SweepSpec,
    expand,
    load_spec,
    parse_assignment,
    parse_value,
    parse_values,
    parse_variant,
    swept_keys,
)
from sim.plots import TARGET_FRACTION, SweepData, plot_all
from sim.report import final_summary, summary_rows, write_report
from sim.tidy import MANIFEST, RUNS, TIDY, write_tidy

log = logging.getLogger(__name__)

PENDING, COMPLETED, FAILED = "pending", "completed", "failed"
LOGS = "logs"
FORMAT = 1


class Runner(Protocol):
    """Runs one cell to its end: Flower in production, a fake in unit tests."""

    def __call__(
        self, run_config: dict[str, Any], *, num_nodes: int, on_poll: Callable[[], None]
    ) -> RunOutcome:
        """Run with these run-config overrides; call `on_poll` while waiting."""
        ...


class SuperLinkDown(RuntimeError):
    """The SuperLink is gone, so every further cell would fail: stop the sweep."""


class FlowerRunner:
    """Submits each cell to a running SimulationLink and waits for it."""

    def __init__(self, link: SimulationLink, timeout: float = 3600) -> None:
        """Use `link` (already started); stop a cell after `timeout` seconds."""
        self.link, self.timeout = link, timeout

    def __call__(
        self, run_config: dict[str, Any], *, num_nodes: int, on_poll: Callable[[], None]
    ) -> RunOutcome:
        """`flwr run` the cell and poll `flwr list` until it finishes."""
        if self.link.process is None or self.link.process.poll() is not None:
            raise SuperLinkDown(f"the SuperLink (PID {self.link.pid}) is no longer running")
        run_id = self.link.submit(run_config, num_nodes=num_nodes)
        return self.link.wait(run_id, timeout=self.timeout, on_poll=on_poll)

    def logs(self, run_id: str) -> str:
        """The run's log, kept next to a failed cell's manifest entry."""
        return self.link.logs(run_id)


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
    try:
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"Flower reported {outcome.status} but {SUMMARY} is missing or unreadable"
    if summary.get("status") != COMPLETED:
        return f"Flower reported {outcome.status} but {SUMMARY} says {summary.get('status')!r}"
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
    ) -> None:
        """Plan the sweep; refuse (SweepError) if `out` holds a different grid."""
        self.out, self.spec, self.cells = out, spec, list(cells)
        self.name, self.command = name, command
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

    def run(self, runner: Runner, console: Console | None = None) -> list[str]:
        """Run every cell not completed yet; return the ids of failed cells."""
        console = console or Console(stderr=True, log_path=False)
        self.save()
        todo = self.todo
        if skipped := len(self.cells) - len(todo):
            console.log(f"{skipped} of {len(self.cells)} cells already completed: skipped")
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as progress:
            cells_bar = progress.add_task("cells", total=len(self.cells), completed=skipped)
            rounds_bar = progress.add_task("rounds", total=sum(c.rounds for c in todo))
            before = 0
            for i, cell in enumerate(todo, 1):
                progress.update(cells_bar, description=f"cell {cell.id}")
                poll = partial(self._poll, progress, rounds_bar, cell, before)
                self._run_cell(cell, runner, poll)
                before += cell.rounds
                progress.update(rounds_bar, completed=before)
                progress.advance(cells_bar)
                entry = self.entries[cell.id]
                outcome = entry["status"]
                if entry["error"]:
                    outcome += f": {entry['error'].splitlines()[0]}"
                console.log(
                    f"[{i}/{len(todo)}] {cell.id} {outcome} ({entry['wall_s']:.0f}s)",
                    markup=False,
                    highlight=False,
                )
        return self.failed

    def _poll(self, progress: Progress, task: Any, cell: Cell, before: int) -> None:
        progress.update(task, completed=before + min(self.rounds_done(cell), cell.rounds))

    def _run_cell(self, cell: Cell, runner: Runner, on_poll: Callable[[], None]) -> None:
        entry = self.entries[cell.id]
        folder = self.folder(cell.id)
        if folder.exists():  # a failed or interrupted attempt
            shutil.rmtree(folder)
        entry |= {"status": PENDING, "error": None, "run_id": None, "wall_s": None}
        self.save()
        run_config = {**cell.params, "results-dir": str(self.out / RUNS), "run-name": cell.id}
        t0 = time.monotonic()
        try:
            outcome = runner(run_config, num_nodes=self.spec.nodes, on_poll=on_poll)
        except SuperLinkDown:
            raise
        except Exception as err:  # noqa: BLE001 - one cell's failure must not stop the sweep
            outcome = RunOutcome("", "finished:failed", f"{type(err).__name__}: {err}", 0.0)
        error = judge(outcome, folder)
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
        self.save()


def _completed_run(folder: Path) -> bool:
    """Whether `folder` holds a finished run the tidy table can be built from."""
    if not (folder / ROUNDS).is_file():
        return False
    try:
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return summary.get("status") == COMPLETED


# ---------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The `fl-sweep` command line."""
    parser = argparse.ArgumentParser(
        prog="fl-sweep",
        description="Privacy sweeps of FedAvg and gossip learning under DP-SGD, on Flower.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a sweep (resumable with the same --out)",
        description="Expand the grid (strategies × ε × seeds × --sweep keys), validate every "
        "cell, then run the cells one after another on one simulation SuperLink. Order of "
        "precedence: preset < SPEC.toml < --nodes/--strategies/--eps/--seeds/--rounds < --set "
        "< --sweep. Values parse like TOML (inf, 2, 0.5, true); bare words are strings. A key "
        "may be scoped to one strategy: --set gossip:topology=ring.",
    )
    run.add_argument("spec", nargs="?", type=Path, help="SPEC.toml: nodes, [fixed], [grid]")
    run.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="; ".join(f"{k}: {p.description}" for k, p in PRESETS.items()),
    )
    run.add_argument("--eps", help="ε values, e.g. inf,8,4,2,1 (inf = no DP)")
    run.add_argument("--strategies", help="strategies, e.g. fedavg,gossip")
    run.add_argument("--seeds", help="seeds, e.g. 7,8,9")
    run.add_argument("--rounds", type=int, help="num-server-rounds")
    run.add_argument("--nodes", type=int, help="simulated nodes (SuperNodes)")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="fix a run-config key"
    )
    run.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="sweep a run-config key over values",
    )
    run.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'K1=V1 K2=V2'",
        help="add a variant: keys set together (repeat for more); the grid is multiplied by "
        "the variants, e.g. --variant 'gossip:gossip-mode=edges gossip:topology=ring'",
    )
    run.add_argument(
        "--out",
        type=Path,
        help="sweep folder (default: results/sweeps/<preset or sweep>-<UTC time> in the "
        "project); give the same folder again to resume",
    )
    run.add_argument(
        "--ray-address", help="join a running Ray cluster (see `ray start --head`) at ADDR"
    )
    run.add_argument(
        "--timeout", type=float, default=3600, help="stop a cell after S seconds (default 3600)"
    )
    run.add_argument(
        "--dry-run", action="store_true", help="validate and list the cells; write nothing"
    )
    for name, text in (("plot", "draw the figures"), ("report", "write report.md (and figures)")):
        p = sub.add_parser(name, help=f"{text} from a sweep folder's stored results")
        p.add_argument("results_dir", type=Path, metavar="RESULTS_DIR")
    cmp = sub.add_parser(
        "compare",
        help="print a Markdown table of several sweeps side by side (same series and ε)",
    )
    cmp.add_argument("results_dirs", type=Path, nargs="+", metavar="RESULTS_DIR")
    cmp.add_argument("--names", help="column names, comma-separated (default: folder names)")
    cmp.add_argument(
        "--figure",
        type=Path,
        metavar="PNG",
        help="also draw final accuracy vs ε, a panel per sweep",
    )
    for p in (run, sub.choices["plot"], sub.choices["report"]):
        p.add_argument(
            "--target-accuracy",
            type=float,
            help="accuracy (0-1) for the rounds-to-target figure "
            # argparse %-formats help texts: a literal percent sign is %%.
            f"(default: {TARGET_FRACTION * 100:.0f}%% of each strategy's non-private final "
            "accuracy)",
        )
    return parser


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """Preset, then SPEC.toml, then the flags: later ones override earlier ones."""
    spec = PRESETS[args.preset].spec.copy() if args.preset else SweepSpec()
    if args.spec:
        spec = load_spec(args.spec, spec)
    if args.nodes is not None:
        spec.nodes = args.nodes
    for key, text in (("strategy", args.strategies), ("eps", args.eps), ("seed", args.seeds)):
        if text is not None:
            spec.sweep(key, parse_values(text))
    if args.rounds is not None:
        spec.set("num-server-rounds", args.rounds)
    for text in args.set:
        key, value = parse_assignment(text, "--set")
        spec.set(key, parse_value(value))
    for text in args.sweep:
        key, values = parse_assignment(text, "--sweep")
        spec.sweep(key, parse_values(values))
    for text in args.variant:
        spec.vary(parse_variant(text))
    return spec


def default_out(name: str, now: datetime | None = None) -> Path:
    """`<project>/results/sweeps/<name>-<UTC timestamp>`."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return resolve_results_dir(f"results/sweeps/{name}-{stamp}")


def summary_table(data: SweepData) -> Table:
    """The final rich table: final accuracy mean ± 95% CI over seeds per strategy and ε."""
    header, rows = summary_rows(data, final_summary(data))
    table = Table(title="Final test accuracy (mean ± 95% t-interval over seeds)")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < len(data.by) else "right")
    for row in rows:
        table.add_row(*row)
    return table


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so the SuperLink is stopped and the manifest stays sound."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finish(out: Path, target: float | None, console: Console) -> None:
    """Figures, report and the summary table; never fails the command."""
    try:
        figures = plot_all(out, target=target)
        report = write_report(out, target=target, figures=figures)
        console.log(
            f"{len(figures[0])} figures in {out / 'figures'}; report: {report}", markup=False
        )
    except Exception as err:  # noqa: BLE001 - the runs are safe; plotting can be redone
        log.warning(
            "plot/report failed (%s: %s); retry with `fl-sweep report %s`",
            type(err).__name__,
            err,
            out,
        )
    _print_summary(out)


def _print_summary(out: Path) -> None:
    data = SweepData.load(out)
    if data.tidy.empty:
        Console(stderr=True).print("no completed cell yet: no summary table")
    else:
        Console().print(summary_table(data))


def command_run(args: argparse.Namespace, argv: Sequence[str], runner: Runner | None = None) -> int:
    """`fl-sweep run`: validate everything, then run; 0 all completed, 1 some failed."""
    console = Console(stderr=True, log_path=False)
    spec = spec_from_args(args)
    cells = expand(spec)
    name = args.preset or "sweep"
    if args.dry_run:
        for cell in cells:
            console.print(f"{cell.id}  {cell.params}", soft_wrap=True, markup=False)
        console.print(f"{len(cells)} cells on {spec.nodes} nodes: all valid")
        return 0
    out = (args.out.expanduser().resolve()) if args.out else default_out(name)
    command = shlex.join(["fl-sweep", *argv] + ([] if args.out else ["--out", str(out)]))
    sweep = Sweep(out, spec, cells, name=name, command=command)
    console.log(f"{len(cells)} cells on {spec.nodes} nodes → {out}", markup=False)
    try:
        with _sigterm_interrupts():
            if runner is not None or not sweep.todo:  # nothing to run: no SuperLink needed
                sweep.run(runner or _no_runner, console)
            else:
                with SimulationLink(ray_address=args.ray_address) as link:
                    sweep.run(FlowerRunner(link, args.timeout), console)
    except KeyboardInterrupt:
        done = sum(sweep.status(c.id) == COMPLETED for c in cells)
        _stderr(f"interrupted: {done} of {len(cells)} cells completed; resume with: {command}")
        return 130
    except SuperLinkDown as err:
        _stderr(f"{err}; resume with: {command}")
        return 1
    _finish(out, args.target_accuracy, console)
    if failed := sweep.failed:
        _stderr(
            f"{len(failed)} of {len(cells)} cells failed: {', '.join(failed)} "
            f"(errors in {out / MANIFEST}); re-run the same command to retry them"
        )
        return 1
    return 0


def _no_runner(run_config: dict[str, Any], **_: Any) -> RunOutcome:
    raise AssertionError(f"no cell should run, got {run_config['run-name']}")


def _stderr(line: str) -> None:
    sys.stderr.write(f"fl-sweep: {line}\n")


def _sweep_folder(path: Path) -> Path:
    folder = path.expanduser().resolve()
    if not (folder / MANIFEST).exists() or not (folder / TIDY).exists():
        raise SweepError(f"{folder} is not a sweep folder (no {MANIFEST} and {TIDY})")
    return folder


def _setup_logging() -> None:
    logger = logging.getLogger("sim")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=Console(stderr=True), show_path=False))
    logger.propagate = False  # Opacus calls logging.basicConfig on import: no double lines


def main(argv: Sequence[str] | None = None, *, runner: Runner | None = None) -> int:
    """Entry point of `fl-sweep` and `python -m sim`; `runner` replaces Flower in tests."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        if args.command == "run":
            return command_run(args, argv, runner)
        if args.command == "compare":
            outs = [_sweep_folder(p) for p in args.results_dirs]
            names = args.names.split(",") if args.names else None
            if names is not None and len(names) != len(outs):
                raise SweepError(f"--names gives {len(names)} names for {len(outs)} folders")
            sys.stdout.write(compare(outs, names))
            if args.figure:
                compare_figure(outs, names or [p.name for p in outs], args.figure)
            return 0
        out = _sweep_folder(args.results_dir)
        if args.command == "plot":
            figures, _ = plot_all(out, target=args.target_accuracy)
            for fig in figures:
                Console(stderr=True, log_path=False).log(
                    f"{fig.name}: {', '.join(map(str, fig.files))}"
                )
            return 0
        report = write_report(out, target=args.target_accuracy)
        Console(stderr=True, log_path=False).log(f"report: {report}")
        _print_summary(out)
        return 0
    except SweepError as err:
        _stderr(str(err))
        return 2
