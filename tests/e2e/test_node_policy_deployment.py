"""Real SuperNodes enforce their operators' privacy policy and keep a ledger across restarts.

Two SuperNodes on loopback (TLS, node auth), each with `max-eps=4 lifetime-eps=2.1` and its
own `ledger-dir`, as an operator would start them. FedAvg samples one node per round with
its own seeded generator, so the test knows which node trains when.
"""

import csv
import json
import random
import shutil
import time

import pytest

from flower_app.ledger import ledger_key
from flower_app.privacy import epsilon
from sim.launch.deployment import Deployment
from sim.launch.processes import alive, processes_under
from tests.e2e.test_deployment import RUN_TIMEOUT, all_pids

pytestmark = [pytest.mark.e2e, pytest.mark.deploy]

POLICY = {"max-eps": 4, "lifetime-eps": 2.1}
BASE = {
    "strategy": "fedavg",
    "num-nodes": 2,
    "fraction-train": 0.5,  # one node per round
    "min-available-nodes": 1,
    "num-server-rounds": 3,
    "samples-per-node": 200,
    "batch-size": 32,  # 7 Poisson steps per round
    "partitioner": "iid",
    "test-samples": 300,
}
ROUND_STEPS = 7


def ledger_runs(d, pid):
    path = d.ledger_dir(pid) / "privacy-ledger.json"
    return json.loads(path.read_text())["runs"] if path.exists() else {}


def refused(d, run_config, tmp_path, name):
    run_id = d.submit({**BASE, **run_config, "results-dir": str(tmp_path), "run-name": name})
    outcome = d.wait(run_id, timeout=RUN_TIMEOUT)
    logs = d.logs(run_id)
    assert outcome.status == "finished:failed", f"{outcome.status}\n{logs}"
    assert "Traceback" not in logs, logs
    assert not (tmp_path / name).exists(), "a refused run left a results folder"
    return outcome.details, logs, run_id


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    root = tmp_path_factory.mktemp("guarded")
    with Deployment(root, 2, policy=POLICY, startup_timeout=180) as d:
        yield d
        started = all_pids(d)
    assert not [p for p in started if alive(p)], "a process of the deployment is still running"
    assert not processes_under(root), "an orphaned deployment process is still running"


def test_a_node_refuses_a_run_above_its_max_eps_and_one_without_dp(guarded, tmp_path):
    d = guarded
    details, logs, run_id = refused(d, {"eps": 8}, tmp_path, "eps8")
    assert "eps=8 exceeds this node's max-eps=4" in details
    assert "refused by its node(s)" in logs and "max-eps=4" in logs
    print(f"refused run as `flwr log` shows it:\n{logs}")  # noqa: T201
    details, _, _ = refused(d, {"eps": float("inf")}, tmp_path, "noDP")
    assert "eps=inf (no DP) exceeds this node's max-eps=4" in details
    assert ledger_runs(d, 0) == {} and ledger_runs(d, 1) == {}, "a refusing node trained"


def test_a_node_runs_only_the_app_its_operator_allowed(guarded, tmp_path):
    """A run that ships a ClientApp without the policy check is refused before it is installed.

    flwr 1.42 lets anyone who reaches the SuperLink submit a run, and a SuperNode runs the
    ClientApp the run ships. Without the warm SuperExec's allow-list this modified app would
    train at eps=8 on nodes whose operators set max-eps=4.
    """
    d = guarded
    app = tmp_path / "modified-app"
    shutil.copytree(d.app, app)
    code = app / "client_app" / "app.py"
    check = "NodePolicy.from_node_config(context.node_config)"
    assert check in code.read_text()
    code.write_text(code.read_text().replace(check, "NodePolicy.from_node_config({})"))
    before = [ledger_runs(d, i) for i in (0, 1)]
    out = tmp_path / "results"
    run_id = d.cli.submit(app, {**BASE, "eps": 8, "results-dir": str(out), "run-name": "m"})
    outcome = d.wait(run_id, timeout=RUN_TIMEOUT)
    logs = d.logs(run_id)
    assert "not on this node's allow-list" in logs, logs
    assert [ledger_runs(d, i) for i in (0, 1)] == before, "a node ran the modified app"
    rounds = out / "m" / "rounds.csv"
    trained = (
        [int(r["nodes_trained"]) for r in csv.DictReader(rounds.open())] if rounds.exists() else []
    )
    assert not any(trained), f"{outcome.status}: nodes trained {trained}"
    # The app the operator allowed still runs (the other tests here use it).
    assert (d.node_home(0) / "allowed-fabs").read_text().split()[0] == d.fab_hash


