"""`sweep_vs_cells`: one small grid as fl-sweep runs it (one Flower run) and as a run per cell.

Both ways use the real `Sweep` and its runners on a fresh owned SuperLink each, and are timed
from the sweep's start to its last cell's end. A sweep's floor is the sum of its cells'
steady rounds (rounds × the cell's steady round seconds, from its own rounds.csv): what it
would cost if start-up, imports and first rounds were free.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from sim.bench.flower_runs import steady
from sim.bench.sizes import Sizes
from sim.launch.simulation import SimulationLink
from sim.sweeps.presets import REFERENCE_FIXED
from sim.sweeps.runner import RUNS, Sweep
from sim.sweeps.runners import BATCHES, BatchedRunner, FlowerRunner, Runner
from sim.sweeps.spec import SweepSpec, expand

MODES = ("one_run", "run_per_cell")


def bench_spec(sizes: Sizes) -> SweepSpec:
    """The reference sweep's shape, smaller: both strategies at `sweep_eps`, one seed."""
    return SweepSpec(
        fixed=REFERENCE_FIXED
        | {"num-server-rounds": sizes.sweep_rounds}
        | dict(sizes.sweep_config),
        grid={"strategy": ["fedavg", "gossip"], "eps": list(sizes.sweep_eps), "seed": [7]},
        nodes=sizes.sweep_nodes,
    )


def _runner(mode: str, link: SimulationLink, folder: Path) -> Runner:
    return BatchedRunner(link, folder / BATCHES) if mode == "one_run" else FlowerRunner(link)


def timed_sweep(mode: str, spec: SweepSpec, folder: Path) -> dict[str, float]:
    """Run the grid one way; its wall seconds and the sum of its cells' steady rounds."""
    cells = expand(spec)
    with SimulationLink() as link:
        sweep = Sweep(folder, spec, cells)
        t0 = time.perf_counter()
        failed = sweep.run(_runner(mode, link, folder), Console(quiet=True))
        wall = time.perf_counter() - t0
    if failed:
        raise RuntimeError(f"benchmark sweep ({mode}) failed: {', '.join(failed)}")
    floor = 0.0
    for cell in cells:
        with (folder / RUNS / cell.id / "rounds.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        floor += len(rows) * steady(rows)
    return {"wall_s": wall, "steady_rounds_s": floor, "vs_steady_rounds": wall / floor}


def sweep_vs_cells(sizes: Sizes, out: Path, log: Callable[[str], None]) -> dict[str, float]:
    """The grid both ways: the ratio of their walls, and each against its steady rounds."""
    spec = bench_spec(sizes)
    found: dict[str, dict[str, float]] = {}
    for mode in MODES:
        log(f"sweep: {len(expand(spec))} cells x {sizes.sweep_rounds} rounds, {mode}")
        found[mode] = timed_sweep(mode, spec, out / f"sweep-{mode}")
    one, each = found["one_run"], found["run_per_cell"]
    return {
        "ratio": one["wall_s"] / each["wall_s"],
        "one_run_vs_steady_rounds": one["vs_steady_rounds"],
        "run_per_cell_vs_steady_rounds": each["vs_steady_rounds"],
        **{f"{mode}_{k}": v for mode in MODES for k, v in found[mode].items()},
    }
