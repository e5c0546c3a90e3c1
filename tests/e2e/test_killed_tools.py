"""SIGKILL a project command mid-run: nothing it started keeps running; a re-run finishes."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from sim.launch.deployment_folder import read_pids
from sim.launch.processes import alive, descendants, processes_under
from tests.e2e.test_deployment import LAUNCHER

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def cell_status(out):
    try:
        return {
            c["id"]: c["status"] for c in json.loads((out / "manifest.json").read_text())["cells"]
        }
    except (OSError, ValueError):
        return {}


def rows_written(folder):
    try:
        return len((folder / "rounds.csv").read_text().strip().splitlines()) - 1
    except OSError:
        return 0


def test_a_sigkilled_sweep_leaves_nothing_running_and_its_rerun_writes_each_row_once(tmp_path):
    """Both cells run in one Flower run; the sweep is killed in the middle of the second."""
    out = tmp_path / "sweep"
    argv = [str(BIN / "fl-sweep"), "run", "--strategies", "fedavg", "--eps", "2"]
    argv += ["--seeds", "7,8", "--rounds", "5", "--nodes", "2", "--out", str(out)]
    argv += ["--set", "samples-per-node=200", "--set", "test-samples=300"]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: (out / "runs" / "fedavg-eps2-seed7").exists(), 600, "the first cell")
        # A second writer on the same folder is refused at once, naming the first.
        rival = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert rival.returncode == 2
        assert f"is being written by PID {first.pid}" in rival.stderr, rival.stderr
        (home,) = map(Path, json.loads((out / ".launch.json").read_text())["flwr_homes"])
        running = processes_under(home)
        assert running, "the cell's SuperLink, simulation and Ray should be running"
        second = out / "runs" / "fedavg-eps2-seed8"
        wait_until(lambda: rows_written(second) >= 1, 600, "the second cell's first round")
        assert not (second / "summary.json").exists(), "the second cell ended before the kill"
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        killed_at = time.monotonic()
        # A process that is exiting has already lost its environment (so it is no longer
        # "under" the home) but is not gone yet: wait for both.
        wait_until(
            lambda: not processes_under(home) and not [p for p in running if alive(p)],
            30,
            "the killed sweep's processes to end",
        )
        print(  # noqa: T201
            f"{len(running)} processes under the sweep's FLWR_HOME before SIGKILL; none "
            f"{time.monotonic() - killed_at:.1f}s after"
        )
        assert not [p for p in running if alive(p)]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 of 2 cells already completed: skipped" in rerun.stderr, rerun.stderr[-3000:]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    counts = Counter((r["cell"], r["round"]) for r in rows)
    assert set(counts.values()) == {1} and len(counts) == 2 * 5, counts
    assert set(cell_status(out).values()) == {"completed"}
    print(f"re-run: {len(rows)} rows in sweep.csv, each (cell, round) once")  # noqa: T201


@pytest.mark.deploy
def test_after_a_sigkilled_launcher_stop_leaves_nothing_running(tmp_path):
    root = tmp_path / "dep"
    launcher = subprocess.Popen(
        [LAUNCHER, "start", "1", "--insecure", "--dir", root],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: (root / "pids.json").exists(), 240, "the deployment to start")
        pids = read_pids(root)
        started = [pids["superlink"], *pids["supernodes"].values()]
        started += [c for p in started for c in descendants(p)]
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        stop = subprocess.run(
            [LAUNCHER, "stop", "--dir", root], capture_output=True, text=True, timeout=120
        )
        assert stop.returncode == 0, stop.stderr
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    wait_until(
        lambda: not processes_under(root) and not [p for p in started if alive(p)],
        30,
        "the deployment's processes to end",
    )
