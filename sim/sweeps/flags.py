"""The `fl-sweep` command line: its parser, and what its flags make (the spec, the slots).

`fl-audit run` takes the same grid options (`add_run_parser`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from flower_app.config import RunConfig
from flower_app.results import package_version
from sim.analysis.names import TARGET_FRACTION
from sim.sweeps.presets import PRESETS
from sim.sweeps.spec import (
    DEFAULT_NODES,
    SweepError,
    SweepSpec,
    load_spec,
    parse_assignment,
    parse_value,
    parse_values,
    parse_variant,
    split_scope,
)

if TYPE_CHECKING:
    from sim.sweeps.tune import TuneSpec


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default, unless the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default in (None, False, [], argparse.SUPPRESS)
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse that refuses a bad command line in one line (exit 2) and shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As argparse's, with `DefaultsFormatter` (subcommands inherit the class)."""
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """One line naming what is wrong, instead of the usage block and the error."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version`: the program's name and the package version."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")


def build_parser() -> argparse.ArgumentParser:
    """The `fl-sweep` command line: run, plot, report, compare."""
    parser = Parser(
        prog="fl-sweep",
        description="Privacy sweeps of FedAvg and gossip learning under DP-SGD, on Flower.",
    )
    add_version(parser)
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
            metavar="FRACTION",
            help="target accuracy of the rounds-to-target figure, as a fraction in (0, 1] "
            # argparse %-formats help texts: a literal percent sign is %%.
            f"(0.77 for 77%%; default: {TARGET_FRACTION * 100:.0f}%% of each strategy's "
            "non-private final accuracy)",
        )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """What argparse's types cannot say: SweepError (one line) for a value out of range."""
    target = getattr(args, "target_accuracy", None)
    if target is not None and not 0 < target <= 1:
        hint = f" ({target / 100:g} for {target:g}%)" if 1 < target <= 100 else ""
        raise SweepError(
            f"--target-accuracy {target:g} is not valid; expected a fraction in (0, 1]{hint}"
        )
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not 0 < timeout < math.inf:
        raise SweepError(f"--timeout {timeout:g} is not valid; expected seconds > 0")


