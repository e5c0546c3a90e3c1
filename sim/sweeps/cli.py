"""`fl-sweep` (run, tune, report, compare): flags -> a sweep spec -> the runner -> figures, report.

`<out>/manifest.json` lists every cell with its status and is rewritten atomically after each
cell, `<out>/sweep.csv` is rebuilt from the completed cells, and each cell's results live in
`<out>/runs/<cell id>/`. Re-running the same command with the same `--out` skips completed
cells and re-runs failed or interrupted ones, so killing the sweep loses no completed cell.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.logging import RichHandler

from sim.analysis.names import MANIFEST
from sim.sweeps.flags import (
    build_parser,
    cell_slots,
    check_args,
    check_gpus,
    spec_from_args,
    tune_spec_from_args,
)
from sim.sweeps.folders import (
    check_out,
    only_writer,
    out_and_command,
    record_links,
    stop_leftovers,
    sweep_folder,
)
from sim.sweeps.presets import PRESETS
from sim.sweeps.spec import Cell, SweepError, check_cells, expand

# Flower, torch, pandas and matplotlib are imported by the commands that use them, so that
# `fl-sweep --help` and a refused command line answer at once.
if TYPE_CHECKING:
    from rich.table import Table

    from sim.analysis.sweep_data import SweepData
    from sim.launch.flwr_cli import RunOutcome
    from sim.launch.simulation import SimulationLink
    from sim.sweeps.runner import Sweep
    from sim.sweeps.runners import Runner
    from sim.sweeps.spec import SweepSpec
    from sim.sweeps.tune import TuneSpec

log = logging.getLogger(__name__)


def summary_table(data: SweepData) -> Table:
    """The final rich table: final accuracy mean ± 95% CI over seeds per strategy and ε."""
    from rich.table import Table

    from sim.analysis.report import final_summary, summary_rows

    header, rows = summary_rows(data, final_summary(data))
    table = Table(title=f"Final {data.split} accuracy (mean ± 95% t-interval over seeds)")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < len(data.by) else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _finish(out: Path, target: float | None, console: Console) -> None:
    """Figures, report and the summary table; never fails the command."""
    from sim.analysis.plots import plot_all
    from sim.analysis.report import write_report

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
    from sim.analysis.sweep_data import SweepData

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
    """`fl-sweep run`: validate everything, then run; 0 all completed, 1 some failed.

    Validating is everything a run checks before training (`check_cells`) and the folder;
    `--dry-run` stops there, lists the cells on stdout and writes nothing.
    """
    spec = spec_from_args(args)
    cells = expand(spec)
    slots = cell_slots(args)
    check_cells(cells, spec.nodes)
    check_gpus(args.gpus_per_node, [str(c.params.get("device", "auto")) for c in cells])
    name = args.preset or "sweep"
    out, command = out_and_command(args, argv, prog, name, out_root)
    check_out(out)
    if args.dry_run:
        _print_cells(cells)
        Console().print(f"{len(cells)} cells on {spec.nodes} nodes: all valid", highlight=False)
        return 0
    from sim.sweeps.runner import Sweep

    console = Console(stderr=True, log_path=False)
    description = PRESETS[args.preset].description if args.preset else ""
    with only_writer(out, f"sweep folder {out}"):
        stop_leftovers(out, console.log)
        sweep = Sweep(out, spec, cells, name=name, command=command, description=description)
        return _run_sweep(sweep, args, runner, console, slots)


def cell_runner(link: SimulationLink, args: argparse.Namespace, out: Path) -> Runner:
    """The cells' runner on `link`: all in one Flower run, or one run each (--run-per-cell)."""
    from sim.sweeps.runners import BATCHES, BatchedRunner, FlowerRunner, ensure_running

    if getattr(args, "run_per_cell", False):
        return FlowerRunner(link, args.timeout)
    return BatchedRunner(
        link, out / BATCHES, args.timeout, check_link=functools.partial(ensure_running, link)
    )


def _print_cells(cells: Sequence[Cell]) -> None:
    """The dry run's listing, on stdout: one cell a line, its id and its run-config keys."""
    console = Console()
    for cell in cells:
        console.print(f"{cell.id}  {cell.params}", soft_wrap=True, markup=False, highlight=False)


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
    from sim.launch.processes import sigterm_as_interrupt
    from sim.sweeps.runner import COMPLETED
    from sim.sweeps.runners import SuperLinkDown

    out, cells, command = sweep.out, sweep.cells, sweep.command
    console.log(f"{len(cells)} cells on {sweep.spec.nodes} nodes → {out}", markup=False)
    try:
        with sigterm_as_interrupt():
            if runner is not None or not sweep.todo:  # nothing to run: no SuperLink needed
                sweep.run(runner or _no_runner, console)
            else:
                links = make_links(*slots, gpus_per_node=args.gpus_per_node)
                record_links(out, [link.home for link in links])
                with ExitStack() as stack:
                    for link in links:
                        stack.enter_context(link)
                    sweep.run([cell_runner(link, args, out) for link in links], console)
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


