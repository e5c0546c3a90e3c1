"""The real `flwr run .` path with client-level DP (dp-mode=update) and FedAvg sampling."""

import csv
import json

import pytest

from flower_app.privacy import epsilon, gaussian_sigma

pytestmark = pytest.mark.e2e


def test_per_round_accounting_reports_the_true_composed_eps(superlink, tmp_path):
    config = {
        "num-server-rounds": 3,
        "samples-per-node": 200,
        "test-samples": 500,
        "model": "mlp",
        "partitioner": "shards",
        "dp-mode": "update",
        "accounting": "per-round",
        "eps": 2.0,
        "max-grad-norm": 2.0,
        "fraction-train": 0.5,
        "results-dir": str(tmp_path),
        "run-name": "r",
    }
    outcome = superlink.run(config, num_nodes=4, timeout=600)
    assert outcome.completed, (
        f"{outcome.status}: {outcome.details}\n{superlink.logs(outcome.run_id)}"
    )
    rows = list(csv.DictReader((tmp_path / "r" / "rounds.csv").open()))
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [int(r["nodes_trained"]) for r in rows] == [2, 2, 2]  # half of 4 nodes
    assert all(float(r["eps_per_round_claimed"]) == 2.0 for r in rows)
    privacy = summary["privacy"]
    assert "client-level" in privacy["unit"] and privacy["accounting"] == "per-round"
    assert privacy["eps_per_round_claimed"] == 2.0
    sigma = gaussian_sigma(2.0, 1e-5)
    for node in privacy["nodes"].values():  # each node: one release per round it trained
        assert node["noise-multiplier"] == pytest.approx(sigma) and node["sample-rate"] == 1.0
        assert 1 <= node["steps"] <= 3
        assert node["eps"] == pytest.approx(
            epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=node["steps"], delta=1e-5)
        )
    assert privacy["eps_composed"] == max(n["eps"] for n in privacy["nodes"].values())
    assert float(rows[-1]["eps_spent"]) == pytest.approx(privacy["eps_composed"])
