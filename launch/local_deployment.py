"""`scripts/local-deployment`: start a SuperLink and N SuperNodes on 127.0.0.1, or stop them.

`start N` runs in the foreground until Ctrl-C (or with `--detach` returns once every node is
online); `stop` stops every process `start` started, by PID (`launch.deployment`).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from launch.deployment import (
    DEFAULT_DIR,
    LAUNCHER_POLICY,
    Deployment,
    console,
    stop_from_pids,
)
from launch.flwr_cli import FlowerRunError
from launch.processes import sigterm_as_interrupt


def build_parser() -> argparse.ArgumentParser:
    """`start N [--dir DIR] ...` and `stop [--dir DIR]`."""
    parser = argparse.ArgumentParser(
        prog="local-deployment",
        description="A SuperLink and N SuperNodes on 127.0.0.1 (TLS + SuperNode auth).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a SuperLink and N SuperNodes")
    start.add_argument("num_nodes", type=int, metavar="N")
    stop = sub.add_parser("stop", help="stop everything `start` started (by PID)")
    for p in (start, stop):
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"default {DEFAULT_DIR}")
    start.add_argument("--port", type=int, default=0, help="SuperLink port (default: a free one)")
    start.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode auth")
    start.add_argument("--data-dir", default="", help="node-config data-dir of every SuperNode")
    start.add_argument(
        "--detach", action="store_true", help="return once all nodes are online (stop later)"
    )
    return parser


def _run_foreground(deployment: Deployment) -> int:
    """Wait until Ctrl-C (or SIGTERM, or the SuperLink dies), then stop everything."""
    try:
        with sigterm_as_interrupt():
            while deployment.process is not None and deployment.process.poll() is None:
                time.sleep(1)
        console.log("the SuperLink exited; stopping the SuperNodes")
        return 1
    except KeyboardInterrupt:
        console.log("stopping")
        return 0
    finally:
        deployment.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `scripts/local-deployment`."""
    args = build_parser().parse_args(argv)
    if args.command == "stop":
        stopped = stop_from_pids(args.dir)
        console.log(f"stopped {len(stopped)} process(es)" if stopped else "nothing running")
        return 0
    if args.num_nodes < 1:
        console.log("N must be at least 1")
        return 2
    deployment = Deployment(
        args.dir,
        args.num_nodes,
        secure=not args.insecure,
        port=args.port,
        data_dir=args.data_dir,
        policy=LAUNCHER_POLICY,
    )
    try:
        deployment.__enter__()
    except (FlowerRunError, subprocess.TimeoutExpired) as err:
        console.log(f"start failed: {err}")
        return 1
    except KeyboardInterrupt:
        return 130
    Console().print(deployment.instructions(), soft_wrap=True, highlight=False, markup=False)
    if args.detach:
        return 0
    return _run_foreground(deployment)


if __name__ == "__main__":
    raise SystemExit(main())
