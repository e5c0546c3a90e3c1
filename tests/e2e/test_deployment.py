"""Flower's Deployment Engine on loopback: a SuperLink and real SuperNode processes.

TLS with a private CA and SuperNode authentication, as docs/deploy.md sets them up; each
SuperNode trains its partition in its own ClientApp process. Every process is started by
`sim.launch.deployment.Deployment` and stopped by PID; each test checks that none is left over.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tomli_w

from flower_app.data import load_arrays
from sim.launch.deploy_commands import LAUNCHER_POLICY
from sim.launch.deployment import Deployment
from sim.launch.deployment_folder import stop_from_pids
from sim.launch.flwr_cli import PROJECT_DIR, inline_run_config
from sim.launch.processes import alive, descendants, processes_under

pytestmark = [pytest.mark.e2e, pytest.mark.deploy]

SMALL = {
    "strategy": "gossip",
    "eps": 2,
    "num-server-rounds": 3,
    "samples-per-node": 200,
    "test-samples": 500,
    "node-eval-samples": 200,
    # 200 DP samples per node and 3 rounds: IID shards and smaller batches (more steps) keep
    # node models clearly above chance (about 0.3 against 0.1; label-skewed: 0.1 to 0.25).
    "partitioner": "iid",
    "batch-size": 32,
}
RUN_TIMEOUT = 900  # s; a 3-round run takes 2-4 minutes on 2 busy cores


def read_run(folder):
    rows = list(csv.DictReader((folder / "rounds.csv").open()))
    summary = json.loads((folder / "summary.json").read_text())
    return rows, summary


def all_pids(deployment):
    pids = [deployment.pid, *(p.pid for p in deployment.nodes.values())]
    return pids + [c for p in pids for c in descendants(p)]


def own_data(folder, per_node=200, nodes=3):
    """Each device's own files: nodes 0 and 1 a .npz (named without suffix), node 2 idx files."""
    arrays = load_arrays("fashion-mnist")
    folder.mkdir()
    for pid in range(nodes):
        x = arrays.x_train[pid * per_node : (pid + 1) * per_node]
        y = arrays.y_train[pid * per_node : (pid + 1) * per_node]
        if pid < nodes - 1:
            with (folder / f"node-{pid}").open("wb") as fh:
                np.savez(fh, x=x, y=y)
            continue
        (folder / f"node-{pid}").mkdir()
        for stem, arr in (
            ("train-images-idx3-ubyte", x),
            ("train-labels-idx1-ubyte", y.astype(np.uint8)),
        ):
            head = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            (folder / f"node-{pid}" / stem).write_bytes(head + arr.tobytes())
    return str(folder / "node-{partition_id}")


@pytest.fixture(scope="module")
def deployment3(tmp_path_factory):
    """SuperLink + 3 SuperNodes (TLS, node auth), each training on its own 200 examples.

    A node serving its own data must have a privacy policy: the launcher's, as devices get it.
    """
    root = tmp_path_factory.mktemp("deploy3")
    data = own_data(root / "device-data")
    with Deployment(root, 3, data_dir=data, policy=LAUNCHER_POLICY, startup_timeout=180) as d:
        yield d
        started = all_pids(d)
    assert not [p for p in started if alive(p)], "a process of the deployment is still running"
    assert not processes_under(root), "an orphaned deployment process is still running"


def test_gossip_run_on_three_supernodes_with_tls_and_node_auth(deployment3, tmp_path):
    d = deployment3
    assert {int(n["node-id"]) for n in d.online()} == set(d.node_ids.values())
    run_id = d.submit({**SMALL, "num-nodes": 3, "results-dir": str(tmp_path), "run-name": "g"})
    outcome = d.wait(run_id, timeout=RUN_TIMEOUT)
    assert outcome.completed, f"{outcome.status}: {outcome.details}\n{d.logs(run_id)}"

    rows, summary = read_run(tmp_path / "g")
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert all(int(r["nodes_trained"]) == 3 and int(r["nodes_failed"]) == 0 for r in rows)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert summary["num_nodes"] == 3 and summary["topology"]["nodes"] == 3
    # Each SuperNode trained its own files, whole, within its budget.
    nodes = summary["privacy"]["nodes"]
    assert set(nodes) == {"0", "1", "2"}
    assert all(0 < float(n["eps"]) <= 2 for n in nodes.values())
    assert all(int(n["num-examples"]) == 200 for n in nodes.values()), nodes
    assert float(rows[-1]["node_acc_mean"]) > 0.15, "node models no better than chance (0.1)"


