"""A real Flower deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1.

The same commands as on real devices (docs/deploy.md, `sim.launch.deploy_commands`), only
with loopback addresses and free ports: TLS with a private CA (`scripts/make-certs`),
SuperNode authentication with one key pair per node (`scripts/make-node-keys`, `flwr
supernode register`), and each SuperNode's node config `partition-id=i num-partitions=N`.
Everything lives under one folder (`sim.launch.deployment_folder`).

`scripts/local-deployment` (`sim.launch.local_deployment`) starts and stops one from the shell.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sim.launch.deploy_commands import (
    node_config,
    superlink_command,
    supernode_command,
    warm_executor_command,
)
from sim.launch.deployment_folder import (
    PIDS,
    DeploymentFolder,
    console,
    stop_stragglers,
)
from sim.launch.flwr_cli import (
    PROJECT_DIR,
    FlowerRunError,
    stage_app,
)
from sim.launch.processes import free_port, kill_now, port_answers, stop_processes
from sim.launch.watchdog import start_watchdog, stop_watchdog

HOST = "127.0.0.1"


class Deployment(DeploymentFolder):
    """A SuperLink and N SuperNodes on 127.0.0.1, TLS + SuperNode auth unless `secure=False`.

    `with Deployment(...)` starts everything and stops it by PID at the end; status, wait and
    logs are its `Connection`'s (the `flwr` CLI with this deployment's connection).
    """

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
        super().__init__(root, secure=secure)
        self.startup_timeout = startup_timeout
        self.num_nodes = num_nodes
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

    # Paths and addresses of this deployment (the rest are its folder's).
    @property
    def address(self) -> str:
        """The SuperLink's one address: Control, Runtime and Fleet APIs."""
        return f"{self.host}:{self.port}"

    def node_policy(self, partition_id: int) -> dict[str, Any] | None:
        """The node-config policy keys of SuperNode `partition_id` (None: no policy)."""
        if self.policy is None:
            return None
        return {"ledger-dir": str(self.ledger_dir(partition_id))} | self.policy

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

    def start_superlink(self) -> None:
        """Certificates, the CLI's config.toml, then the SuperLink; wait until it answers."""
        if self.superlink_running():
            raise FlowerRunError(f"a deployment already runs in {self.root}; stop it first")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.certs and not (self.certs / "server.pem").exists():
            self.run_script("make-certs", self.host, str(self.certs))
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
        stop_stragglers(self.root)
        stop_watchdog(self.watchdog)
        (self.root / PIDS).unlink(missing_ok=True)
