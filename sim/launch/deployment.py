"""A real Flower deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1.

The same commands as on real devices (docs/deploy.md), only with loopback addresses and free
ports: TLS with a private CA (`scripts/make-certs`), SuperNode authentication with one key
pair per node (`scripts/make-node-keys`, `flwr supernode register`), and each SuperNode's
node config `partition-id=i num-partitions=N`. Everything lives under one folder:

    certs/  keys/  flwr-home/config.toml (the CLI's connection)  superlink/  node-<i>/
    pids.json (what `stop` kills)

`scripts/local-deployment` (`sim.launch.local_deployment`) starts and stops one from the shell.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from sim.launch.flwr_cli import (
    PROJECT_DIR,
    FlowerRunError,
    FlwrCli,
    RunOutcome,
    flower_env,
    inline_run_config,
    json_payload,
    stage_app,
)
from sim.launch.processes import (
    alive,
    command_line,
    console_script,
    free_port,
    kill_now,
    port_answers,
    processes_under,
    stop_processes,
)
from sim.launch.watchdog import start_watchdog, stop_watchdog

CONNECTION = "local-deployment"
DEFAULT_DIR = PROJECT_DIR / ".flwr" / CONNECTION
PIDS = "pids.json"
HOST = "127.0.0.1"
SCRIPTS = PROJECT_DIR / "scripts"
# Only processes whose command line says they are Flower's are ever signalled from pids.json
# (a PID from an old file may belong to someone else by now).
FLOWER_PROCESSES = ("flower-superlink", "flower-supernode", "fdg-superexec")

console = Console(stderr=True, log_path=False)


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
        console_script("flower-superlink"),
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
    """The `--node-config` string: the device's identity, its own data and its privacy policy.

    `data_dir` names the device's own training files; `{partition_id}` in it is replaced by
    the node's partition id, so each local SuperNode can have files of its own.
    """
    config: dict[str, Any] = {"partition-id": partition_id, "num-partitions": num_partitions}
    if data_dir:
        config["data-dir"] = data_dir.replace("{partition_id}", str(partition_id))
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
    isolation: str = "subprocess",
) -> list[str]:
    """`flower-supernode` connecting to the SuperLink's Fleet API (the same host:port).

    Without `root_certificates` (and not `insecure`) it trusts only the system's CAs.
    `isolation="process"`: the SuperNode starts no executor of its own; run
    `warm_executor_command` beside it.
    """
    if insecure:
        tls = ["--insecure"]
    else:
        tls = ["--root-certificates", str(root_certificates)] if root_certificates else []
    auth = ["--auth-supernode-private-key", str(private_key)] if private_key else []
    retries = ["--max-retries", str(max_retries)] if max_retries is not None else []
    return [
        console_script("flower-supernode"),
        "--superlink",
        superlink,
        *tls,
        *auth,
        "--node-config",
        node_config,
        "--isolation",
        isolation,
        # The SuperNode's own Runtime API (for its ClientApp processes); only needs to differ
        # between SuperNodes on one machine (default 9094).
        "--port",
        str(runtime_port),
        *retries,
    ]


def warm_executor_command(*, runtime_port: int, parent_pid: int, allowed_fabs: Path) -> list[str]:
    """`fdg-superexec` for the SuperNode whose Runtime API is on `runtime_port`.

    It takes `flower-superexec`'s arguments and forks each ClientApp from a process that
    imported torch, Opacus and flwr once (`client_app/warm_superexec.py`); it runs only the
    FABs whose hashes the operator listed in `allowed_fabs`; it exits with its SuperNode.
    """
    return [
        console_script("fdg-superexec"),
        "--allowed-fabs",
        str(allowed_fabs),
        "--runtime-api-address",
        f"127.0.0.1:{runtime_port}",
        "--insecure",  # the SuperNode's own loopback Runtime API, as in subprocess mode
        "--parent-pid",
        str(parent_pid),
    ]


# --- the deployment -----------------------------------------------------------------------


class Deployment:
    """A SuperLink and N SuperNodes on 127.0.0.1, TLS + SuperNode auth unless `secure=False`.

    `with Deployment(...)` starts everything and stops it by PID at the end; `cli` is the
    `flwr` CLI with this deployment's connection (status, wait, logs).
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
        watchdog: bool = True,
        host: str = HOST,
        netns: Mapping[str, str] | None = None,
        warm: bool = True,
        allowed_fabs: Sequence[str] = (),
    ) -> None:
        """Prepare (not start) the deployment under `root`.

        `host`: the address the SuperLink binds and everyone reaches it at (its TLS
        certificate is issued for it). `netns`: a Linux network namespace per process role
        (`superlink`, `node-<i>`), for hosts emulated on one machine; each process is started
        with `ip netns exec`, which keeps its PID. `warm`: each SuperNode runs with
        `--isolation process` beside an `fdg-superexec` that forks its ClientApps from a
        process with the libraries imported (False: Flower's own subprocess isolation, a
        fresh `flwr-clientapp` process per message, which runs any app a run ships).
        `allowed_fabs`: FAB hashes each warm node may run besides this project's app, which
        is staged once (`stage_app`) and is what `submit` sends.

        `policy`: node-config privacy keys for every SuperNode; with a policy each node also
        keeps its durable ledger in `node-<i>/ledger` (unless `policy` names a ledger-dir).
        `watchdog`: everything stops when this process dies, however it dies (off for a
        deployment meant to outlive its launcher: `start --detach`).
        """
        self.root = Path(root).resolve()
        self.home = self.root / "flwr-home"
        self.cli = FlwrCli(self.home, CONNECTION)
        self.startup_timeout = startup_timeout
        self.num_nodes = num_nodes
        self.secure = secure
        self.port = port or free_port()
        self.host = host
        self.netns = dict(netns or {})
        self.warm = warm
        self.extra_fabs = tuple(allowed_fabs)
        self.app: Path | None = None  # the staged app `submit` sends
        self.fab_hash = ""  # its FAB's SHA-256, on every node's allow-list
        self.executors: dict[int, subprocess.Popen[bytes]] = {}  # partition id -> its SuperExec
        self.data_dir = data_dir
        self.policy = dict(policy) if policy is not None else None
        self.process: subprocess.Popen[bytes] | None = None  # the SuperLink
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.node_ids: dict[int, int] = {}  # partition id -> Flower node id (registration)
        self.use_watchdog = watchdog
        self.watchdog: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the SuperLink process, once started."""
        return self.process.pid if self.process else None

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
        return f"{self.host}:{self.port}"

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
        return flower_env(flwr_home)

    @property
    def env(self) -> dict[str, str]:
        """Environment of `flwr` CLI commands: FLWR_HOME holds the connection's config.toml."""
        return self.cli.env

    # Starting.
    def __enter__(self) -> Deployment:
        """Start the SuperLink and the SuperNodes; wait until every node is online."""
        try:
            if self.use_watchdog:
                self.root.mkdir(parents=True, exist_ok=True)
                self.watchdog = start_watchdog(self.root)
            self.app, self.fab_hash = stage_app(self.root / "app")
            self.start_superlink()
            for i in range(self.num_nodes):
                self.add_node(i)
            self.wait_online(self.num_nodes)
        except BaseException:
            self.stop()
            raise
        self.write_pids()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop everything this deployment started."""
        self.stop()

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
            self._script("make-certs", self.host, str(self.certs))
        self.cli.write_connection(self.address, self.ca)
        link_home = self.root / "superlink"
        link_home.mkdir(exist_ok=True)
        (link_home / "state.db").unlink(missing_ok=True)  # a fresh federation each start
        cmd = superlink_command(
            host=self.host,
            port=self.port,
            certs=self.certs,
            node_auth=self.secure,
            database=link_home / "state.db",
        )
        console.log("SuperLink: " + shlex.join(cmd[1:]))
        self.process = self._spawn(cmd, link_home, "superlink")
        deadline = time.monotonic() + self.startup_timeout
        while not port_answers(self.port, self.host):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise FlowerRunError(f"flower-superlink did not start: see {link_home / 'out.log'}")
            time.sleep(0.5)

    def _spawn(self, cmd: Sequence[str], home: Path, role: str) -> subprocess.Popen[bytes]:
        home.mkdir(parents=True, exist_ok=True)
        if role in self.netns:
            cmd = ["ip", "netns", "exec", self.netns[role], *cmd]
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
        payload = json_payload(proc, "flwr supernode register")
        if "node-id" not in payload:
            raise FlowerRunError(f"flwr supernode register failed: {payload}")
        return int(payload["node-id"])

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
        """Start one SuperNode process, and its warm SuperExec (registration is the caller's)."""
        runtime_port = free_port()
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
            runtime_port=runtime_port,
            insecure=insecure,
            max_retries=max_retries,
            isolation="process" if self.warm else "subprocess",
        )
        console.log(f"SuperNode {partition_id}: " + shlex.join(cmd[1:]))
        role = f"node-{partition_id}"
        node = self._spawn(cmd, self.node_home(partition_id), role)
        if self.warm:
            allowed = self.node_home(partition_id) / "allowed-fabs"
            allowed.parent.mkdir(parents=True, exist_ok=True)
            allowed.write_text("\n".join([self.fab_hash, *self.extra_fabs]) + "\n")
            executor = warm_executor_command(
                runtime_port=runtime_port, parent_pid=node.pid, allowed_fabs=allowed
            )
            self.executors[partition_id] = self._spawn(
                executor, self.node_home(partition_id) / "superexec", role
            )
        return node

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
        payload = json_payload(proc, "flwr supernode list")
        if "nodes" not in payload:
            raise FlowerRunError(f"flwr supernode list failed: {payload}")
        return list(payload["nodes"])

    def online(self) -> list[dict[str, Any]]:
        """The nodes the SuperLink sees online."""
        return [n for n in self.supernodes() if n.get("status") == "online"]

    def wait_online(self, count: int, timeout: float | None = None) -> None:
        """Block until `count` SuperNodes are online (or one of ours exits)."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        pause = 1.0  # each check is a `flwr` process (~1.5 s of CPU): back off to 5 s
        while len(self.online()) < count:
            for i, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise FlowerRunError(
                        f"SuperNode {i} exited with code {proc.returncode}: "
                        f"see {self.node_home(i) / 'out.log'}"
                    )
            if time.monotonic() > deadline:
                raise FlowerRunError(f"fewer than {count} SuperNodes online after the timeout")
            time.sleep(pause)
            pause = min(5.0, pause * 1.5)

    def superlink_running(self) -> bool:
        """Whether a SuperLink from this folder's pids.json still runs."""
        pids = read_pids(self.root)
        return bool(pids) and _is_flower(pids.get("superlink", 0))

    # Running apps.
    @property
    def partition_nodes(self) -> str:
        """`partition-nodes` for runs here: each partition id bound to its registered node."""
        return ",".join(f"{pid}:{node}" for pid, node in sorted(self.node_ids.items()))

    def submit(self, run_config: Mapping[str, Any], *, app_dir: Path = PROJECT_DIR) -> str:
        """`flwr run . local-deployment --run-config ...` (no federation options).

        With node authentication each partition id is bound to the node registered for it
        (`partition-nodes`), unless the run config says otherwise.
        """
        staged = app_dir == PROJECT_DIR and self.app is not None
        if self.node_ids and "partition-nodes" not in run_config:
            run_config = {**run_config, "partition-nodes": self.partition_nodes}
        return self.cli.submit(self.app if staged else app_dir, run_config)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A `flwr` CLI command with this deployment's connection."""
        return self.cli.flwr(*args, timeout=timeout)

    def status(self, run_id: str) -> RunOutcome:
        """The run's status from `flwr list`."""
        return self.cli.status(run_id)

    def wait(
        self, run_id: str, *, timeout: float = 3600, on_poll: Callable[[], None] | None = None
    ) -> RunOutcome:
        """Block until the run finishes."""
        return self.cli.wait(run_id, timeout=timeout, on_poll=on_poll)

    def logs(self, run_id: str) -> str:
        """The run's log as far as the SuperLink keeps it."""
        return self.cli.logs(run_id)

    def kill_node(self, partition_id: int) -> list[int]:
        """SIGKILL SuperNode `partition_id` and its ClientApp processes (a device dies)."""
        proc = self.nodes[partition_id]
        killed = kill_now(proc.pid)
        proc.wait(timeout=10)
        if executor := self.executors.get(partition_id):
            killed += kill_now(executor.pid)
            executor.wait(timeout=10)
        return killed

    # Stopping.
    def write_pids(self) -> None:
        """Record what `stop` must kill."""
        pids = {
            "superlink": self.pid,
            "supernodes": {str(i): p.pid for i, p in self.nodes.items()},
            "superexecs": {str(i): p.pid for i, p in self.executors.items()},
            "address": self.address,
        }
        (self.root / PIDS).write_text(json.dumps(pids, indent=2) + "\n")

    def stop(self) -> None:
        """Stop SuperNodes, then the SuperLink, with everything they spawned; by PID."""
        stop_processes([p.pid for p in self.nodes.values()])
        stop_processes([p.pid for p in self.executors.values()])
        if self.process is not None:
            stop_processes([self.process.pid])
        procs = [*self.nodes.values(), *self.executors.values()]
        for proc in [*procs, *([self.process] if self.process else [])]:
            try:
                proc.wait(timeout=5)  # reap
            except subprocess.TimeoutExpired:
                console.log(f"process {proc.pid} did not exit")
        _stop_stragglers(self.root)
        stop_watchdog(self.watchdog)
        (self.root / PIDS).unlink(missing_ok=True)


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
    nodes += [int(p) for p in pids.get("superexecs", {}).values()]
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
