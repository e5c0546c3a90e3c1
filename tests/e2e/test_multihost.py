"""Separate hosts for real: the SuperLink and each SuperNode in its own network namespace.

The SuperLink listens on its namespace's address with a TLS certificate issued for that
address, the SuperNodes authenticate with registered keys, and each trains on its own data.
Mid-run one node's cable is pulled (`ip link set eth0 down`): the run goes on with the
others; the cable goes back in and the node trains again in a later round.
"""

import csv
import json
import re
import subprocess
import sys
import time

import pytest

from sim.launch.deploy_commands import LAUNCHER_POLICY
from sim.launch.deployment import Deployment
from sim.launch.processes import alive, processes_under
from tests.e2e.netns import NetnsUnavailable, Network, unavailable_reason
from tests.e2e.test_deployment import all_pids, own_data

pytestmark = [pytest.mark.e2e, pytest.mark.deploy, pytest.mark.netns]

HOSTS = ["link", "node-0", "node-1", "node-2"]
ANSI = r"\x1b\[[0-9;]*m"  # Flower colours its log levels
CUT = "node-2"
RUN = {
    "strategy": "gossip",
    "eps": 2,
    "num-server-rounds": 6,
    "test-samples": 500,
    "node-eval-samples": 200,
    "batch-size": 32,
    "num-nodes": 3,
    # A round normally takes well under a minute here; a cut node's reply never comes, and
    # the round ends at this timeout with the others.
    "round-timeout": 90,
}


def rows_of(folder):
    try:
        with (folder / "rounds.csv").open() as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


@pytest.fixture(scope="module")
def network():
    if reason := unavailable_reason():
        pytest.skip(reason)
    try:
        with Network(HOSTS) as net:
            yield net
    except NetnsUnavailable as err:
        pytest.skip(str(err))
    assert not net.leftovers(), f"namespaces or links left behind: {net.leftovers()}"


def test_a_run_survives_a_cut_link_and_the_node_rejoins(network, tmp_path_factory, capsys):
    net = network
    root = tmp_path_factory.mktemp("multihost")
    netns = {"superlink": net.ns("link")} | {h: net.ns(h) for h in HOSTS[1:]}
    link = net.address("link")
    events = []

    def event(text):
        line = f"[multihost {time.strftime('%H:%M:%S')}] {re.sub(ANSI, '', text)}"
        events.append(line)
        with capsys.disabled():
            sys.stderr.write(line + "\n")

    with Deployment(
        root,
        3,
        host=link,
        netns=netns,
        data_dir=own_data(root / "device-data"),
        policy=LAUNCHER_POLICY,  # a node serving its own data must have a policy
        startup_timeout=180,
    ) as d:
        started = all_pids(d)
        assert d.address == f"{link}:{d.port}"
        san = subprocess.run(
            ["openssl", "x509", "-in", str(d.certs / "server.pem"), "-noout", "-ext",
             "subjectAltName"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f"IP Address:{link}" in san, san
        for host in HOSTS[1:]:  # each SuperNode really lives in its namespace
            pid = d.nodes[int(host.split("-")[1])].pid
            ns = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
            assert ns == net.ns(host), (host, ns)

        results = root / "results"
        run_id = d.submit({**RUN, "results-dir": str(results), "run-name": "cut"})
        folder = results / "cut"
        cut_after = restored_after = None
        deadline = time.monotonic() + 1500
        next_status = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = rows_of(folder)
            if cut_after is None and len(rows) >= 1:
                net.cut(CUT)
                cut_after = len(rows)
                command = f"ip -n {net.ns(CUT)} link set eth0 down"
                event(f"cut {CUT}'s link ({command}) after round {cut_after}")
            elif (
                restored_after is None
                and cut_after is not None
                and any(int(r["nodes_trained"]) < 3 for r in rows[cut_after:])
            ):
                net.restore(CUT)
                restored_after = len(rows)
                trained = [r["nodes_trained"] for r in rows]
                event(
                    f"restored {CUT}'s link after round {restored_after} (nodes trained: {trained})"
                )
            # The CLI costs ~1.5 s of CPU a call: ask Flower only once the run has written
            # its summary, or every 30 s to catch a run that fails before it.
            if (folder / "summary.json").exists() or time.monotonic() >= next_status:
                if d.status(run_id).status.startswith("finished"):
                    break
                next_status = time.monotonic() + 30
            time.sleep(1)
        outcome = d.wait(run_id, timeout=60)
        logs = d.logs(run_id)
        assert outcome.completed, f"{outcome.status}: {outcome.details}\n{logs}"

        rows = rows_of(folder)
        trained = [int(r["nodes_trained"]) for r in rows]
        event(f"rounds completed: {len(rows)}; nodes trained per round: {trained}")
        assert len(rows) == RUN["num-server-rounds"]
        assert cut_after is not None and restored_after is not None
        assert trained[0] == 3
        assert 2 in trained[cut_after:restored_after], "no round ran without the cut node"
        assert 3 in trained[restored_after:], (
            "the node never trained again after its link came back"
        )
        summary = json.loads((folder / "summary.json").read_text())
        nodes = summary["privacy"]["nodes"]
        assert int(nodes["2"]["steps"]) < int(nodes["0"]["steps"]), nodes
        for line in logs.splitlines():
            if "left out" in line:
                event(f"ServerApp: {line.strip()}")
        node_log = (d.node_home(2) / "out.log").read_text(errors="replace")
        for line in node_log.splitlines():
            if "Connection successful after" in line or "Reconnect" in line:
                event(f"SuperNode 2: {line.strip()}")
        assert "Connection successful after" in node_log, node_log[-3000:]
        (root / "events.log").write_text("\n".join(events) + "\n")
    assert not processes_under(root), "a process of the deployment is still running"
    assert not [p for p in started if alive(p)], "a process of the deployment is still running"
