"""The `fl-bench` command line, parsed before torch and Flower load.

So `fl-bench --help` and `--version` answer at once; the measurements live in
`sim.bench.benchmarks`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flower_app.results import package_version


def build_parser() -> argparse.ArgumentParser:
    """`fl-bench [--quick] [--json PATH] [--only deploy|epoch|randomness|...|gpu]`."""
    parser = argparse.ArgumentParser(
        prog="fl-bench",
        description="Where the time of private federated training goes, as ratios from one "
        "run (docs/performance.md).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (minutes on 2 cores; default: full)"
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON here (default: none)")
    parser.add_argument(
        "--only",
        choices=["deploy", "epoch", "randomness", "sweep", "sealed", "scale", "gpu"],
        help="only this measurement (deploy: a few minutes; epoch: dp_vs_plain, one local "
        "epoch of plain SGD against every Opacus mode, about a minute; randomness: seconds; sweep: "
        "sweep_vs_cells, minutes; sealed: sealed_vs_open_round, minutes; scale: gossip per "
        "round at 20, 100 and 1,000 nodes, about 10 minutes; gpu: a DP epoch and "
        "a 20-node round, CPU against CUDA, the CUDA half skipped without one; default: all "
        "but gpu)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point `fl-bench`."""
    args = build_parser().parse_args(argv)
    from sim.bench.benchmarks import bench  # torch, Flower: only once there is work to do

    return bench(args)
