"""A simulation SuperLink this process owns: real `flwr run`s, stopped by process group.

Used by the sweep runner, the benchmarks and the end-to-end tests. The SuperLink gets its
own FLWR_HOME and a free loopback port, so it never collides with the user's `:local:`
SuperLink, and it is stopped (process group, by PID) when the `with` block ends.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sim.launch.connection import Connection
from sim.launch.flwr_cli import (
    PROJECT_DIR,
    FlowerRunError,
    FlwrCli,
    RunOutcome,
    flower_env,
    stage_app,
)
from sim.launch.processes import (
    console_script,
    free_port,
    port_answers,
    processes_under,
    stop_process_group,
    stop_processes,
)
from sim.launch.ray_head import RayHead
from sim.launch.watchdog import start_watchdog, stop_watchdog

CONNECTION = "owned"


class SimulationLink(Connection):
    """A `flower-superlink --simulation` started and stopped by this process.

    Its `flwr` commands (status, wait, logs) are the `Connection`'s, named `CONNECTION`.
    """

    def __init__(
        self,
        flwr_home: Path | None = None,
        *,
        ray_address: str | None = None,
        ray_cpus: int | None = None,
        gpus_per_node: float = 0.0,
        startup_timeout: float = 60.0,
    ) -> None:
        """Prepare (not start) a SuperLink with its own FLWR_HOME and port.

        Runs join the Ray cluster at `ray_address`; without one, a Ray head this link
        starts and stops, paid once for all its runs, with `ray_cpus` CPUs (default: all).
        `gpus_per_node`: Flower's `client-resources-num-gpus`, the share of a GPU each
        simulated node takes (0.25: four nodes per GPU; 0: none, and the local head hides
        the GPUs from the nodes).
        """
        self._tmp = None if flwr_home else tempfile.TemporaryDirectory(prefix="flwr-home-")
        self.home = Path(flwr_home or self._tmp.name).resolve()  # type: ignore[union-attr]
        self.startup_timeout = startup_timeout
        self.port = free_port()  # one HTTP port serves the Control, Runtime and Fleet APIs
        self.process: subprocess.Popen[bytes] | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self._staged: Path | None = None
        self.ray_head: RayHead | None = None
        self.gpus_per_node = gpus_per_node
        if ray_address is None:
            self.ray_head = RayHead(
                flower_env(self.home), num_cpus=ray_cpus, gpus=gpus_per_node > 0
            )
            ray_address = self.ray_head.address
        self.ray_address = ray_address
        # ray.init() in the simulation joins RAY_ADDRESS when it is set.
        extra = {"RAY_ADDRESS": ray_address} if ray_address else {}
        super().__init__(FlwrCli(self.home, CONNECTION, extra))

    @property
    def pid(self) -> int | None:
        """PID of the SuperLink process, once started."""
        return self.process.pid if self.process else None

    def __enter__(self) -> SimulationLink:
        """Start the SuperLink and wait until it answers."""
        self.cli.write_connection(f"127.0.0.1:{self.port}")
        # Whatever kills this process, nothing the SuperLink starts outlives it.
        self.watchdog = start_watchdog(self.home)
        if self.ray_head is not None:
            try:
                self.ray_head.start()
            except FlowerRunError:
                self.stop()
                raise
        log = open(self.home / "superlink.out", "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [
                console_script("flower-superlink"),
                "--insecure",
                "--simulation",
                "--isolation",
                "subprocess",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.home / "state.db"),
            ],
            env=self.env,  # the CLI's: the same FLWR_HOME (and RAY_ADDRESS) as the simulation's
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches its children
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.home / "superlink.out").read_text(errors="replace").strip()
                self.stop()  # and its watchdog
                raise FlowerRunError(
                    f"flower-superlink exited with code {self.process.returncode}: "
                    f"{tail.splitlines()[-1] if tail else 'no output'}"
                )
            if port_answers(self.port):
                return self
            time.sleep(0.5)
        self.stop()
        raise FlowerRunError(f"flower-superlink did not answer within {self.startup_timeout}s")

    def __exit__(self, *exc: object) -> None:
        """Stop the SuperLink and everything it started."""
        self.stop()

    def stop(self) -> None:
        """Terminate the SuperLink's process group by PID (then kill it if it lingers)."""
        if self.process is not None:
            stop_process_group(self.process)
        if self.ray_head is not None:
            self.ray_head.stop()
        if self.process is not None or self.ray_head is not None:
            stop_processes(processes_under(self.home), grace=5.0)  # any that left the groups
        stop_watchdog(self.watchdog)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def staged_app(self) -> Path:
        """The app's FAB contents, extracted once into this link's home (`stage_app`)."""
        if self._staged is None:
            self._staged, _ = stage_app(self.home / "app")
        return self._staged

    def submit(
        self, run_config: Mapping[str, Any], *, num_nodes: int, app_dir: Path = PROJECT_DIR
    ) -> str:
        """`flwr run` the app with these run-config overrides on `num_nodes` simulated nodes."""
        return self.cli.submit(
            self.staged_app() if app_dir == PROJECT_DIR else app_dir,
            run_config,
            federation_config=f"num-supernodes={num_nodes} client-resources-num-cpus=1 "
            f"client-resources-num-gpus={float(self.gpus_per_node)!r}",
        )

    def run(
        self, run_config: Mapping[str, Any], *, num_nodes: int, timeout: float = 3600
    ) -> RunOutcome:
        """Submit and wait."""
        return self.wait(self.submit(run_config, num_nodes=num_nodes), timeout=timeout)
