"""A real Flower deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1.

The same commands as on real devices (docs/deploy.md), only with loopback addresses and free
ports: TLS with a private CA (`scripts/make-certs`), SuperNode authentication with one key
pair per node (`scripts/make-node-keys`, `flwr supernode register`), and each SuperNode's
node config `partition-id=i num-partitions=N`. Everything lives under one folder:

    certs/  keys/  flwr-home/config.toml (the CLI's connection)  superlink/  node-<i>/
    pids.json (what `stop` kills)

`scripts/local-deployment start N` runs in the foreground until Ctrl-C (or with `--detach`
returns at once), `scripts/local-deployment stop` stops every process it started, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console

from sim.flower_cli import (
    FLWR_ENV,
    PROJECT_DIR,
    FlowerRunError,
    SimulationLink,
    _bin,
    free_port,
)

CONNECTION = "local-deployment"
DEFAULT_DIR = PROJECT_DIR / ".flwr" / CONNECTION
PIDS = "pids.json"
HOST = "127.0.0.1"
SCRIPTS = PROJECT_DIR / "scripts"
# Only processes whose command line says they are Flower's are ever signalled from pids.json
# (a PID from an old file may belong to someone else by now).
FLOWER_PROCESSES = ("flower-superlink", "flower-supernode")

console = Console(stderr=True, log_path=False)


# --- processes, by PID --------------------------------------------------------------------


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), fields[0]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has finished: only its parent has not reaped it yet)."""
    info = _ppid_and_state(pid)
    return info is not None and info[1] != "Z"


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, found through /proc (Flower detaches some of them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _ppid_and_state(int(entry.name))):
            children.setdefault(info[0], []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    """The process's command line, or "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def stop_processes(pids: Iterable[int], *, grace: float = 15.0) -> list[int]:
    """SIGTERM the processes and all their descendants, SIGKILL what is left after `grace`.

    Returns the PIDs that were signalled.
    """
    targets: list[int] = []
    for pid in pids:
        if alive(pid):
            targets += [pid, *descendants(pid)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in targets:
            if alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait
        while any(alive(p) for p in targets) and time.monotonic() < deadline:
            time.sleep(0.2)
    return targets


def processes_under(root: Path) -> list[int]:
    """PIDs whose FLWR_HOME lies under `root`: every process a deployment starts inherits it.

    Catches what a PID walk cannot: children orphaned when their parent was SIGKILLed.
    """
    marker = f"FLWR_HOME={Path(root).resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v == marker or v.startswith(marker + b"/") for v in environ):
            if alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def kill_now(pid: int) -> list[int]:
    """SIGKILL a process and its descendants at once, as if its device lost power."""
    targets = [pid, *descendants(pid)]
    for p in targets:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return targets


# --- commands, exactly as docs/deploy.md shows them ---------------------------------------


def superlink_command(
    *, host: str, port: int, certs: Path | None, node_auth: bool, database: Path
) -> list[str]:
    """`flower-superlink` serving Control, Runtime and Fleet APIs on one HTTPS port."""
    tls = (
        [
            "--ssl-ca-certfile",
            str(certs / "ca.crt"),
            "--ssl-certfile",
            str(certs / "server.pem"),
            "--ssl-keyfile",
            str(certs / "server.key"),
        ]
        if certs
        else ["--insecure"]
    )
    return [
        _bin("flower-superlink"),
        *tls,
        *(["--enable-supernode-auth"] if node_auth else []),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(database),
    ]


# The privacy floor the launcher gives each SuperNode (its operator's policy; see
# docs/deploy.md): runs up to ε=8, at most ε=32 composed over every run the node ever
# trains in, no seeded noise, and a durable ledger in the node's own folder.
LAUNCHER_POLICY: dict[str, Any] = {"max-eps": 8, "lifetime-eps": 32, "allow-seeded-noise": False}


def node_config(
    partition_id: int,
    num_partitions: int,
    data_dir: str = "",
    policy: Mapping[str, Any] | None = None,
) -> str:
    """The `--node-config` string: the device's shard, its data files and its privacy policy."""
    config: dict[str, Any] = {"partition-id": partition_id, "num-partitions": num_partitions}
    if data_dir:
        config["data-dir"] = data_dir
    return inline_run_config(config | dict(policy or {}))


def supernode_command(
    *,
    superlink: str,
    node_config: str,
    root_certificates: Path | None,
    private_key: Path | None,
    runtime_port: int,
    insecure: bool = False,
    max_retries: int | None = None,
) -> list[str]:
    """`flower-supernode` connecting to the SuperLink's Fleet API (the same host:port).

    Without `root_certificates` (and not `insecure`) it trusts only the system's CAs.
    """
    if insecure:
        tls = ["--insecure"]
    else:
        tls = ["--root-certificates", str(root_certificates)] if root_certificates else []
    auth = ["--auth-supernode-private-key", str(private_key)] if private_key else []
    retries = ["--max-retries", str(max_retries)] if max_retries is not None else []
    return [
        _bin("flower-supernode"),
        "--superlink",
        superlink,
        *tls,
        *auth,
        "--node-config",
        node_config,
        "--isolation",
        "subprocess",
        # The SuperNode's own Runtime API (for its ClientApp processes); only needs to differ
        # between SuperNodes on one machine (default 9094).
        "--port",
        str(runtime_port),
        *retries,
    ]


def connection_config(name: str, address: str, root_certificates: Path | None) -> dict[str, Any]:
    """The `flwr` CLI's Flower config file (`$FLWR_HOME/config.toml`) for one SuperLink."""
    conn: dict[str, Any] = {"address": address}
    if root_certificates:
        conn["root-certificates"] = str(root_certificates)
    else:
        conn["insecure"] = True
    return {"superlink": {"default": name, name: conn}}


def inline_run_config(run_config: Mapping[str, Any]) -> str:
    """`--run-config` as typed on a command line: `k=v` pairs, strings quoted."""
    pairs = []
    for key, value in run_config.items():
        toml_value = tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
        pairs.append(f"{key}={toml_value}")
    return " ".join(pairs)


# --- the deployment -----------------------------------------------------------------------


class Deployment(SimulationLink):
    """A SuperLink and N SuperNodes on 127.0.0.1, TLS + SuperNode auth unless `secure=False`.

    Reuses `SimulationLink`'s `flwr` helpers (status, wait, logs) with this deployment's
    connection; `with Deployment(...)` starts everything and stops it by PID at the end.
    """

    connection = CONNECTION

    def __init__(
        self,
        root: Path,
        num_nodes: int,
        *,
        secure: bool = True,
        port: int = 0,
        data_dir: str = "",
        policy: Mapping[str, Any] | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        """Prepare (not start) the deployment under `root`.

        `policy`: node-config privacy keys for every SuperNode; with a policy each node also
        keeps its durable ledger in `node-<i>/ledger` (unless `policy` names a ledger-dir).
        """
        self.root = Path(root).resolve()
        super().__init__(self.root / "flwr-home", startup_timeout=startup_timeout)
        self.num_nodes = num_nodes
        self.secure = secure
        self.port = port or free_port()
        self.data_dir = data_dir
        self.policy = dict(policy) if policy is not None else None
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.node_ids: dict[int, int] = {}  # partition id -> Flower node id (registration)

    # Paths of this deployment.
    @property
    def certs(self) -> Path | None:
        """The folder `scripts/make-certs` wrote (None when insecure)."""
        return self.root / "certs" if self.secure else None

    @property
    def ca(self) -> Path | None:
        """The CA certificate SuperNodes and the CLI verify the SuperLink with."""
        return self.root / "certs" / "ca.crt" if self.secure else None

    @property
    def address(self) -> str:
        """The SuperLink's one address: Control, Runtime and Fleet APIs."""
        return f"{HOST}:{self.port}"

    def key(self, name: str) -> Path:
        """A SuperNode's private key (its `.pub` sits next to it)."""
        return self.root / "keys" / name

    def node_home(self, partition_id: int) -> Path:
        """A SuperNode's FLWR_HOME and log folder, as if it were its own device."""
        return self.root / f"node-{partition_id}"

    def ledger_dir(self, partition_id: int) -> Path:
        """Where SuperNode `partition_id` keeps its durable privacy ledger."""
        return self.node_home(partition_id) / "ledger"

    def node_policy(self, partition_id: int) -> dict[str, Any] | None:
        """The node-config policy keys of SuperNode `partition_id` (None: no policy)."""
        if self.policy is None:
            return None
        return {"ledger-dir": str(self.ledger_dir(partition_id))} | self.policy

    def env_for(self, flwr_home: Path) -> dict[str, str]:
        """Environment of a Flower process whose home is `flwr_home`."""
        env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(flwr_home)}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    @property
    def env(self) -> dict[str, str]:
        """Environment of `flwr` CLI commands: FLWR_HOME holds the connection's config.toml."""
        return self.env_for(self.home)

    # Starting.
    def __enter__(self) -> Deployment:
        """Start the SuperLink and the SuperNodes; wait until every node is online."""
        try:
            self.start_superlink()
            for i in range(self.num_nodes):
                self.add_node(i)
            self.wait_online(self.num_nodes)
        except BaseException:
            self.stop()
            raise
        self.write_pids()
        return self

    def _script(self, name: str, *args: str) -> None:
        proc = subprocess.run(
            ["bash", str(SCRIPTS / name), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env_for(self.home) | {"PYTHON": sys.executable},
        )
        if proc.returncode != 0:
            raise FlowerRunError(f"{name} failed: {(proc.stderr or proc.stdout).strip()}")

    def start_superlink(self) -> None:
        """Certificates, the CLI's config.toml, then the SuperLink; wait until it answers."""
        if self.superlink_running():
            raise FlowerRunError(f"a deployment already runs in {self.root}; stop it first")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.certs and not (self.certs / "server.pem").exists():
            self._script("make-certs", HOST, str(self.certs))
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            tomli_w.dumps(connection_config(self.connection, self.address, self.ca))
        )
        link_home = self.root / "superlink"
        link_home.mkdir(exist_ok=True)
        (link_home / "state.db").unlink(missing_ok=True)  # a fresh federation each start
        cmd = superlink_command(
            host=HOST,
            port=self.port,
            certs=self.certs,
            node_auth=self.secure,
            database=link_home / "state.db",
        )
        console.log("SuperLink: " + shlex.join(cmd[1:]))
        self.process = self._spawn(cmd, link_home)
        deadline = time.monotonic() + self.startup_timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise FlowerRunError(f"flower-superlink did not start: see {link_home / 'out.log'}")
            time.sleep(0.5)

    def _spawn(self, cmd: Sequence[str], home: Path) -> subprocess.Popen[bytes]:
        home.mkdir(parents=True, exist_ok=True)
        with open(home / "out.log", "ab") as log:
            return subprocess.Popen(
                cmd,
                env=self.env_for(home),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops them
                cwd=home,
            )

    def make_keys(self, name: str) -> Path:
        """A SuperNode key pair (kept if it exists); returns the private key's path."""
        if not self.key(name).exists():
            self._script("make-node-keys", name, str(self.key(name).parent))
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
        try:
            return int(json.loads(proc.stdout[proc.stdout.index("{") :])["node-id"])
        except (ValueError, KeyError):
            raise FlowerRunError(
                f"flwr supernode register failed: {(proc.stdout + proc.stderr).strip()}"
            ) from None

    def start_supernode(
        self,
        partition_id: int,
        *,
        key_name: str | None = None,
        root_certificates: Path | None = None,
        insecure: bool = False,
        num_partitions: int | None = None,
        max_retries: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start one SuperNode process (registration is the caller's business)."""
        cmd = supernode_command(
            superlink=self.address,
            node_config=node_config(
                partition_id,
                num_partitions or self.num_nodes,
                self.data_dir,
                self.node_policy(partition_id),
            ),
            root_certificates=root_certificates,
            private_key=self.key(key_name) if key_name else None,
            runtime_port=free_port(),
            insecure=insecure,
            max_retries=max_retries,
        )
        console.log(f"SuperNode {partition_id}: " + shlex.join(cmd[1:]))
        return self._spawn(cmd, self.node_home(partition_id))

    def add_node(self, partition_id: int) -> None:
        """Keys, registration and the SuperNode for partition `partition_id`."""
        name = f"node-{partition_id}"
        if self.secure:
            key = self.make_keys(name)
            self.node_ids[partition_id] = self.register(key.with_suffix(".pub"), name)
        self.nodes[partition_id] = self.start_supernode(
            partition_id,
            key_name=name if self.secure else None,
            root_certificates=self.ca,
            insecure=not self.secure,
        )

    # Watching.
    def supernodes(self) -> list[dict[str, Any]]:
        """`flwr supernode list`: every node the SuperLink knows, with its status."""
        proc = self.flwr("supernode", "list", self.connection, "--format", "json", timeout=60)
        try:
            return list(json.loads(proc.stdout[proc.stdout.index("{") :])["nodes"])
        except (ValueError, KeyError):
            raise FlowerRunError(
                f"flwr supernode list failed: {(proc.stdout + proc.stderr).strip()}"
            ) from None

    def online(self) -> list[dict[str, Any]]:
        """The nodes the SuperLink sees online."""
        return [n for n in self.supernodes() if n.get("status") == "online"]

    def wait_online(self, count: int, timeout: float | None = None) -> None:
        """Block until `count` SuperNodes are online (or one of ours exits)."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while len(self.online()) < count:
            for i, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise FlowerRunError(
                        f"SuperNode {i} exited with code {proc.returncode}: "
                        f"see {self.node_home(i) / 'out.log'}"
                    )
            if time.monotonic() > deadline:
                raise FlowerRunError(f"fewer than {count} SuperNodes online after the timeout")
            time.sleep(1)

    def superlink_running(self) -> bool:
        """Whether a SuperLink from this folder's pids.json still runs."""
        pids = read_pids(self.root)
        return bool(pids) and _is_flower(pids.get("superlink", 0))

    # Running apps.
    def submit(
        self,
        run_config: Mapping[str, Any],
        *,
        num_nodes: int | None = None,
        app_dir: Path = PROJECT_DIR,
    ) -> str:
        """`flwr run . local-deployment --run-config "k=v ..."` (no federation options)."""
        proc = self.flwr(
            "run",
            str(app_dir),
            self.connection,
            "--run-config",
            inline_run_config(run_config),
            "--format",
            "json",
        )
        try:
            payload = json.loads(proc.stdout[proc.stdout.index("{") :])
        except ValueError:
            payload = {}
        if proc.returncode != 0 or not payload.get("success"):
            detail = (payload.get("error-message") or proc.stderr or proc.stdout).strip()
            raise FlowerRunError(f"flwr run failed: {detail}")
        return str(payload["run-id"])

    def kill_node(self, partition_id: int) -> list[int]:
        """SIGKILL SuperNode `partition_id` and its ClientApp processes (a device dies)."""
        proc = self.nodes[partition_id]
        killed = kill_now(proc.pid)
        proc.wait(timeout=10)
        return killed

    # Stopping.
    def write_pids(self) -> None:
        """Record what `stop` must kill."""
        pids = {
            "superlink": self.pid,
            "supernodes": {str(i): p.pid for i, p in self.nodes.items()},
            "address": self.address,
        }
        (self.root / PIDS).write_text(json.dumps(pids, indent=2) + "\n")

    def stop(self) -> None:
        """Stop SuperNodes, then the SuperLink, with everything they spawned; by PID."""
        stop_processes([p.pid for p in self.nodes.values()])
        if self.process is not None:
            stop_processes([self.process.pid])
        for proc in [*self.nodes.values(), *([self.process] if self.process else [])]:
            try:
                proc.wait(timeout=5)  # reap
            except subprocess.TimeoutExpired:
                console.log(f"process {proc.pid} did not exit")
        _stop_stragglers(self.root)
        (self.root / PIDS).unlink(missing_ok=True)

    def instructions(self) -> str:
        """How to run the app against this deployment, printed by `start`."""
        home = f"FLWR_HOME={self.home}"
        nodes = self.num_nodes
        security = "TLS + SuperNode auth" if self.secure else "INSECURE: no TLS, no node auth"
        policy = self.node_policy(0)
        policy_text = (
            "Node policy: "
            + inline_run_config({k: v for k, v in policy.items() if k != "ledger-dir"})
            + f" (ledgers in {self.root}/node-*/ledger: delete them to reset the budgets)."
            if policy
            else "Node policy: none (every node accepts the run's privacy)."
        )
        strategy = "gossip" if nodes >= 3 else "fedavg"  # the default ring needs 3 nodes
        return "\n".join(
            [
                f"SuperLink {self.address} ({security}),"
                f" {nodes} SuperNodes (partition-id 0..{nodes - 1}, num-partitions={nodes}).",
                policy_text,
                f"Connection '{self.connection}' is in {self.home / 'config.toml'}.",
                "Logs: " + str(self.root / "{superlink,node-*}/out.log"),
                "",
                "Run the app (from the project folder, venv active):",
                f"  cd {PROJECT_DIR} && source .venv/bin/activate",
                f"  {home} flwr run . {self.connection} --run-config "
                f"'strategy=\"{strategy}\" eps=2 num-nodes={nodes}' --stream",
                f"  {home} flwr list {self.connection}",
                f"  {home} flwr supernode list {self.connection}",
                "Results: results/<run-name>/ (rounds.csv, summary.json) of this project.",
                "",
                f"Stop: Ctrl-C here, or  scripts/local-deployment stop --dir {self.root}",
            ]
        )


# --- pids.json ----------------------------------------------------------------------------


def read_pids(root: Path) -> dict[str, Any]:
    """The deployment's pids.json, or {} when there is none."""
    try:
        return dict(json.loads((Path(root) / PIDS).read_text()))
    except (OSError, ValueError):
        return {}


def _is_flower(pid: int) -> bool:
    return alive(pid) and any(name in command_line(pid) for name in FLOWER_PROCESSES)


def stop_from_pids(root: Path) -> list[int]:
    """Stop the deployment recorded in `root/pids.json` (SuperNodes first); the PIDs signalled."""
    pids = read_pids(root)
    nodes = [int(p) for p in pids.get("supernodes", {}).values()]
    stopped = stop_processes([p for p in nodes if _is_flower(p)])
    if _is_flower(link := int(pids.get("superlink", 0))):
        stopped += stop_processes([link])
    stopped += _stop_stragglers(root)
    (Path(root) / PIDS).unlink(missing_ok=True)
    return stopped


def _stop_stragglers(root: Path) -> list[int]:
    """Stop processes of this deployment that outlived their parents (see processes_under)."""
    if stragglers := processes_under(root):
        console.log(f"stopping {len(stragglers)} orphaned process(es): {stragglers}")
        return stop_processes(stragglers, grace=5.0)
    return []


# --- command line -------------------------------------------------------------------------


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
    start.add_argument("--data-dir", default="", help="node-config data-dir of every SuperNode")
    start.add_argument(
        "--detach", action="store_true", help="return once all nodes are online (stop later)"
    )
    return parser


def _run_foreground(deployment: Deployment) -> int:
    """Wait until Ctrl-C (or SIGTERM, or the SuperLink dies), then stop everything."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
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
    )
    try:
        deployment.__enter__()
    except (FlowerRunError, subprocess.TimeoutExpired) as err:
        console.log(f"start failed: {err}")
        return 1
    except KeyboardInterrupt:
        return 130
    Console().print(deployment.instructions(), soft_wrap=True, highlight=False, markup=False)
    if args.detach:
        return 0
    return _run_foreground(deployment)


if __name__ == "__main__":
    raise SystemExit(main())
