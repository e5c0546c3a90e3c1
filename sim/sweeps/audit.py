"""`fl-audit`: one-run privacy audits of a grid of runs through the real app.

`fl-audit run` takes `fl-sweep run`'s grid options and presets, adds `audit-canaries` and
`audit-seed` to every cell, runs the grid resumably like a sweep (each run folder holds its
`audit.json`), then writes `audit.csv`, `audit.md` and two figures into the folder.
`fl-audit report DIR` redoes the last step from the stored run folders.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from sim.sweeps.cli import command_run, setup_logging
from sim.sweeps.flags import Parser, add_run_parser, add_version, check_args
from sim.sweeps.folders import default_out, sweep_folder
from sim.sweeps.spec import SweepError

if TYPE_CHECKING:
    from sim.sweeps.runners import Runner

DEFAULT_CANARIES = 100


def build_parser() -> argparse.ArgumentParser:
    """The `fl-audit` command line: run, report."""
    parser = Parser(
        prog="fl-audit",
        description="One-run privacy audits (Steinke, Nasr & Jagielski 2023) of FedAvg and "
        "gossip under DP-SGD: the ε lower bound per observer and graph distance.",
    )
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    run = add_run_parser(sub)
    run.description = (
        "Run an audit grid: fl-sweep run's options, with canaries in every node's data. "
        + (run.description or "")
    )
    run.add_argument(
        "--canaries",
        type=int,
        default=DEFAULT_CANARIES,
        help=f"canaries per node, each in its owner's data with probability 1/2 (default "
        f"{DEFAULT_CANARIES})",
    )
    run.add_argument(
        "--audit-seed",
        type=int,
        default=0,
        help="the auditor's seed: which canaries and their coin flips (default 0; never the "
        "DP noise's)",
    )
    run.add_argument(
        "--whitebox",
        action="store_true",
        help="canaries as directions in each node's clipped update, scored per observer "
        "(audit-mode=whitebox with dp-mode=update; gossip only): sees DP where data "
        "canaries do not (docs/privacy-audit.md)",
    )
    run.add_argument("--target-accuracy", type=float, help=argparse.SUPPRESS)
    report = sub.add_parser("report", help="audit.csv, audit.md and figures from a folder")
    report.add_argument("results_dir", metavar="RESULTS_DIR")
    return parser


def audit_grid(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """Check `run`'s own flags and put them in the grid; the argv that resumes the audit.

    SweepError (one line) for a bad --canaries or --audit-seed. The default folder is fixed
    here (and added to the argv), so the report after the runs finds it.
    """
    if args.canaries < 1:
        raise SweepError(
            f"--canaries {args.canaries} is not valid; expected an integer >= 1 "
            "(for runs without an audit, use fl-sweep run)"
        )
    if args.audit_seed < 0:
        raise SweepError(f"--audit-seed {args.audit_seed} is not valid; expected >= 0")
    # The open relay's server holds the average model too, one more observer;
    # `--set gossip-relay=sealed` audits from the nodes' own views only.
    args.defaults = ["gossip-relay=open"]
    args.forced = [
        (f"--canaries {args.canaries}", f"audit-canaries={args.canaries}"),
        (f"--audit-seed {args.audit_seed}", f"audit-seed={args.audit_seed}"),
    ]
    if args.whitebox:
        args.forced += [("--whitebox", "audit-mode=whitebox"), ("--whitebox", "dp-mode=update")]
    if args.out is None:
        args.out = default_out(args.preset or "audit", root="results/audits")
        argv = [*argv, "--out", str(args.out)]
    return argv


def main(argv: Sequence[str] | None = None, *, runner: Runner | None = None) -> int:
    """Entry point of `fl-audit`; `runner` replaces Flower in tests."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging()
    console = Console(stderr=True, log_path=False)
    try:
        check_args(args)
        if args.command == "run":
            argv = audit_grid(args, argv)
            code = command_run(args, argv, runner, prog="fl-audit")
            if args.dry_run or code not in (0, 1):
                return code
            out = args.out.expanduser().resolve()
        else:
            out = sweep_folder(Path(args.results_dir))
        from sim.analysis.audit import violations, write_audit_report  # pandas, matplotlib

        df, files = write_audit_report(out)
        console.log(f"audit of {df['cell'].nunique()} run(s): {out / 'audit.md'}", markup=False)
        Console().print((out / "audit.md").read_text(encoding="utf-8"), markup=False)
        if len(bad := violations(df)):
            sys.stderr.write(
                f"fl-audit: {len(bad)} observer(s) found more leakage than the accountant "
                f"allows (see {out / 'audit.md'}): the accounting or the audit is wrong\n"
            )
            return 3
        return 0 if args.command == "report" else code
    except SweepError as err:
        sys.stderr.write(f"fl-audit: {err}\n")
        return 2
