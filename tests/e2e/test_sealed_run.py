"""gossip-relay=sealed through the real `flwr run` path, against the open relay."""

import csv
import json

import pytest

pytestmark = pytest.mark.e2e

SMALL = {
    "strategy": "gossip",
    "partitioner": "iid",
    "num-server-rounds": 2,
    "samples-per-node": 300,
    "test-samples": 500,
    "node-eval-samples": 300,
    "eps": 4.0,
    "noise-seed": 5,  # the same noise in both runs, so they can be compared exactly
    "gossip-steps": 2,
}
NODES = 3


def _run(superlink, tmp_path, relay):
    name = f"relay-{relay}"
    outcome = superlink.run(
        {**SMALL, "gossip-relay": relay, "results-dir": str(tmp_path), "run-name": name},
        num_nodes=NODES,
        timeout=600,
    )
    assert outcome.completed, f"{outcome.status}: {outcome.details}"
    rows = list(csv.DictReader((tmp_path / name / "rounds.csv").open()))
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    # A seeded run says so wherever its privacy is stated.
    assert "SEEDED" in summary["privacy"]["noise"] and "NOT private" in summary["privacy"]["noise"]
    logs = superlink.logs(outcome.run_id)
    assert "SEEDED (noise-seed=5)" in logs and "NOT private against anyone" in logs
    return rows, summary


def test_sealed_and_open_runs_report_the_same_node_accuracy(superlink, tmp_path):
    """Two runs with one noise-seed replay the same noise: identical node models (so the
    same accuracies), whichever relay carries them."""
    sealed_rows, sealed = _run(superlink, tmp_path, "sealed")
    open_rows, opened = _run(superlink, tmp_path, "open")
    keys = ("node_acc_mean", "node_acc_min", "node_acc_max", "nodes_trained", "eps_spent")
    assert [[r[k] for k in keys] for r in sealed_rows] == [[r[k] for k in keys] for r in open_rows]
    assert float(sealed_rows[-1]["node_acc_mean"]) > 0.2, "no better than chance (0.1)"
    # What only the open relay's server can compute is empty under sealed, and says why.
    assert all(r["accuracy"] == r["consensus_distance"] == "" for r in sealed_rows)
    assert all(float(r["consensus_distance"]) > 0 for r in open_rows)
    assert sealed["final_accuracy"] is None and opened["final_accuracy"] is not None
    assert sealed["topology"]["relay"] == "sealed"
    assert "server holds no node model" in sealed["topology"]["unavailable"]
    assert all(float(r["bytes_sent_per_node"]) > 0 for r in sealed_rows)
    # matching, 2 gossip steps: one round trip per step, and nothing refused.
    assert [(r["gossip_exchanges"], r["exchanges_refused"]) for r in sealed_rows] == [
        ("2", "0")
    ] * 2


def test_a_sealed_run_is_audited_by_its_nodes(superlink, tmp_path):
    """audit-canaries under sealed: nodes score the canaries on their own models."""
    cfg = {**SMALL, "gossip-relay": "sealed", "audit-canaries": 20, "eps": 8.0}
    outcome = superlink.run(
        {**cfg, "results-dir": str(tmp_path), "run-name": "audit"}, num_nodes=NODES, timeout=600
    )
    assert outcome.completed, f"{outcome.status}: {outcome.details}"
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    names = [o["observer"] for o in audit["observers"]]
    assert names == ["owner", "distance-1"], names  # a 3-ring; no one holds an average
    assert all(
        o["canaries"] > 0 and o["eps_lower"] <= o["eps_accountant"] for o in audit["observers"]
    )
