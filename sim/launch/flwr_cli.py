"""The `flwr` CLI against one SuperLink connection: submit a run, ask its status, wait, read logs.

One `FlwrCli` per FLWR_HOME and connection name. The owned simulation SuperLink
(`sim.launch.simulation`) and the local deployment (`sim.launch.deployment`) each hold one as
a `sim.launch.connection.Connection`, which passes status, wait and logs on to it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
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

from sim.launch.processes import console_script

# Offline machines: no runtime dependency install (else exit 608), no update check, no telemetry.
FLWR_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    # Ray warns on every start that this default will change; with no GPUs it changes nothing.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
FORCED_COLOUR = ("FORCE_COLOR", "CLICOLOR_FORCE")
# While a run's summary.json is awaited: how often to look at the file, and to ask Flower.
MARKER_POLL_S = 0.5
STATUS_EVERY_S = 15.0
FINISHED = "finished:"
PROJECT_DIR = Path(__file__).resolve().parents[2]


def stage_app(dest: Path) -> tuple[Path, str]:
    """The app's FAB contents extracted into `dest`, and the FAB's SHA-256.

    `flwr run DIR` walks every file under DIR (the project's .venv: ~47,000 files, about
    6 s of CPU) before filtering; a directory holding only the app's files costs nothing,
    and builds the very same FAB (same hash, which a node's allow-list names).
    """
    fab_bytes = build_fab_from_disk(PROJECT_DIR)
    with zipfile.ZipFile(io.BytesIO(fab_bytes)) as fab:
        fab.extractall(dest, [m for m in fab.namelist() if not m.startswith(".info/")])
    return dest, hashlib.sha256(fab_bytes).hexdigest()


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


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Environment of a Flower process (CLI, SuperLink, SuperNode) whose home is `flwr_home`."""
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(flwr_home), **extra}
    # A Jupyter kernel sets these (ipykernel's zmqshell): `flwr ... --format json` would then
    # print its JSON in ANSI colours, which no parser reads.
    for name in FORCED_COLOUR:
        env.pop(name, None)
    # Flower spawns flower-superexec, flwr-simulation and flwr-clientapp by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def overrides_toml(run_config: Mapping[str, Any]) -> str:
    """Run-config overrides as a TOML document (quoting strings, keeping inf a float)."""
    return tomli_w.dumps(dict(run_config))


def inline_run_config(run_config: Mapping[str, Any]) -> str:
    """`--run-config` (or `--node-config`) as typed on a command line: `k=v`, strings quoted."""
    pairs = []
    for key, value in run_config.items():
        toml_value = tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
        pairs.append(f"{key}={toml_value}")
    return " ".join(pairs)


def connection_config(name: str, address: str, root_certificates: Path | None) -> dict[str, Any]:
    """The `flwr` CLI's Flower config file (`$FLWR_HOME/config.toml`) for one SuperLink."""
    conn: dict[str, Any] = {"address": address}
    if root_certificates:
        conn["root-certificates"] = str(root_certificates)
    else:
        conn["insecure"] = True
    return {"superlink": {"default": name, name: conn}}


def json_payload(proc: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    """The JSON object a `flwr ... --format json` command printed (after any log lines)."""
    try:
        return dict(json.loads(proc.stdout[proc.stdout.index("{") :]))
    except ValueError:
        raise FlowerRunError(f"{what} failed: {(proc.stdout + proc.stderr).strip()}") from None


def summary_path(run_config: Mapping[str, Any]) -> Path | None:
    """Where the ServerApp will write this run's summary.json, when the config says."""
    results_dir, name = run_config.get("results-dir"), run_config.get("run-name")
    if not results_dir or not name:
        return None
    path = Path(str(results_dir)).expanduser()
    return (path if path.is_absolute() else PROJECT_DIR / path) / str(name) / "summary.json"


class SummaryMarker:
    """A run's summary.json, counted only once written after the run was submitted."""

    def __init__(self, path: Path) -> None:
        """Remember the file's current state."""
        self.path = path
        self.before = self._mtime()

    def _mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return None

    def fresh(self) -> bool:
        """Whether the file was (re)written since."""
        mtime = self._mtime()
        return mtime is not None and mtime != self.before


class FlwrCli:
    """`flwr` commands with one FLWR_HOME (holding config.toml) and one connection name."""

    def __init__(self, home: Path, connection: str, extra_env: Mapping[str, str] | None = None):
        """Commands will use `home`/config.toml's `[superlink.<connection>]`."""
        self.home, self.connection = Path(home), connection
        self.extra_env = dict(extra_env or {})
        self._markers: dict[str, SummaryMarker] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment of the `flwr` commands."""
        return flower_env(self.home, **self.extra_env)

    def write_connection(self, address: str, root_certificates: Path | None = None) -> None:
        """`home`/config.toml with this connection as the default."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            tomli_w.dumps(connection_config(self.connection, address, root_certificates))
        )

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a `flwr` CLI command."""
        return subprocess.run(
            [console_script("flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=PROJECT_DIR,
        )

    def submit(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any],
        *,
        federation_config: str | None = None,
    ) -> str:
        """`flwr run APP CONNECTION --run-config overrides.toml`; returns the run id."""
        marker = summary_path(run_config)
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
            fh.write(overrides_toml(run_config))
            overrides = fh.name
        federation = ["--federation-config", federation_config] if federation_config else []
        try:
            proc = self.flwr(
                "run",
                str(app_dir),
                self.connection,
                "--run-config",
                overrides,
                *federation,
                "--format",
                "json",
            )
        finally:
            os.unlink(overrides)
        try:
            payload = json_payload(proc, "flwr run")
        except FlowerRunError:
            payload = {}
        if proc.returncode != 0 or not payload.get("success"):
            detail = (payload.get("error-message") or proc.stderr or proc.stdout).strip()
            raise FlowerRunError(f"flwr run failed: {detail.splitlines()[-1] if detail else '?'}")
        run_id = str(payload["run-id"])
        if marker is not None:
            self._markers[run_id] = SummaryMarker(marker)
        return run_id

    def status(self, run_id: str) -> RunOutcome:
        """The run's status from `flwr list --run-id`."""
        proc = self.flwr("list", self.connection, "--run-id", run_id, "--format", "json")
        try:
            run = json_payload(proc, "flwr list")["runs"][0]
        except (KeyError, IndexError):
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
        or at growing gaps (up to `STATUS_EVERY_S`) to catch a run that fails before writing it:
        a refused run fails within seconds.
        """
        deadline = time.monotonic() + timeout
        marker = self._markers.pop(run_id, None)
        next_status, gap = 0.0, 1.0  # without the file yet: 1, 2, 4, ... up to STATUS_EVERY_S
        while True:
            now = time.monotonic()
            if marker is None or marker.fresh() or now >= next_status:
                outcome = self.status(run_id)
                if outcome.status.startswith(FINISHED):
                    return outcome
                next_status = now + (poll_s if marker is None else gap)
                gap = min(STATUS_EVERY_S, 2 * gap)
            if now > deadline:
                self.flwr("stop", run_id, self.connection)
                return RunOutcome(run_id, "finished:timeout", f"timed out after {timeout}s", 0)
            if on_poll:
                on_poll()
            time.sleep(poll_s if marker is None else MARKER_POLL_S)

    def logs(self, run_id: str) -> str:
        """The run's log as far as the SuperLink keeps it."""
        return self.flwr("log", run_id, self.connection, "--show", timeout=60).stdout