def add_run_parser(sub: Any) -> argparse.ArgumentParser:
    """The `run` subcommand and its grid options (fl-audit's `run` adds its own to them)."""
    run = sub.add_parser(
        "run",
        help="run a sweep (resumable with the same --out)",
        description="Expand the grid (strategies × ε × seeds × --sweep keys), validate every "
        "cell, then run the cells one after another on one simulation SuperLink. Order of "
        "precedence: preset < SPEC.toml < --nodes/--strategies/--eps/--seeds/--rounds < --set "
        "< --sweep; two flags of the command line that give the same key are refused. Values "
        "parse like TOML (inf, 2, 0.5, true); bare words are strings. A key may be scoped to "
        "one strategy: --set gossip:topology=ring.",
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
    unset = "default: the preset's or SPEC.toml's, else"
    run.add_argument(
        "--eps", help=f"ε values, e.g. inf,8,4,2,1 (inf = no DP; {unset} {_run_default('eps')})"
    )
    run.add_argument(
        "--strategies", help=f"strategies, e.g. fedavg,gossip ({unset} {_run_default('strategy')})"
    )
    run.add_argument("--seeds", help=f"seeds, e.g. 7,8,9 ({unset} {_run_default('seed')})")
    run.add_argument(
        "--rounds",
        type=int,
        help=f"num-server-rounds ({unset} {_run_default('num-server-rounds')})",
    )
    run.add_argument(
        "--nodes",
        type=int,
        help=f"simulated nodes (SuperNodes) ({unset} {DEFAULT_NODES}, as `flwr run .` "
        "simulates with this project's .flwr/config.toml)",
    )
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
    _where_options(run)


def _where_options(run: argparse.ArgumentParser) -> None:
    """Where the cells run and write: --out, Ray clusters, cells at once, timeout, dry run."""
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
        "--gpus-per-node",
        type=float,
        default=0.0,
        metavar="G",
        help="share of a GPU each simulated node takes (Flower's client-resources-num-gpus; "
        "0.25: four nodes per GPU; default 0: no GPU, nodes with device=auto train on CPUs)",
    )
    run.add_argument(
        "--timeout", type=float, default=3600, metavar="S", help="stop a cell after S seconds"
    )
    run.add_argument(
        "--run-per-cell",
        action="store_true",
        help="start one Flower run per cell (each pays its own start-up) instead of running "
        "all cells one after another in one Flower run (the default)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="make every check a run makes before training (the ServerApp's too), list the "
        "cells on stdout; write nothing",
    )


def _run_default(key: str) -> str:
    """A run-config key's default, as `--help` shows it (without building a RunConfig)."""
    value = RunConfig.__dataclass_fields__[key.replace("-", "_")].default
    return f"{value:g}" if isinstance(value, float) else str(value)


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
    """Preset, then SPEC.toml, then the flags: later ones override earlier ones.

    Two flags of one command line that give the same key are refused (one would silently
    win); `args.defaults` ("key=value", set by the command itself, e.g. fl-audit's relay)
    come before the flags and yield to them.
    """
    spec = PRESETS[args.preset].spec.copy() if args.preset else SweepSpec()
    if args.spec:
        spec = load_spec(args.spec, spec)
    if args.nodes is not None:
        spec.nodes = args.nodes
    for text in getattr(args, "defaults", ()):
        spec.set(*_assignment(text, "--set"))
    refuse_repeated_keys(flag_keys(args))
    for key, text in (("strategy", args.strategies), ("eps", args.eps), ("seed", args.seeds)):
        if text is not None:
            spec.sweep(key, parse_values(text))
    if args.rounds is not None:
        spec.set("num-server-rounds", args.rounds)
    for text in [*args.set, *(text for _, text in getattr(args, "forced", ()))]:
        spec.set(*_assignment(text, "--set"))
    for text in args.sweep:
        key, values = parse_assignment(text, "--sweep")
        spec.sweep(key, parse_values(values))
    for text in args.variant:
        spec.vary(parse_variant(text))
    return spec


def _assignment(text: str, flag: str) -> tuple[str, Any]:
    key, value = parse_assignment(text, flag)
    return key, parse_value(value)


def flag_keys(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(the flag as typed, the key it gives) for each grid key, in the order they apply.

    `args.forced` holds (flag, "key=value") pairs a command adds for its own flags (fl-audit's
    --canaries); each --variant key is listed once, since variants may share keys.
    """
    shorthand = (
        ("--strategies", "strategy", args.strategies),
        ("--eps", "eps", args.eps),
        ("--seeds", "seed", args.seeds),
        ("--rounds", "num-server-rounds", args.rounds),
    )
    named = [(f"{flag} {text}", key) for flag, key, text in shorthand if text is not None]
    named += [(f"--set {text}", parse_assignment(text, "--set")[0]) for text in args.set]
    named += [(flag, parse_assignment(text, flag)[0]) for flag, text in getattr(args, "forced", ())]
    named += [(f"--sweep {text}", parse_assignment(text, "--sweep")[0]) for text in args.sweep]
    keys = dict.fromkeys(k for text in args.variant for k in parse_variant(text))
    return named + [(f"--variant {key}=…", key) for key in keys]


def refuse_repeated_keys(named: Sequence[tuple[str, str]]) -> None:
    """SweepError when a later flag would silently replace what an earlier one gives.

    A scoped key after its unscoped one narrows it (`--set lr=0.1 --set gossip:lr=0.05`);
    the same key twice, or an unscoped key after a scoped one, would drop a flag.
    """
    for i, (flag, key) in enumerate(named):
        scope, name = split_scope(key)
        for earlier, other in named[:i]:
            other_scope, other_name = split_scope(other)
            if other_name == name and scope in (None, other_scope):
                raise SweepError(
                    f"{earlier} and {flag} both give {name}: give it in one flag "
                    "(--sweep or a shorthand for several values, --set for one)"
                )


def tune_spec_from_args(args: argparse.Namespace) -> TuneSpec:
    """The grid as `fl-sweep run` reads it, the preset's search space, then --search flags."""
    from sim.sweeps.tune import TuneSpec  # pandas: not for --help

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


def check_gpus(gpus_per_node: float, cells_devices: Sequence[str]) -> None:
    """`--gpus-per-node` against this machine and the cells' `device`; SweepError, one line.

    A share of a GPU needs a GPU (Flower would start no node at all), and a cell that asks
    for `cuda` needs a share (the local Ray head hides GPUs from nodes given none).
    """
    if not 0 <= gpus_per_node <= 1:
        raise SweepError(f"--gpus-per-node {gpus_per_node:g} is not valid: a share in [0, 1]")
    if gpus_per_node > 0:
        import torch  # only when a GPU is asked for

        if not torch.cuda.is_available():
            raise SweepError(
                f"--gpus-per-node {gpus_per_node:g} needs a GPU, and torch sees none on this "
                "machine; use --gpus-per-node 0"
            )
    elif cuda := sorted({d for d in cells_devices if d.startswith("cuda")}):
        raise SweepError(
            f"device={cuda[0]!r} needs --gpus-per-node > 0 (e.g. 0.25: four nodes per GPU); "
            "without it the simulated nodes get no GPU"
        )
