"""`fl-sweep` (run, tune, report, compare): flags -> a sweep spec -> the runner -> figures, report.

`<out>/manifest.json` lists every cell with its status and is rewritten atomically after each
cell, `<out>/sweep.csv` is rebuilt from the completed cells, and each cell's results live in
`<out>/runs/<cell id>/`. Re-running the same command with the same `--out` skips completed
cells and re-runs failed or interrupted ones, so killing the sweep loses no completed cell.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from flower_app.results import (
    FolderLock,
    FolderLocked,
    atomic_write_text,
    resolve_results_dir,
)
from sim.analysis.compare import compare, compare_figure
from sim.analysis.plots import TARGET_FRACTION, SweepData, plot_all
from sim.analysis.report import final_summary, summary_rows, write_report
from sim.analysis.tidy import MANIFEST, TIDY
from sim.analysis.tuned import write_tune_report
from sim.launch.flwr_cli import RunOutcome
from sim.launch.processes import (
    command_line,
    processes_under,
    sigterm_as_interrupt,
    stop_processes,
)
from sim.launch.simulation import SimulationLink
from sim.sweeps.presets import PRESETS
from sim.sweeps.runner import COMPLETED, FlowerRunner, Runner, SuperLinkDown, Sweep
from sim.sweeps.spec import (
    Cell,
    SweepError,
    SweepSpec,
    expand,
    load_spec,
    parse_assignment,
    parse_value,
    parse_values,
    parse_variant,
)
from sim.sweeps.tune import (
    CHOICES,
    FINAL,
    SEARCH,
    TuneSpec,
    choose,
    describe,
    final_cells,
    groups,
    search_cells,
    write_choices,
)

log = logging.getLogger(__name__)

# In the sweep folder: the lock of its one writer, and where its SuperLink lived.
SWEEP_LOCK = ".lock"
LAUNCH_RECORD = ".launch.json"


def build_parser() -> argparse.ArgumentParser:
    """The `fl-sweep` command line: run, plot, report, compare."""
    parser = argparse.ArgumentParser(
        prog="fl-sweep",
        description="Privacy sweeps of FedAvg and gossip learning under DP-SGD, on Flower.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = add_run_parser(sub)
    tune = _add_tune(sub)
    for name, text in (("plot", "draw the figures"), ("report", "write report.md (and figures)")):
        p = sub.add_parser(name, help=f"{text} from a sweep folder's stored results")
        p.add_argument("results_dir", type=Path, metavar="RESULTS_DIR")
    _add_compare(sub)
    for p in (run, tune, sub.choices["plot"], sub.choices["report"]):
        p.add_argument(
            "--target-accuracy",
            type=float,
            help="accuracy (0-1) for the rounds-to-target figure "
            # argparse %-formats help texts: a literal percent sign is %%.
            f"(default: {TARGET_FRACTION * 100:.0f}%% of each strategy's non-private final "
            "accuracy)",
        )
    return parser


def add_run_parser(sub: Any) -> argparse.ArgumentParser:
    """The `run` subcommand and its grid options (fl-audit's `run` adds its own to them)."""
    run = sub.add_parser(
        "run",
        help="run a sweep (resumable with the same --out)",
        description="Expand the grid (strategies × ε × seeds × --sweep keys), validate every "
        "cell, then run the cells one after another on one simulation SuperLink. Order of "
        "precedence: preset < SPEC.toml < --nodes/--strategies/--eps/--seeds/--rounds < --set "
        "< --sweep. Values parse like TOML (inf, 2, 0.5, true); bare words are strings. A key "
        "may be scoped to one strategy: --set gossip:topology=ring.",
    )
    _grid_options(run, [n for n, p in PRESETS.items() if not p.search])
    return run


def _add_tune(sub: Any) -> argparse.ArgumentParser:
    tune = sub.add_parser(
        "tune",
        help="choose each (strategy, ε) cell's hyperparameters on validation data, then run "
        "the choice with the grid's seeds on the test set (resumable with the same --out)",
        description="Stage 1 (<out>/search): every candidate of the --search space for every "
        "(strategy, ε) cell of the grid, with evaluate-on=validation (the validation split "
        "carved off the training set; the test set is never read). Each cell's candidate "
        "with the best final validation accuracy of what a node holds is chosen "
        "(<out>/tune.json). Stage 2 (<out>/final): each choice with every --seeds seed on the "
        "test set. The grid options are those of `fl-sweep run`.",
    )
    _grid_options(tune, [n for n, p in PRESETS.items() if p.search])
    tune.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a hyperparameter and its candidates (repeatable; the space is their product; "
        "scope with gossip:KEY); max-grad-norm is not searched at eps=inf",
    )
    tune.add_argument(
        "--tune-seeds", help="seeds of the search runs (default: the first of --seeds)"
    )
    return tune


def _grid_options(run: argparse.ArgumentParser, presets: Sequence[str]) -> None:
    """The options `run` and `tune` share: the grid, where it runs, and the output folder."""
    run.add_argument("spec", nargs="?", type=Path, help="SPEC.toml: nodes, [fixed], [grid]")
    run.add_argument(
        "--preset",
        choices=sorted(presets),
        help="; ".join(f"{k}: {PRESETS[k].description}" for k in presets),
    )
    run.add_argument("--eps", help="ε values, e.g. inf,8,4,2,1 (inf = no DP)")
    run.add_argument("--strategies", help="strategies, e.g. fedavg,gossip")
    run.add_argument("--seeds", help="seeds, e.g. 7,8,9")
    run.add_argument("--rounds", type=int, help="num-server-rounds")
    run.add_argument("--nodes", type=int, help="simulated nodes (SuperNodes)")
    repeated = {"action": "append", "default": []}
    run.add_argument("--set", **repeated, metavar="KEY=VALUE", help="fix a run-config key")
    run.add_argument(
        "--sweep", **repeated, metavar="KEY=V1,V2", help="sweep a run-config key over values"
    )
    run.add_argument(
        "--variant",
        **repeated,
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
        "--ray-address",
        metavar="ADDR[,ADDR...]",
        help="run the cells on running Ray clusters (see `ray start --head`) instead of a "
        "local one: one address per cell run at once",
    )
    run.add_argument(
        "--parallel-cells",
        type=int,
        metavar="K",
        help="run K cells at once, each on its own SuperLink and Ray cluster (default: 1, or "
        "one per --ray-address); locally each cluster gets CPUs/K CPUs",
    )
    run.add_argument(
        "--timeout", type=float, default=3600, help="stop a cell after S seconds (default 3600)"
    )
    run.add_argument(
        "--dry-run", action="store_true", help="validate and list the cells; write nothing"
    )


def _add_compare(sub: Any) -> None:
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


def default_out(name: str, now: datetime | None = None, root: str = "results/sweeps") -> Path:
    """`<project>/<root>/<name>-<UTC timestamp>`."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return resolve_results_dir(f"{root}/{name}-{stamp}")


def summary_table(data: SweepData) -> Table:
    """The final rich table: final accuracy mean ± 95% CI over seeds per strategy and ε."""
    header, rows = summary_rows(data, final_summary(data))
    table = Table(title=f"Final {data.split} accuracy (mean ± 95% t-interval over seeds)")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < len(data.by) else "right")
    for row in rows:
        table.add_row(*row)
    return table


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


def command_run(
    args: argparse.Namespace,
    argv: Sequence[str],
    runner: Runner | None = None,
    *,
    prog: str = "fl-sweep",
    out_root: str = "results/sweeps",
) -> int:
    """`fl-sweep run`: validate everything, then run; 0 all completed, 1 some failed."""
    console = Console(stderr=True, log_path=False)
    spec = spec_from_args(args)
    cells = expand(spec)
    slots = cell_slots(args)
    name = args.preset or "sweep"
    if args.dry_run:
        _print_cells(console, cells)
        console.print(f"{len(cells)} cells on {spec.nodes} nodes: all valid")
        return 0
    out, command = _out_and_command(args, argv, prog, name, out_root)
    description = PRESETS[args.preset].description if args.preset else ""
    with _only_writer(out, f"sweep folder {out}"):
        stop_leftovers(out, console.log)
        sweep = Sweep(out, spec, cells, name=name, command=command, description=description)
        return _run_sweep(sweep, args, runner, console, slots)


def _print_cells(console: Console, cells: Sequence[Cell]) -> None:
    for cell in cells:
        console.print(f"{cell.id}  {cell.params}", soft_wrap=True, markup=False)


def _out_and_command(
    args: argparse.Namespace, argv: Sequence[str], prog: str, name: str, root: str
) -> tuple[Path, str]:
    """The folder (--out, else a new timestamped one under `root`) and the command resuming it."""
    out = (args.out.expanduser().resolve()) if args.out else default_out(name, root=root)
    return out, shlex.join([prog, *argv] + ([] if args.out else ["--out", str(out)]))


@contextmanager
def _only_writer(out: Path, what: str) -> Iterator[None]:
    """Hold the folder's writer lock; a second writer gets one line naming the holder."""
    lock = FolderLock(out / SWEEP_LOCK, what)
    try:
        lock.acquire()
    except FolderLocked as err:
        raise SweepError(str(err)) from None
    try:
        yield
    finally:
        lock.release()


def _run_sweep(
    sweep: Sweep,
    args: argparse.Namespace,
    runner: Runner | None,
    console: Console,
    slots: tuple[int, list[str | None]],
    *,
    finish: bool = True,
) -> int:
    """Run the sweep's pending cells, then (with `finish`) its figures and report."""
    out, cells, command = sweep.out, sweep.cells, sweep.command
    console.log(f"{len(cells)} cells on {sweep.spec.nodes} nodes → {out}", markup=False)
    try:
        with sigterm_as_interrupt():
            if runner is not None or not sweep.todo:  # nothing to run: no SuperLink needed
                sweep.run(runner or _no_runner, console)
            else:
                links = make_links(*slots)
                record_links(out, [link.home for link in links])
                with ExitStack() as stack:
                    for link in links:
                        stack.enter_context(link)
                    sweep.run([FlowerRunner(link, args.timeout) for link in links], console)
    except KeyboardInterrupt:
        done = sum(sweep.status(c.id) == COMPLETED for c in cells)
        _stderr(f"interrupted: {done} of {len(cells)} cells completed; resume with: {command}")
        return 130
    except SuperLinkDown as err:
        _stderr(f"{err}; resume with: {command}")
        return 1
    if finish:
        _finish(out, args.target_accuracy, console)
    if failed := sweep.failed:
        _stderr(
            f"{len(failed)} of {len(cells)} cells failed: {', '.join(failed)} "
            f"(errors in {out / MANIFEST}); re-run the same command to retry them"
        )
        return 1
    return 0


def tune_spec_from_args(args: argparse.Namespace) -> TuneSpec:
    """The grid as `fl-sweep run` reads it, the preset's search space, then --search flags."""
    preset = PRESETS[args.preset] if args.preset else None
    search = dict(preset.search) if preset else {}
    for text in args.search:
        key, values = parse_assignment(text, "--search")
        search[key] = parse_values(values)
    seeds = [int(s) for s in parse_values(args.tune_seeds)] if args.tune_seeds else []
    seeds = seeds or (list(preset.tune_seeds) if preset else [])
    return TuneSpec(spec_from_args(args), search, seeds)


def command_tune(
    args: argparse.Namespace, argv: Sequence[str], runner: Runner | None = None
) -> int:
    """`fl-sweep tune`: the search stage, the choice, the final stage; 0 when all completed."""
    console = Console(stderr=True, log_path=False)
    tune = tune_spec_from_args(args)
    search_spec, cells = search_cells(tune)
    slots = cell_slots(args)
    name = args.preset or "tune"
    finals = len(groups(tune)) * len(tune.final_seeds())
    if args.dry_run:
        _print_cells(console, cells)
        console.print(
            f"{len(cells)} search runs on {tune.base.nodes} nodes, then {finals} final runs "
            f"({len(groups(tune))} choices × {len(tune.final_seeds())} seeds): all valid"
        )
        return 0
    out, command = _out_and_command(args, argv, "fl-sweep", name, "results/tune")
    description = PRESETS[args.preset].description if args.preset else ""
    with _only_writer(out, f"tune folder {out}"):
        for stage in (SEARCH, FINAL):
            stop_leftovers(out / stage, console.log)
        search = Sweep(
            out / SEARCH,
            search_spec,
            cells,
            name=f"{name} search",
            command=command,
            description=f"search runs on the validation split; {description}",
        )
        console.log(f"stage 1 of 2: {len(cells)} search runs on the validation split", markup=False)
        if code := _run_sweep(search, args, runner, console, slots, finish=False):
            return code
        choices = choose(search, tune)
        write_choices(out, tune, choices)
        for choice in choices:
            console.log(f"chosen: {describe(choice)}", markup=False, highlight=False)
        final = Sweep(
            out / FINAL,
            tune.base,
            final_cells(tune, choices),
            name=f"{name} final",
            command=command,
            description=f"each cell's chosen hyperparameters (../{CHOICES}) on the test set; "
            f"{description}",
        )
        console.log(f"stage 2 of 2: {finals} final runs on the test set", markup=False)
        code = _run_sweep(final, args, runner, console, slots)
        report = write_tune_report(out)
        console.log(f"tune report: {report}", markup=False)
        return code


def cell_slots(args: argparse.Namespace) -> tuple[int, list[str | None]]:
    """How many cells run at once and the Ray address of each (None: a local head).

    Flower 1.42 sizes every run's actor pool to its whole Ray cluster
    (`pool_size_from_resources`), so two runs sharing one cluster compete for the same CPUs
    and can each hold part of their pool while waiting for the rest: every concurrent cell
    needs its own cluster.
    """
    addresses = [a.strip() for a in (args.ray_address or "").split(",") if a.strip()]
    k = args.parallel_cells if args.parallel_cells is not None else max(1, len(addresses))
    cpus = os.cpu_count() or 1
    if addresses:
        if k != len(addresses):
            raise SweepError(
                f"--parallel-cells {k} needs {k} Ray clusters in --ray-address, got "
                f"{len(addresses)}: Flower sizes each run's actor pool to its whole cluster, so "
                "cells run at once cannot share one"
            )
        return k, list(addresses)
    if not 1 <= k <= cpus:
        raise SweepError(
            f"--parallel-cells {k} is not valid on this machine: 1 to {cpus} "
            "(each cell's local Ray cluster needs at least one CPU)"
        )
    return k, [None] * k


def make_links(k: int, addresses: Sequence[str | None]) -> list[SimulationLink]:
    """One SimulationLink per concurrent cell; local heads split the CPUs evenly."""
    cpus = max(1, (os.cpu_count() or 1) // k)
    return [SimulationLink(ray_address=a, ray_cpus=None if k == 1 else cpus) for a in addresses]


def record_links(out: Path, homes: Sequence[Path]) -> None:
    """Note the sweep's SuperLink homes: what a later run must stop if this one is killed."""
    record = {"flwr_homes": [str(h) for h in homes]}
    atomic_write_text(out / LAUNCH_RECORD, json.dumps(record) + "\n")


def stop_leftovers(out: Path, log: Callable[[str], None]) -> list[int]:
    """Stop what an earlier, killed run of this sweep left running; the PIDs stopped.

    Its processes are the ones whose environment carries the FLWR_HOME it recorded (every
    process its SuperLink, the simulation and Ray start inherits it), and that still run.
    """
    try:
        record = json.loads((out / LAUNCH_RECORD).read_text(encoding="utf-8"))
        homes = record["flwr_homes"] if "flwr_homes" in record else [record["flwr_home"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    leftovers = [pid for home in homes for pid in processes_under(Path(home)) if command_line(pid)]
    if leftovers:
        log(f"stopping {len(leftovers)} process(es) an earlier run of this sweep left: {leftovers}")
        stop_processes(leftovers, grace=5.0)
    return leftovers


def _no_runner(run_config: dict[str, Any], **_: Any) -> RunOutcome:
    raise AssertionError(f"no cell should run, got {run_config['run-name']}")


def _stderr(line: str) -> None:
    sys.stderr.write(f"fl-sweep: {line}\n")


def sweep_folder(path: Path) -> Path:
    """`path` resolved, if it holds a sweep (its manifest and tidy table); else `SweepError`."""
    folder = path.expanduser().resolve()
    if not (folder / MANIFEST).exists() or not (folder / TIDY).exists():
        raise SweepError(f"{folder} is not a sweep folder (no {MANIFEST} and {TIDY})")
    return folder


def setup_logging() -> None:
    """Log the harness's lines once each, through rich, to stderr."""
    for name in ("sim",):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(isinstance(h, RichHandler) for h in logger.handlers):
            logger.addHandler(RichHandler(console=Console(stderr=True), show_path=False))
        logger.propagate = False  # Opacus calls logging.basicConfig on import: no double lines


def main(argv: Sequence[str] | None = None, *, runner: Runner | None = None) -> int:
    """Entry point of `fl-sweep` and `python -m sim`; `runner` replaces Flower in tests."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.command == "run":
            return command_run(args, argv, runner)
        if args.command == "tune":
            return command_tune(args, argv, runner)
        if args.command == "compare":
            outs = [sweep_folder(p) for p in args.results_dirs]
            names = args.names.split(",") if args.names else None
            if names is not None and len(names) != len(outs):
                raise SweepError(f"--names gives {len(names)} names for {len(outs)} folders")
            sys.stdout.write(compare(outs, names))
            if args.figure:
                compare_figure(outs, names or [p.name for p in outs], args.figure)
            return 0
        out = sweep_folder(args.results_dir)
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