def wait_offline(d, pid, timeout=180):
    """Until the SuperLink declares the SuperNode offline (two missed 30 s heartbeats).

    Before that it refuses a second activation of the same node: a restart would exit 305.
    """
    deadline = time.monotonic() + timeout
    node_id = d.node_ids[pid]
    while any(int(n["node-id"]) == node_id for n in d.online()):
        assert time.monotonic() < deadline, f"node {pid} still online {timeout}s after its death"
        time.sleep(5)  # offline takes ~60 s; each check is a `flwr` process (~1.5 s of CPU)


def test_a_restarted_node_continues_its_ledger_and_the_lifetime_budget_holds(guarded, tmp_path):
    """Node 1 trains round 1, dies, and is back (same key, same ledger-dir) for round 11.

    Rounds 2-10 go to node 0: they give the SuperLink time to declare node 1 offline, which
    it must before node 1 may activate again.
    """
    d = guarded
    rounds_total, seed = 11, 589
    order = [random.Random(f"{seed}:{r}").sample([0, 1], 1)[0] for r in range(1, 12)]
    assert order == [1] + [0] * 9 + [1]
    config = {**BASE, "eps": 2, "seed": seed, "num-server-rounds": rounds_total}
    run_id = d.submit({**config, "results-dir": str(tmp_path), "run-name": "a"})
    rounds = tmp_path / "a" / "rounds.csv"
    deadline = time.monotonic() + RUN_TIMEOUT
    checked = time.monotonic()
    while not (rounds.exists() and len(rounds.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, "round 1 never finished"
        if time.monotonic() - checked > 10:  # the CLI costs ~1.5 s of CPU: not often
            assert not d.status(run_id).status.startswith("finished"), d.logs(run_id)
            checked = time.monotonic()
        time.sleep(0.2)
    after_round_1 = ledger_runs(d, 1)[ledger_key(run_id, 1)]
    assert after_round_1["steps"] == ROUND_STEPS
    killed_at = time.monotonic()
    d.kill_node(1)  # the device loses power after its round...
    wait_offline(d, 1)
    d.nodes[1] = d.start_supernode(1, key_name="node-1", root_certificates=d.ca)  # ...is back
    d.wait_online(2, timeout=120)
    back_after = time.monotonic() - killed_at
    outcome = d.wait(run_id, timeout=RUN_TIMEOUT)
    logs = d.logs(run_id)
    assert outcome.completed, f"{outcome.status}: {outcome.details}\n{logs}"

    rows = list(csv.DictReader(rounds.open()))
    assert [int(r["nodes_trained"]) for r in rows] == [1] * rounds_total
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    node = summary["privacy"]["nodes"]["1"]
    # The restarted process resumed the ledger: two rounds, not a fresh budget's one.
    assert node["steps"] == 2 * ROUND_STEPS == ledger_runs(d, 1)[ledger_key(run_id, 1)]["steps"], (
        f"node 1 was back {back_after:.0f}s after its death; rounds ended at "
        f"{[r['wall_s'] for r in rows]}"
    )
    one_round = epsilon(
        noise_multiplier=node["noise-multiplier"],
        sample_rate=node["sample-rate"],
        steps=ROUND_STEPS,
        delta=1e-5,
    )
    assert node["eps"] > one_round, "the node's ε went back after its restart"
    assert 0 < node["lifetime-eps"] <= 2.1
    print(  # noqa: T201
        f"node 1 back {back_after:.0f}s after SIGKILL; its ε {one_round:.3f} after round 1, "
        f"{node['eps']:.3f} after round 11 ({node['steps']} steps, ledger resumed)"
    )

    # The same run again would take node 1 to a lifetime ε of 2.17 > 2.1: refused, unspent.
    details, _, second = refused(d, config, tmp_path, "b")
    assert "over its lifetime-eps=2.1" in details
    assert ledger_key(second, 0) not in ledger_runs(d, 0)
    assert ledger_key(second, 1) not in ledger_runs(d, 1)
