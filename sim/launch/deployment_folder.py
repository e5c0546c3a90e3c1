"""Where a local deployment keeps everything, what it makes there, and stopping one.

    certs/  keys/  flwr-home/config.toml (the CLI's connection)  superlink/  node-<i>/
    pids.json (what `stop` kills)

A `DeploymentFolder` is the `flwr` connection to the deployment in it (its home holds the
CLI's config.toml): certificates and node keys (`scripts/`), SuperNode registration and the
nodes the SuperLink sees. It starts no process (`sim.launch.deployment.Deployment` does);
`stop_from_pids` stops a deployment another process started.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from sim.launch.connection import Connection
from sim.launch.flwr_cli import PROJECT_DIR, FlowerRunError, FlwrCli, flower_env, json_payload
from sim.launch.processes import alive, command_line, processes_under, stop_processes

CONNECTION = "local-deployment"
DEFAULT_DIR = PROJECT_DIR / ".flwr" / CONNECTION
PIDS = "pids.json"
SCRIPTS = PROJECT_DIR / "scripts"
# Only processes whose command line says they are Flower's are ever signalled from pids.json
# (a PID from an old file may belong to someone else by now).
FLOWER_PROCESSES = ("flower-superlink", "flower-supernode", "fdg-superexec")

console = Console(stderr=True, log_path=False)


class DeploymentFolder(Connection):
    """The folder of a deployment under `root`, and the `flwr` connection to its SuperLink."""

    def __init__(self, root: Path, *, secure: bool = True) -> None:
        """The folder `root` (TLS certificates and node keys unless `secure=False`)."""
        self.root = Path(root).resolve()
        self.home = self.root / "flwr-home"
        self.secure = secure
        super().__init__(FlwrCli(self.home, CONNECTION))

    @property
    def certs(self) -> Path | None:
        """The folder `scripts/make-certs` wrote (None when insecure)."""
        return self.root / "certs" if self.secure else None

    @property
    def ca(self) -> Path | None:
        """The CA certificate SuperNodes and the CLI verify the SuperLink with."""
        return self.root / "certs" / "ca.crt" if self.secure else None

    def key(self, name: str) -> Path:
        """A SuperNode's private key (its `.pub` sits next to it)."""
        return self.root / "keys" / name

    def node_home(self, partition_id: int) -> Path:
        """A SuperNode's FLWR_HOME and log folder, as if it were its own device."""
        return self.root / f"node-{partition_id}"

    def ledger_dir(self, partition_id: int) -> Path:
        """Where SuperNode `partition_id` keeps its durable privacy ledger."""
        return self.node_home(partition_id) / "ledger"

    def env_for(self, flwr_home: Path) -> dict[str, str]:
        """Environment of a Flower process whose home is `flwr_home`."""
        return flower_env(flwr_home)

    def run_script(self, name: str, *args: str) -> None:
        """Run `scripts/<name>` (make-certs, make-node-keys) with this folder's environment."""
        proc = subprocess.run(
            ["bash", str(SCRIPTS / name), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env_for(self.home) | {"PYTHON": sys.executable},
        )
        if proc.returncode != 0:
            raise FlowerRunError(f"{name} failed: {(proc.stderr or proc.stdout).strip()}")

    def make_keys(self, name: str) -> Path:
        """A SuperNode key pair (kept if it exists); returns the private key's path."""
        if not self.key(name).exists():
            self.run_script("make-node-keys", name, str(self.key(name).parent))
        return self.key(name)

    def register(self, public_key: Path, name: str) -> int:
        """`flwr supernode register`: allow the SuperNode holding this key pair to connect."""
        proc = self.flwr(
            "supernode",
            "register",
            str(public_key),
            self.connection,
            "--name",
            name,
            "--format",
            "json",
        )
        payload = json_payload(proc, "flwr supernode register")
        if "node-id" not in payload:
            raise FlowerRunError(f"flwr supernode register failed: {payload}")
        return int(payload["node-id"])

    # What the SuperLink knows of its SuperNodes.
    def supernodes(self) -> list[dict[str, Any]]:
        """`flwr supernode list`: every node the SuperLink knows, with its status."""
        proc = self.flwr("supernode", "list", self.connection, "--format", "json", timeout=60)
        payload = json_payload(proc, "flwr supernode list")
        if "nodes" not in payload:
            raise FlowerRunError(f"flwr supernode list failed: {payload}")
        return list(payload["nodes"])

    def online(self) -> list[dict[str, Any]]:
        """The nodes the SuperLink sees online."""
        return [n for n in self.supernodes() if n.get("status") == "online"]

    def superlink_running(self) -> bool:
        """Whether a SuperLink from this folder's pids.json still runs."""
        pids = read_pids(self.root)
        return bool(pids) and is_flower(pids.get("superlink", 0))


# --- pids.json ----------------------------------------------------------------------------


def read_pids(root: Path) -> dict[str, Any]:
    """The deployment's pids.json, or {} when there is none."""
    try:
        return dict(json.loads((Path(root) / PIDS).read_text()))
    except (OSError, ValueError):
        return {}


def is_flower(pid: int) -> bool:
    """Whether `pid` runs and is one of Flower's processes (not a reused PID)."""
    return alive(pid) and any(name in command_line(pid) for name in FLOWER_PROCESSES)


def stop_from_pids(root: Path) -> list[int]:
    """Stop the deployment recorded in `root/pids.json` (SuperNodes first); the PIDs signalled."""
    pids = read_pids(root)
    nodes = [int(p) for p in pids.get("supernodes", {}).values()]
    nodes += [int(p) for p in pids.get("superexecs", {}).values()]
    stopped = stop_processes([p for p in nodes if is_flower(p)])
    if is_flower(link := int(pids.get("superlink", 0))):
        stopped += stop_processes([link])
    stopped += stop_stragglers(root)
    (Path(root) / PIDS).unlink(missing_ok=True)
    return stopped


def stop_stragglers(root: Path) -> list[int]:
    """Stop processes of this deployment that outlived their parents (see processes_under)."""
    if stragglers := processes_under(root):
        console.log(f"stopping {len(stragglers)} orphaned process(es): {stragglers}")
        return stop_processes(stragglers, grace=5.0)
    return []
