"""The `:local:` SuperLink that `flwr run .` starts by itself, found and stopped by PID.

Flower 1.42's CLI starts a detached `flower-superlink --simulation` the first time a command
uses the `:local:` connection and leaves it running; Flower has no command to stop it. Its
processes (the SuperLink, its SuperExec, a simulation still running, Ray) inherit the
project's FLWR_HOME. So does the user's shell once the venv is activated, which is why only
processes whose command line is Flower's or Ray's are ever stopped.

    python -m sim.launch.local_link pids     # the running local SuperLink's processes, if any
    python -m sim.launch.local_link stop     # stop them (SIGTERM, then SIGKILL)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sim.launch.flwr_cli import PROJECT_DIR
from sim.launch.processes import command_line, processes_under, stop_processes

FLOWER_AND_RAY = (
    "flower-superlink",
    "flower-superexec",
    "flwr-simulation",
    "flwr-serverapp",
    "flwr-clientapp",
    "ray::",
    "raylet",
    "gcs_server",
    "ray/_private",
    "ray/dashboard",
    "default_worker.py",
)


def flower_home() -> Path:
    """The FLWR_HOME the project's venv exports (scripts/setup)."""
    return Path(os.environ.get("FLWR_HOME") or PROJECT_DIR / ".flwr").resolve()


def local_processes(home: Path | None = None) -> list[int]:
    """Flower and Ray processes under `home`: what the `:local:` SuperLink runs."""
    found = []
    for pid in processes_under(home or flower_home()):
        line = command_line(pid)
        if any(name in line for name in FLOWER_AND_RAY):
            found.append(pid)
    return sorted(found)


def main(argv: Sequence[str] | None = None) -> int:
    """`pids` prints them (nothing if none), `stop` stops them."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in (["pids"], ["stop"]):
        sys.stderr.write("usage: python -m sim.launch.local_link pids|stop\n")
        return 2
    pids = local_processes()
    if args == ["pids"]:
        if pids:
            sys.stdout.write(" ".join(map(str, pids)) + "\n")
        return 0
    stop_processes(pids, grace=10.0)
    left = local_processes()
    if left:
        sys.stderr.write(f"local_link: still running after SIGKILL: {left}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
