"""Drive real `flwr run`s against a simulation SuperLink that this process owns by PID.

Used by the sweep runner, the benchmarks and the end-to-end tests. The SuperLink gets its
own FLWR_HOME and free loopback ports, so it never collides with the user's `:local:`
SuperLink, and it is stopped (process group, by PID) when the `with` block ends.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from flwr.cli.build import build_fab_from_disk  # pinned flwr: builds the FAB as `flwr run` does

# Offline machines: no runtime dependency install (else exit 608), no update check, no telemetry.
FLWR_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    # Ray warns on every start that this default will change; with no GPUs it changes nothing.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
CONNECTION = "owned"
# While a run's summary.json is awaited: how often to look at the file, and to ask Flower.
MARKER_POLL_S = 0.5
STATUS_EVERY_S = 15.0
FINISHED = "finished:"
PROJECT_DIR = Path(__file__).resolve().parent.parent


class FlowerRunError(RuntimeError):
    """A `flwr` command failed before the run could start."""


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended, as `flwr list` reports it."""

    run_id: str
    status: str
    details: str
    elapsed_s: float

    @property
    def completed(self) -> bool:
        """Whether Flower reports the run completed (exit code 0 alone does not say so)."""
        return self.status == "finished:completed"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """A console script of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def overrides_toml(run_config: Mapping[str, Any]) -> str:
    """Run-config overrides as a TOML document (quoting strings, keeping inf a float)."""
    return tomli_w.dumps(dict(run_config))


def _summary_path(run_config: Mapping[str, Any]) -> Path | None:
    """Where the ServerApp will write this run's summary.json, when the config says."""
    results_dir, name = run_config.get("results-dir"), run_config.get("run-name")
    if not results_dir or not name:
        return None
    path = Path(str(results_dir)).expanduser()
    return (path if path.is_absolute() else PROJECT_DIR / path) / str(name) / "summary.json"


