"""sim/launch/local_link.py: the `:local:` SuperLink is stopped, the user's shell never."""

import os
import subprocess
import time

from sim.launch.local_link import local_processes, main
from sim.launch.processes import alive


def spawn(home, *argv):
    env = {**os.environ, "FLWR_HOME": str(home)}
    return subprocess.Popen(list(argv), env=env, start_new_session=True)


def test_only_flower_and_ray_processes_under_the_home_are_stopped(tmp_path, monkeypatch):
    home = tmp_path / ".flwr"
    # What the CLI leaves (the name is what /proc/PID/cmdline shows) and the user's shell.
    link = spawn(home, "bash", "-c", "exec -a flower-superlink sleep 120")
    shell = spawn(home, "sleep", "120")
    elsewhere = spawn(tmp_path / "other", "bash", "-c", "exec -a flower-superlink sleep 120")
    try:
        time.sleep(0.3)
        assert local_processes(home) == [link.pid]
        monkeypatch.setenv("FLWR_HOME", str(home))
        assert main(["stop"]) == 0
        link.wait(timeout=10)
        assert alive(shell.pid) and alive(elsewhere.pid) and not local_processes(home)
        assert main(["nonsense"]) == 2
    finally:
        for p in (link, shell, elsewhere):
            p.kill()
            p.wait()