def _wait_exit(proc, timeout=120):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"SuperNode {proc.pid} still runs after {timeout}s")


def test_unregistered_or_unverified_supernodes_and_cli_are_refused(deployment3, tmp_path):
    d = deployment3
    authorized = set(d.node_ids.values())

    # A key pair the SuperLink operator never registered.
    d.make_keys("rogue")
    rogue = d.start_supernode(7, key_name="rogue", root_certificates=d.ca)
    # No key pair at all: a SuperNode would register itself, which node auth forbids.
    anonymous = d.start_supernode(8, root_certificates=d.ca)
    # A registered key, but no CA certificate: the system's CAs do not vouch for the SuperLink.
    d.make_keys("no-ca")
    no_ca_id = d.register(d.key("no-ca").with_suffix(".pub"), "no-ca")
    no_ca = d.start_supernode(9, key_name="no-ca")
    # Plain HTTP against the HTTPS SuperLink: a connection error, which a SuperNode retries
    # (forever by default; a SuperNode also refuses to send its key unencrypted).
    plain = d.start_supernode(10, insecure=True, max_retries=2)

    for proc in (rogue, anonymous, no_ca, plain):
        assert _wait_exit(proc) != 0
    logs = {i: (d.node_home(i) / "out.log").read_text() for i in (7, 8, 9, 10)}
    assert "Failed to activate SuperNode" in logs[7]
    assert "CERTIFICATE_VERIFY_FAILED" in logs[9]
    for i, log in logs.items():
        assert i == 10 or "Exit Code: 305" in log, log  # could not connect to the SuperLink
        assert "SuperNode ID:" not in log  # never got a node id, so never pulled a message
    superlink_log = (d.root / "superlink" / "out.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log

    # The SuperLink still knows exactly the authorized nodes online; no-ca stays "registered".
    nodes = {int(n["node-id"]): n["status"] for n in d.supernodes()}
    assert {i for i, s in nodes.items() if s == "online"} == authorized
    assert nodes[no_ca_id] == "registered"

    # A `flwr` CLI whose connection lacks the CA certificate cannot talk to the SuperLink.
    home = tmp_path / "cli-without-ca"
    home.mkdir()
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {"superlink": {"default": "bare", "bare": {"address": d.address}}},
        )
    )
    env = d.env_for(home)
    flwr = str(Path(sys.executable).parent / "flwr")
    listing = subprocess.run(
        [flwr, "supernode", "list", "bare", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert '"success": false' in listing.stdout
    assert "unavailable" in listing.stdout
    run = subprocess.run(
        [flwr, "run", ".", "bare", "--run-config", "num-nodes=3", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT_DIR,
    )
    assert '"success": false' in run.stdout and "unavailable" in run.stdout
    assert len(d.supernodes()) == len(authorized) + 1  # nothing new registered or run


def holding_round_2(d, pid, *, since, timeout=120):
    """Until SuperNode `pid`'s warm SuperExec runs a ClientApp forked after `since` (epoch s).

    That child holds a message of the round after the one that ended at `since`: an event,
    not a sleep that guesses when the node has the message but has not replied yet.
    """
    executor = psutil.Process(d.executors[pid].pid)
    deadline = time.monotonic() + timeout
    while not any(c.create_time() > since for c in executor.children()):
        assert time.monotonic() < deadline, f"node {pid} never started the next round's task"
        time.sleep(0.05)


def test_killed_supernode_is_left_out_and_the_run_completes(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("deploy4")
    cfg = {
        **SMALL,
        "num-server-rounds": 2,  # the node dies in the last round; the run still completes
        "num-nodes": 4,
        "min-available-nodes": 2,
        # Above a normal round (up to ~100 s here), so only the dead node is missed.
        "round-timeout": 240,
        "results-dir": str(tmp_path),
        "run-name": "f",
    }
    with Deployment(root, 4, startup_timeout=180) as d:
        run_id = d.submit(cfg)
        rounds = tmp_path / "f" / "rounds.csv"
        deadline = time.monotonic() + RUN_TIMEOUT
        checked = time.monotonic()
        while not (rounds.exists() and len(rounds.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline, "round 1 never finished"
            if time.monotonic() - checked > 10:  # the CLI costs ~1.5 s of CPU: not often
                assert not d.status(run_id).status.startswith("finished"), d.logs(run_id)
                checked = time.monotonic()
            time.sleep(0.1)
        round_1_done = rounds.stat().st_mtime  # round 2's messages leave after this write
        holding_round_2(d, 3, since=round_1_done)  # the node dies holding round 2's message
        killed_at = time.monotonic()
        victims = d.kill_node(3)
        outcome = d.wait(run_id, timeout=RUN_TIMEOUT)
        finished_in = time.monotonic() - killed_at
        logs = d.logs(run_id)
        started = all_pids(d) + victims
    assert not [p for p in started if alive(p)], "a process of the deployment is still running"
    assert not processes_under(root), "an orphaned deployment process is still running"

    assert outcome.completed, f"{outcome.status}: {outcome.details}\n{logs}"
    rows, summary = read_run(tmp_path / "f")
    assert [int(r["round"]) for r in rows] == [1, 2]
    trained = [int(r["nodes_trained"]) for r in rows]
    failed = [int(r["nodes_failed"]) for r in rows]
    assert trained == [4, 3], (trained, failed)
    assert failed[1] == 1, "round 2 does not record the killed node"
    assert "left out" in logs
    # Round 2 ended when the SuperLink declared the node offline, not at round-timeout.
    assert float(rows[1]["round_s"]) < cfg["round-timeout"]
    assert summary["status"] == "completed" and summary["num_nodes"] == 4
    nodes = summary["privacy"]["nodes"]
    assert int(nodes["3"]["steps"]) < min(int(nodes[p]["steps"]) for p in ("0", "1", "2"))
    print(f"killed node 3; run finished {finished_in:.0f}s later; rounds {trained}")  # noqa: T201


LAUNCHER = PROJECT_DIR / "scripts" / "local-deployment"


def _wait_for(path, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the launcher exited with code {proc.returncode}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout}s"
        time.sleep(1)


def test_launcher_foreground_insecure_trial_runs_the_printed_command_and_stops_on_ctrl_c(
    tmp_path,
):
    root = tmp_path / "dep"
    out = tmp_path / "launcher.out"
    with out.open("w") as fh:
        launcher = subprocess.Popen(
            [LAUNCHER, "start", "3", "--insecure", "--dir", root],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for(root / "pids.json", launcher)
        pids = json.loads((root / "pids.json").read_text())
        started = [pids["superlink"], *pids["supernodes"].values()]
        started += [c for p in started for c in descendants(p)]
        deadline = time.monotonic() + 30
        while "flwr run ." not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        printed = [line.strip() for line in out.read_text().splitlines()]
        command = next(line for line in printed if " flwr run . local-deployment " in line)
        assert command.startswith(f"FLWR_HOME={root / 'flwr-home'} flwr run")
        assert "'strategy=\"gossip\" eps=2 num-nodes=3' --stream" in command
        small = {
            **{k: v for k, v in SMALL.items() if k not in ("strategy", "eps")},
            "num-server-rounds": 1,
            "results-dir": str(tmp_path / "results"),
            "run-name": "trial",
        }
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        run = subprocess.run(
            ["bash", "-c", f"{command} --run-config '{inline_run_config(small)}'"],
            cwd=PROJECT_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        client = Deployment(root, 3, secure=False)  # only its `flwr` helpers, not started
        runs = json.loads(client.flwr("list", client.connection, "--format", "json").stdout)
        assert [r["status"] for r in runs["runs"]] == ["finished:completed"], run.stdout
        _, summary = read_run(tmp_path / "results" / "trial")
        assert summary["status"] == "completed" and summary["num_nodes"] == 3

        launcher.send_signal(signal.SIGINT)  # Ctrl-C
        assert launcher.wait(timeout=60) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
            stop_from_pids(root)
    assert not [p for p in started if alive(p)], "the launcher left a process running"
    assert not processes_under(root) and not (root / "pids.json").exists()


def test_launcher_detach_then_stop(tmp_path):
    root = tmp_path / "dep"
    start = subprocess.run(
        [LAUNCHER, "start", "1", "--insecure", "--detach", "--dir", root],
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert start.returncode == 0, start.stderr
        assert "flwr run . local-deployment" in start.stdout
        pids = json.loads((root / "pids.json").read_text())
        started = [pids["superlink"], pids["supernodes"]["0"]]
        assert all(alive(p) for p in started), "detached processes died with the launcher"
        started += [c for p in started for c in descendants(p)]
        stop = subprocess.run(
            [LAUNCHER, "stop", "--dir", root], capture_output=True, text=True, timeout=120
        )
        assert stop.returncode == 0, stop.stderr
        assert "stopped" in stop.stderr
    finally:
        stop_from_pids(root)
    assert not [p for p in started if alive(p)]
    assert not processes_under(root) and not (root / "pids.json").exists()