def command_tune(
    args: argparse.Namespace, argv: Sequence[str], runner: Runner | None = None
) -> int:
    """`fl-sweep tune`: the search stage, the choice, the final stage; 0 when all completed.

    The search runs are checked as `fl-sweep run` checks its cells; the final runs exist
    only once the search has chosen.
    """
    from sim.sweeps.tune import groups, search_cells

    tune = tune_spec_from_args(args)
    search_spec, cells = search_cells(tune)
    slots = cell_slots(args)
    check_cells(cells, search_spec.nodes)
    check_gpus(args.gpus_per_node, [str(c.params.get("device", "auto")) for c in cells])
    out, command = out_and_command(args, argv, "fl-sweep", args.preset or "tune", "results/tune")
    check_out(out)
    if args.dry_run:
        finals = len(groups(tune)) * len(tune.final_seeds())
        _print_cells(cells)
        Console().print(
            f"{len(cells)} search runs on {tune.base.nodes} nodes, then {finals} final runs "
            f"({len(groups(tune))} choices × {len(tune.final_seeds())} seeds): all valid",
            highlight=False,
        )
        return 0
    with only_writer(out, f"tune folder {out}"):
        return _tune_stages(args, tune, (search_spec, cells), (out, command), runner, slots)


def _tune_stages(
    args: argparse.Namespace,
    tune: TuneSpec,
    search: tuple[SweepSpec, list[Cell]],
    where: tuple[Path, str],
    runner: Runner | None,
    slots: tuple[int, list[str | None]],
) -> int:
    """Stage 1 (search on validation), the choice, stage 2 (final runs on test)."""
    from sim.analysis.tuned import write_tune_report
    from sim.sweeps.runner import Sweep
    from sim.sweeps.tune import (
        CHOICES,
        FINAL,
        SEARCH,
        choose,
        describe,
        final_cells,
        groups,
        write_choices,
    )

    console = Console(stderr=True, log_path=False)
    (out, command), name = where, args.preset or "tune"
    description = PRESETS[args.preset].description if args.preset else ""
    for stage in (SEARCH, FINAL):
        stop_leftovers(out / stage, console.log)
    stage1 = Sweep(
        out / SEARCH,
        search[0],
        search[1],
        name=f"{name} search",
        command=command,
        description=f"search runs on the validation split; {description}",
    )
    console.log(f"stage 1 of 2: {len(search[1])} search runs on the validation split", markup=False)
    if code := _run_sweep(stage1, args, runner, console, slots, finish=False):
        return code
    choices = choose(stage1, tune)
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
    finals = len(groups(tune)) * len(tune.final_seeds())
    console.log(f"stage 2 of 2: {finals} final runs on the test set", markup=False)
    code = _run_sweep(final, args, runner, console, slots)
    console.log(f"tune report: {write_tune_report(out)}", markup=False)
    return code


def make_links(
    k: int, addresses: Sequence[str | None], *, gpus_per_node: float = 0.0
) -> list[SimulationLink]:
    """One SimulationLink per concurrent cell; local heads split the CPUs evenly.

    `gpus_per_node`: each simulated node's share of a GPU (`--gpus-per-node`).
    """
    from sim.launch.simulation import SimulationLink

    cpus = max(1, (os.cpu_count() or 1) // k)
    return [
        SimulationLink(
            ray_address=a, ray_cpus=None if k == 1 else cpus, gpus_per_node=gpus_per_node
        )
        for a in addresses
    ]


def _no_runner(run_config: dict[str, Any], **_: Any) -> RunOutcome:
    raise AssertionError(f"no cell should run, got {run_config['run-name']}")


def _stderr(line: str) -> None:
    sys.stderr.write(f"fl-sweep: {line}\n")


def setup_logging() -> None:
    """Log the harness's lines once each, through rich, to stderr."""
    for name in ("sim",):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(isinstance(h, RichHandler) for h in logger.handlers):
            logger.addHandler(RichHandler(console=Console(stderr=True), show_path=False))
        logger.propagate = False  # Opacus calls logging.basicConfig on import: no double lines


def command_analyse(args: argparse.Namespace) -> int:
    """`fl-sweep compare`, `plot` and `report`: from stored results only."""
    from sim.analysis.plots import plot_all
    from sim.analysis.report import write_report

    if args.command == "compare":
        from sim.analysis.compare import compare, compare_figure

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


def main(argv: Sequence[str] | None = None, *, runner: Runner | None = None) -> int:
    """Entry point of `fl-sweep` and `python -m sim`; `runner` replaces Flower in tests.

    A command line that cannot run is refused with one line on stderr and exit code 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        check_args(args)
        if args.command == "run":
            return command_run(args, argv, runner)
        if args.command == "tune":
            return command_tune(args, argv, runner)
        return command_analyse(args)
    except SweepError as err:
        _stderr(str(err))
        return 2
