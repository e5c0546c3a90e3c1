"""sim.launch's deployment without a SuperLink: the commands parse with flwr 1.42's own parsers, the
certificate and key scripts write what Flower loads, and processes are stopped by PID."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.flower_config import parse_superlink_connection
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from sim.launch import deployment_folder as folder
from sim.launch.deploy_commands import node_config, superlink_command, supernode_command
from sim.launch.deployment_folder import stop_from_pids
from sim.launch.flwr_cli import connection_config, inline_run_config
from sim.launch.processes import alive, descendants, processes_under, stop_processes

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_superlink_command_has_tls_node_auth_and_one_port():
    cmd = superlink_command(
        host="0.0.0.0", port=9093, certs=Path("/c"), node_auth=True, database=Path("/s.db")
    )
    args = _parse_args_run_superlink().parse_args(cmd[1:])
    assert (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile) == (
        "/c/ca.crt",
        "/c/server.pem",
        "/c/server.key",
    )
    assert args.enable_supernode_auth and not args.insecure and not args.simulation
    assert (args.host, args.port, args.isolation) == ("0.0.0.0", 9093, "subprocess")
    assert args.runtime_dependency_install is False


def test_insecure_superlink_command():
    cmd = superlink_command(
        host="127.0.0.1", port=1, certs=None, node_auth=False, database=Path("/s.db")
    )
    args = _parse_args_run_superlink().parse_args(cmd[1:])
    assert args.insecure and not args.enable_supernode_auth and args.ssl_certfile is None


def test_supernode_command_and_node_config():
    config = node_config(2, 3, "/data/fashion mnist")
    cmd = supernode_command(
        superlink="10.0.0.5:9093",
        node_config=config,
        root_certificates=Path("/c/ca.crt"),
        private_key=Path("/k/node-2"),
        runtime_port=9094,
    )
    args = _parse_args_run_supernode().parse_args(cmd[1:])
    assert args.superlink == "10.0.0.5:9093" and not args.insecure
    assert args.root_certificates == "/c/ca.crt"
    assert args.auth_supernode_private_key == "/k/node-2"
    assert (args.isolation, args.port) == ("subprocess", 9094)
    # The ClientApp reads exactly these keys from context.node_config.
    assert parse_config_args([args.node_config]) == {
        "partition-id": 2,
        "num-partitions": 3,
        "data-dir": "/data/fashion mnist",
    }
    assert parse_config_args([node_config(0, 3)]) == {"partition-id": 0, "num-partitions": 3}


def test_the_launchers_node_policy_reaches_the_node_as_a_valid_policy():
    from flower_app.policy import NodePolicy
    from sim.launch.deploy_commands import LAUNCHER_POLICY

    text = node_config(1, 3, policy={**LAUNCHER_POLICY, "ledger-dir": "/dev ice/ledger"})
    parsed = parse_config_args([text])
    policy = NodePolicy.from_node_config(parsed)
    assert policy.has_policy and policy.max_eps == 8 and policy.lifetime_eps == 32
    assert policy.allow_seeded_noise is False and policy.ledger_dir == "/dev ice/ledger"


def test_supernode_tls_modes():
    common = {"superlink": "h:1", "node_config": "", "private_key": None, "runtime_port": 2}
    system = supernode_command(root_certificates=None, **common)
    insecure = supernode_command(root_certificates=None, insecure=True, **common)
    assert "--root-certificates" not in system and "--insecure" not in system
    assert "--insecure" in insecure


@pytest.mark.parametrize("ca", [Path("/abs/ca.crt"), None], ids=["tls", "insecure"])
def test_connection_config_is_a_valid_flower_connection(ca):
    config = connection_config("my-link", "10.0.0.5:9093", ca)
    assert config["superlink"]["default"] == "my-link"
    conn = parse_superlink_connection(config["superlink"]["my-link"], "my-link")
    assert conn.address == "10.0.0.5:9093"
    assert conn.root_certificates == (str(ca) if ca else None)
    assert conn.insecure is (ca is None)
    tomli_w.dumps(config)  # writable as config.toml


def test_inline_run_config_parses_back_with_flwr():
    cfg = {
        "strategy": "gossip",
        "eps": 2,
        "delta": 1e-5,
        "num-nodes": 3,
        "results-dir": "/tmp/some dir",
        "run-name": "r",
    }
    assert parse_config_args([inline_run_config(cfg)]) == cfg
    assert math.isinf(parse_config_args([inline_run_config({"eps": math.inf})])["eps"])


def test_bare_strings_are_not_valid_run_config_in_flwr_1_42():
    # Why docs/deploy.md quotes strings: --run-config "strategy=gossip" is rejected.
    with pytest.raises(Exception, match="invalid format"):
        parse_config_args(["strategy=gossip eps=2"])
    assert parse_config_args(["strategy='gossip' eps=2"]) == {"strategy": "gossip", "eps": 2}


def test_make_certs_signs_a_server_certificate_for_the_host(tmp_path):
    out = tmp_path / "certs"
    subprocess.run(["bash", SCRIPTS / "make-certs", "192.168.1.20", out], check=True)
    assert {p.name for p in out.iterdir()} == {"ca.crt", "server.pem", "server.key"}
    # The CA's key is never in the server's certificate folder.
    assert {p.name for p in (tmp_path / "certs-ca").iterdir()} == {"ca.key"}
    assert oct((tmp_path / "certs-ca" / "ca.key").stat().st_mode & 0o777) == "0o600"
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", out / "ca.crt", out / "server.pem"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "192.168.1.20",
        "127.0.0.1",
    }
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert oct((out / "server.key").stat().st_mode & 0o777) == "0o600"


def test_make_certs_never_replaces_an_existing_ca_unless_forced(tmp_path):
    out = tmp_path / "certs"
    subprocess.run(["bash", SCRIPTS / "make-certs", "10.0.0.1", out], check=True)
    ca = (out / "ca.crt").read_bytes()
    again = subprocess.run(
        ["bash", SCRIPTS / "make-certs", "10.0.0.2", out], capture_output=True, text=True
    )
    assert again.returncode == 1 and "refusing to replace the CA" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and (out / "ca.crt").read_bytes() == ca
    forced = ["bash", SCRIPTS / "make-certs", "--force", "10.0.0.2", out]
    subprocess.run(forced, check=True, capture_output=True)
    assert (out / "ca.crt").read_bytes() != ca


def test_certificates_and_keys_are_never_committed():
    ignored = subprocess.run(
        [
            "git",
            "check-ignore",
            "certificates/ca.key",
            "keys/node-1",
            "sub/certificates/x.pem",
            "certificates-ca/ca.key",
        ],  # fmt: skip
        cwd=SCRIPTS.parent,
        capture_output=True,
        text=True,
    )
    expected = ["certificates/ca.key", "keys/node-1", "sub/certificates/x.pem",
                "certificates-ca/ca.key"]  # fmt: skip
    assert ignored.stdout.split() == expected


def test_make_certs_takes_a_dns_name(tmp_path):
    subprocess.run(["bash", SCRIPTS / "make-certs", "link.example.org", tmp_path], check=True)
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"link.example.org", "localhost"}


@pytest.mark.parametrize("tool", ["ssh-keygen", "python"])
def test_make_node_keys_writes_a_pair_flower_accepts(tmp_path, tool):
    env = dict(os.environ, PYTHON=sys.executable)
    if tool == "python":  # no OpenSSH client on the device
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name in ("bash", "mkdir"):
            (bin_dir / name).symlink_to(subprocess.check_output(["which", name], text=True).strip())
        env["PATH"] = str(bin_dir)
    subprocess.run(["bash", SCRIPTS / "make-node-keys", "dev-1", tmp_path], check=True, env=env)
    private = load_ssh_private_key((tmp_path / "dev-1").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)  # what flower-supernode loads
    assert try_load_public_key(tmp_path / "dev-1.pub")  # what `flwr supernode register` loads
    assert oct((tmp_path / "dev-1").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run(
        ["bash", SCRIPTS / "make-node-keys", "dev-1", tmp_path], capture_output=True, env=env
    )
    assert again.returncode != 0, "an existing identity must not be overwritten"


def _tree(tmp_path):
    """A parent in its own session with a child and a grandchild, like a SuperNode."""
    script = "sleep 300 & (sleep 300 & wait) & wait"
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "node-0"))
    proc = subprocess.Popen(["bash", "-c", script], env=env, start_new_session=True)
    deadline = time.monotonic() + 10
    while len(descendants(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def test_stop_processes_reaches_the_whole_tree(tmp_path):
    proc = _tree(tmp_path)
    below = descendants(proc.pid)
    assert len(below) == 3
    assert sorted(processes_under(tmp_path)) == sorted([proc.pid, *below])
    stop_processes([proc.pid], grace=5)
    proc.wait(timeout=5)
    assert not [p for p in below if alive(p)]
    assert processes_under(tmp_path) == []


def test_orphans_are_found_by_their_flwr_home(tmp_path):
    proc = _tree(tmp_path)
    below = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # children are orphaned, out of reach of a PID walk
    proc.wait(timeout=5)
    assert descendants(proc.pid) == []
    assert sorted(processes_under(tmp_path)) == sorted(below)
    (tmp_path / folder.PIDS).write_text(json.dumps({"superlink": proc.pid, "supernodes": {}}))
    stop_from_pids(tmp_path)
    assert processes_under(tmp_path) == []
    assert not (tmp_path / folder.PIDS).exists()


def test_stop_from_pids_never_signals_foreign_processes(tmp_path):
    other = subprocess.Popen(["sleep", "300"])  # not Flower's, not under tmp_path
    try:
        (tmp_path / folder.PIDS).write_text(
            json.dumps({"superlink": other.pid, "supernodes": {"0": other.pid}})
        )
        assert stop_from_pids(tmp_path) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_cli_parser():
    from sim.launch.local_deployment import build_parser

    parser = build_parser()
    start = parser.parse_args(["start", "3", "--dir", "/x", "--detach", "--data-dir", "/d"])
    assert (start.num_nodes, start.dir, start.detach, start.data_dir) == (3, Path("/x"), True, "/d")
    assert parser.parse_args(["stop"]).dir == folder.DEFAULT_DIR


def test_a_data_dir_template_gives_each_node_its_own_files():
    assert parse_config_args([node_config(2, 3, "/d/node-{partition_id}.npz")])["data-dir"] == (
        "/d/node-2.npz"
    )
