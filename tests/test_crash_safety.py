"""A killed command leaves nothing running and no second writer: real processes, no Flower."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flower_app.results import FolderLock, FolderLocked, RunFiles
from sim.launch.processes import alive, processes_under
from sim.sweeps.cli import main
from sim.sweeps.folders import LAUNCH_RECORD, SWEEP_LOCK, record_links, stop_leftovers
from tests.sweep_fakes import FakeRunner

ROOT = Path(__file__).resolve().parent.parent


def python(code: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def hold_lock(path: Path) -> subprocess.Popen:
    proc = python(
        f"""
        import time
        from flower_app.results import FolderLock
        held = FolderLock({str(path)!r}, "x").acquire()
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken(tmp_path):
    holder = hold_lock(tmp_path / "f.lock")
    try:
        with pytest.raises(FolderLocked, match=f"folder f is being written by PID {holder.pid}"):
            FolderLock(tmp_path / "f.lock", "folder f").acquire()
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path / "f.lock", "folder f"):  # the kernel dropped the dead one's lock
        pass


def test_a_run_folder_has_one_writer(tmp_path):
    holder = hold_lock(tmp_path / ".r.lock")
    try:
        with pytest.raises(FolderLocked, match="run folder"):
            RunFiles(tmp_path / "r", lock=True)
    finally:
        holder.kill()
        holder.wait()
    files = RunFiles(tmp_path / "r", lock=True)
    files.start({})
    files.finish({"status": "completed"})
    with pytest.raises(FileExistsError):
        RunFiles(tmp_path / "r", lock=True)


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "s"
    holder = hold_lock(out / SWEEP_LOCK)
    argv = ["run", "--strategies", "fedavg", "--eps", "2", "--rounds", "1", "--nodes", "2"]
    try:
        assert main([*argv, "--out", str(out)], runner=FakeRunner()) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"is being written by PID {holder.pid}" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    assert main([*argv, "--out", str(out)], runner=FakeRunner()) == 0


def test_a_rerun_stops_what_a_killed_sweep_left_running(tmp_path):
    home = tmp_path / "home"
    leftover = subprocess.Popen(["sleep", "120"], env={**os.environ, "FLWR_HOME": str(home)})
    try:
        record_links(tmp_path, [tmp_path / "other-home", home])
        record = json.loads((tmp_path / LAUNCH_RECORD).read_text())
        assert record["flwr_homes"][1] == str(home)
        logged = []
        assert stop_leftovers(tmp_path, logged.append) == [leftover.pid]
        leftover.wait(timeout=10)
        assert "left" in logged[0]
        assert stop_leftovers(tmp_path, logged.append) == []
    finally:
        leftover.kill()
        leftover.wait()


def test_the_watchdog_stops_everything_under_the_home_once_its_command_is_sigkilled(tmp_path):
    home = tmp_path / "home"
    command = python(
        f"""
        import os, subprocess, time
        from sim.launch.watchdog import start_watchdog
        dog = start_watchdog({str(home)!r})
        child = subprocess.Popen(["sleep", "120"], env={{**os.environ, "FLWR_HOME": {str(home)!r}}},
                                 start_new_session=True)  # escapes the command's group
        print(dog.pid, child.pid, flush=True)
        time.sleep(120)
        """
    )
    dog, child = (int(x) for x in command.stdout.readline().split())
    assert alive(child) and alive(dog)
    os.kill(command.pid, signal.SIGKILL)
    command.wait()
    wait_until(lambda: not alive(child) and not alive(dog))
    assert processes_under(home) == []
