"""`scripts/local-deployment`: start a SuperLink and N SuperNodes on 127.0.0.1, or stop them.

`start N` runs in the foreground until Ctrl-C (or with `--detach` returns once every node is
online); `stop` stops every process `start` started, by PID (`sim.launch.deployment`).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from sim.launch.deploy_commands import LAUNCHER_POLICY
from sim.launch.deployment import Deployment
from sim.launch.deployment_folder import DEFAULT_DIR, console, stop_from_pids
from sim.launch.flwr_cli import PROJECT_DIR, FlowerRunError, inline_run_config
from sim.launch.processes import sigterm_as_interrupt


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
    start.add_argument(
        "--data-dir",
        default="",
        help="node-config data-dir: each SuperNode's own training files (a .npz with x and y, "
        "or a folder with the training idx files); {partition_id} in it is replaced by the "
        "node's partition id",
    )
    start.add_argument(
        "--detach", action="store_true", help="return once all nodes are online (stop later)"
    )
    return parser


def instructions(d: Deployment) -> str:
    """How to run the app against this deployment, printed by `start`."""
    home = f"FLWR_HOME={d.home}"
    nodes = d.num_nodes
    security = "TLS + SuperNode auth" if d.secure else "INSECURE: no TLS, no node auth"
    policy = d.node_policy(0)
    policy_text = (
        "Node policy: "
        + inline_run_config({k: v for k, v in policy.items() if k != "ledger-dir"})
        + f" (ledgers in {d.root}/node-*/ledger: delete them to reset the budgets)."
        if policy
        else "Node policy: none (every node accepts the run's privacy)."
    )
    strategy = "gossip" if nodes >= 3 else "fedavg"  # the default ring needs 3 nodes
    bound = f' partition-nodes="{d.partition_nodes}"' if d.node_ids else ""
    return "\n".join(
        [
            f"SuperLink {d.address} ({security}),"
            f" {nodes} SuperNodes (partition-id 0..{nodes - 1}, num-partitions={nodes}).",
            policy_text,
            f"Connection '{d.connection}' is in {d.home / 'config.toml'}.",
            "Logs: " + str(d.root / "{superlink,node-*}/out.log"),
            "",
            "Run the app (from the project folder, venv active):",
            f"  cd {PROJECT_DIR} && source .venv/bin/activate",
            f"  {home} flwr run . {d.connection} --run-config "
            f"'strategy=\"{strategy}\" eps=2 num-nodes={nodes}{bound}' --stream",
            f"  {home} flwr list {d.connection}",
            f"  {home} flwr supernode list {d.connection}",
            "Results: results/<run-name>/ (rounds.csv, summary.json) of this project.",
            "",
            f"Stop: Ctrl-C here, or  scripts/local-deployment stop --dir {d.root}",
        ]
    )


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
        # In the foreground, the deployment dies with the launcher, however it dies.
        watchdog=not args.detach,
    )
    try:
        deployment.__enter__()
    except (FlowerRunError, subprocess.TimeoutExpired) as err:
        console.log(f"start failed: {err}")
        return 1
    except KeyboardInterrupt:
        return 130
    Console().print(instructions(deployment), soft_wrap=True, highlight=False, markup=False)
    if args.detach:
        return 0
    return _run_foreground(deployment)


if __name__ == "__main__":
    raise SystemExit(main())
