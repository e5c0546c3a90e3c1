"""The commands of a deployment, exactly as docs/deploy.md shows them.

`flower-superlink` (Control, Runtime and Fleet APIs on one port), `flower-supernode` with its
node config (identity, data, privacy policy), and `fdg-superexec` (the warm executor beside a
SuperNode). `sim.launch.deployment` runs them on loopback; a device operator types them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sim.launch.flwr_cli import inline_run_config
from sim.launch.processes import console_script


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
