"""strategy=gossip through the real `flwr run` path."""

import csv
import json
import math

import pytest

pytestmark = pytest.mark.e2e

# IID shards: with label-skewed 500-sample shards, a single node's DP model after 3 rounds
# sits too close to chance for a stable check of "above chance".
SMALL = {
    "strategy": "gossip",
    "partitioner": "iid",
    "num-server-rounds": 3,
    "samples-per-node": 600,
    "test-samples": 1000,
    "node-eval-samples": 500,
    "gossip-relay": "open",  # consensus and the average model: tests/e2e/test_sealed_run.py
}


@pytest.mark.parametrize(
    ("eps", "topology", "mode"),
    [(2.0, "ring", "matching"), (math.inf, "exponential", "metropolis")],
    ids=["eps2-ring-matching", "no-dp-exponential-metropolis"],
)
def test_gossip_run_completes_with_node_diagnostics(superlink, tmp_path, eps, topology, mode):
    cfg = {**SMALL, "eps": eps, "topology": topology, "gossip-mode": mode}
    outcome = superlink.run(
        {**cfg, "results-dir": str(tmp_path), "run-name": "g"}, num_nodes=5, timeout=600
    )
    assert outcome.completed, f"{outcome.status}: {outcome.details}"
    rows = list(csv.DictReader((tmp_path / "g" / "rounds.csv").open()))
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    last = rows[-1]
    assert float(last["node_acc_mean"]) > 0.2, "node models no better than chance (0.1)"
    assert (
        float(last["node_acc_min"]) <= float(last["node_acc_mean"]) <= float(last["node_acc_max"])
    )
    assert all(float(r["consensus_distance"]) > 0 for r in rows)
    assert all(float(r["bytes_sent_per_node"]) > 0 for r in rows)
    assert all(int(r["nodes_trained"]) == 5 for r in rows)
    if math.isfinite(eps):
        assert 0 < float(last["eps_spent"]) <= eps
    topo = summary["topology"]
    assert topo["name"] == topology and topo["mode"] == mode and topo["nodes"] == 5
    assert 0 < topo["spectral_gap"] <= 1 and topo["diameter"] >= 1
    # ε against each observer: DP-SGD has no pairwise bound, so local ε for all, said so.
    network = json.loads((tmp_path / "g" / "network_privacy.json").read_text())
    assert summary["network_privacy"]["by_distance"] == network["by_distance"]
    assert [d["distance"] for d in network["by_distance"]][0] == 0
    if math.isfinite(eps):
        assert network["method"].startswith("local DP for every observer")
        local = network["by_distance"][0]["eps_max"]
        assert local == pytest.approx(float(last["eps_spent"]))
        assert network["server"]["eps_bound"] == pytest.approx(local)
    else:
        assert network["method"].startswith("no DP")


@pytest.mark.parametrize(
    ("overrides", "nodes", "words"),
    [
        ({"topology": "ring"}, 2, ["topology=ring needs >= 3 nodes", "got 2"]),
        ({"topology": "erdos-renyi", "edge-prob": 0.01}, 4, ["disconnected", "edge-prob"]),
    ],
    ids=["too-few-nodes", "disconnected"],
)
def test_impossible_topology_fails_before_training(superlink, tmp_path, overrides, nodes, words):
    outcome = superlink.run(
        {**SMALL, **overrides, "results-dir": str(tmp_path), "run-name": "bad"},
        num_nodes=nodes,
        timeout=300,
    )
    assert outcome.status == "finished:failed"
    for word in words:
        assert word in outcome.details
    assert not (tmp_path / "bad").exists()