class _Marker:
    """A run's summary.json, counted only once written after the run was submitted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.before = self._mtime()

    def _mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return None

    def fresh(self) -> bool:
        mtime = self._mtime()
        return mtime is not None and mtime != self.before


class SimulationLink:
    """A `flower-superlink --simulation` started and stopped by this process."""

    connection = CONNECTION  # the connection name `flwr` commands use (its config.toml)

    def __init__(
        self,
        flwr_home: Path | None = None,
        *,
        ray_address: str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        """Prepare (not start) a SuperLink with its own FLWR_HOME and ports."""
        self._tmp = None if flwr_home else tempfile.TemporaryDirectory(prefix="flwr-home-")
        self.home = Path(flwr_home or self._tmp.name)  # type: ignore[union-attr]
        self.ray_address = ray_address
        self.startup_timeout = startup_timeout
        self.port = free_port()  # one HTTP port serves the Control, Runtime and Fleet APIs
        self.process: subprocess.Popen[bytes] | None = None
        self._staged: Path | None = None
        self._markers: dict[str, _Marker] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment for `flwr` commands and the SuperLink (and so the simulation)."""
        env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(self.home)}
        # The SuperLink spawns flower-superexec and flwr-simulation by name.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address  # ray.init() in the simulation joins it
        return env

    @property
    def pid(self) -> int | None:
        """PID of the SuperLink process, once started."""
        return self.process.pid if self.process else None

    def __enter__(self) -> SimulationLink:
        """Start the SuperLink and wait until it answers."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            tomli_w.dumps(
                {
                    "superlink": {
                        "default": CONNECTION,
                        CONNECTION: {
                            "address": f"127.0.0.1:{self.port}",
                            "insecure": True,
                        },
                    }
                }
            )
        )
        log = open(self.home / "superlink.out", "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [
                _bin("flower-superlink"),
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
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches its children
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.home / "superlink.out").read_text(errors="replace").strip()
                raise FlowerRunError(
                    f"flower-superlink exited with code {self.process.returncode}: "
                    f"{tail.splitlines()[-1] if tail else 'no output'}"
                )
            if self._answers():
                return self
            time.sleep(0.5)
        self.stop()
        raise FlowerRunError(f"flower-superlink did not answer within {self.startup_timeout}s")

    def __exit__(self, *exc: object) -> None:
        """Stop the SuperLink and everything it started."""
        self.stop()

    def _answers(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        """Terminate the SuperLink's process group by PID (then kill it if it lingers)."""
        if self.process is None or self.process.poll() is not None:
            self._cleanup_tmp()
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self._cleanup_tmp()

    def _cleanup_tmp(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a `flwr` CLI command against this SuperLink."""
        return subprocess.run(
            [_bin("flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=PROJECT_DIR,
        )

    def staged_app(self) -> Path:
        """The app's FAB contents, extracted once into this link's home.

        `flwr run DIR` walks every file under DIR (the project's .venv: ~47,000 files, about
        6 s of CPU) before filtering; a directory holding only the app's files costs nothing.
        """
        if self._staged is None:
            staged = self.home / "app"
            with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(PROJECT_DIR))) as fab:
                members = [m for m in fab.namelist() if not m.startswith(".info/")]
                fab.extractall(staged, members)
            self._staged = staged
        return self._staged

    def submit(
        self, run_config: Mapping[str, Any], *, num_nodes: int, app_dir: Path = PROJECT_DIR
    ) -> str:
        """`flwr run` the app with these run-config overrides on `num_nodes` simulated nodes."""
        if app_dir == PROJECT_DIR:
            app_dir = self.staged_app()
        marker = _summary_path(run_config)
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
            fh.write(overrides_toml(run_config))
            overrides = fh.name
        try:
            proc = self.flwr(
                "run",
                str(app_dir),
                self.connection,
                "--run-config",
                overrides,
                "--federation-config",
                f"num-supernodes={num_nodes} client-resources-num-cpus=1 "
                "client-resources-num-gpus=0.0",
                "--format",
                "json",
            )
        finally:
            os.unlink(overrides)
        try:
            payload = json.loads(proc.stdout[proc.stdout.index("{") :])
        except ValueError:
            payload = {}
        if proc.returncode != 0 or not payload.get("success"):
            detail = (payload.get("error-message") or proc.stderr or proc.stdout).strip()
            raise FlowerRunError(f"flwr run failed: {detail.splitlines()[-1] if detail else '?'}")
        run_id = str(payload["run-id"])
        if marker is not None:
            self._markers[run_id] = _Marker(marker)
        return run_id

    def status(self, run_id: str) -> RunOutcome:
        """The run's status from `flwr list --run-id`."""
        proc = self.flwr("list", self.connection, "--run-id", run_id, "--format", "json")
        try:
            run = json.loads(proc.stdout)["runs"][0]
        except (ValueError, KeyError, IndexError):
            raise FlowerRunError(f"flwr list failed: {proc.stderr or proc.stdout}") from None
        return RunOutcome(
            run_id=run_id,
            status=str(run["status"]),
            details=str(run.get("status-details", "")),
            elapsed_s=float(run.get("elapsed", 0.0)),
        )

    def wait(
        self,
        run_id: str,
        *,
        timeout: float = 3600,
        poll_s: float = 2.0,
        on_poll: Callable[[], None] | None = None,
    ) -> RunOutcome:
        """Block until the run finishes (or stop it at `timeout`).

        Each `flwr list` is a new process costing about 1.5 s of CPU, which on two cores is
        taken from training. When the run's summary.json is known (`results-dir` and
        `run-name` given), the file is watched instead and Flower asked only once it appears,
        or every `STATUS_EVERY_S` to catch a run that fails before writing it.
        """
        deadline = time.monotonic() + timeout
        marker = self._markers.pop(run_id, None)
        next_status = 0.0
        while True:
            now = time.monotonic()
            if marker is None or marker.fresh() or now >= next_status:
                outcome = self.status(run_id)
                if outcome.status.startswith(FINISHED):
                    return outcome
                next_status = now + (poll_s if marker is None else STATUS_EVERY_S)
            if now > deadline:
                self.flwr("stop", run_id, self.connection)
                return RunOutcome(run_id, "finished:timeout", f"timed out after {timeout}s", 0)
            if on_poll:
                on_poll()
            time.sleep(poll_s if marker is None else MARKER_POLL_S)

    def logs(self, run_id: str) -> str:
        """The run's log as far as the SuperLink keeps it."""
        return self.flwr("log", run_id, self.connection, "--show", timeout=60).stdout

    def run(
        self, run_config: Mapping[str, Any], *, num_nodes: int, timeout: float = 3600
    ) -> RunOutcome:
        """Submit and wait."""
        return self.wait(self.submit(run_config, num_nodes=num_nodes), timeout=timeout)
