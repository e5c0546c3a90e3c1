"""Stops every process a project command started once that command dies, however it dies.

A SIGKILLed `fl-sweep` (or `fl-bench`, or a test) cannot stop its SuperLink, and Flower's
simulation and Ray's raylet and workers outlive their parents. Every one of them inherits the
FLWR_HOME the command gave its SuperLink, so a small watchdog process in its own session
polls the command's PID and, when it is gone, stops everything under that FLWR_HOME
(`processes_under`). A command that ends normally stops the watchdog itself.

    python -m sim.launch.watchdog PID START_TIME FLWR_HOME
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sim.launch.processes import alive, processes_under, start_time, stop_processes

POLL_S = 0.5


def start_watchdog(home: Path) -> subprocess.Popen[bytes]:
    """Watch this process: when it dies, stop every process whose FLWR_HOME is `home`."""
    env = {k: v for k, v in os.environ.items() if k != "FLWR_HOME"}  # never its own target
    me = os.getpid()
    return subprocess.Popen(
        [sys.executable, "-m", "sim.launch.watchdog", str(me), str(start_time(me)), str(home)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives a kill of the command's process group
        cwd=Path(__file__).resolve().parents[2],
    )


def stop_watchdog(watchdog: subprocess.Popen[bytes] | None) -> None:
    """End a watchdog whose command is stopping its processes itself."""
    if watchdog is not None and watchdog.poll() is None:
        watchdog.kill()
        watchdog.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Wait for the parent to die, then stop what lives under its FLWR_HOME."""
    pid, started, home = (argv if argv is not None else sys.argv[1:])[:3]
    parent, born = int(pid), int(started) if started != "None" else None
    while alive(parent) and start_time(parent) == born:
        time.sleep(POLL_S)
    stop_processes(processes_under(Path(home)), grace=5.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
