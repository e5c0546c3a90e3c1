"""The `fl-sweep` command line: its parser, and what its flags make (the spec, the slots).

`fl-audit run` takes the same grid options (`add_run_parser`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sim.analysis.final_figures import TARGET_FRACTION
from sim.sweeps.presets import PRESETS
from sim.sweeps.spec import (
    SweepError,
    SweepSpec,
    load_spec,
    parse_assignment,
    parse_value,
    parse_values,
    parse_variant,
)
from sim.sweeps.tune import TuneSpec


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
        "--run-per-cell",
        action="store_true",
        help="start one Flower run per cell (each pays its own start-up) instead of running "
        "all cells one after another in one Flower run (the default)",
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
