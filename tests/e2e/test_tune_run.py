"""A real `fl-sweep tune`: search on validation, the choice on test, through `flwr run`."""

import json

import pandas as pd
import pytest

import sim.sweeps.cli

pytestmark = pytest.mark.e2e


def test_a_tiny_real_tune_searches_on_validation_and_runs_the_choice_on_test(
    lent_superlink, tmp_path
):
    out = tmp_path / "tune"
    argv = [
        "tune",
        "--strategies", "gossip",
        "--eps", "2",
        "--seeds", "7",
        "--nodes", "3",
        "--rounds", "2",
        "--set", "samples-per-node=120",
        "--set", "validation-samples=400",
        "--set", "test-samples=300",
        "--set", "batch-size=16",
        "--set", "local-steps=3",
        "--search", "lr=0.05,0.5",
        "--search", "gossip:gossip-steps=2",
        "--timeout", "600",
        "--out", str(out),
    ]  # fmt: skip
    rc = sim.sweeps.cli.main(argv)
    search = json.loads((out / "search" / "manifest.json").read_text())["cells"]
    errors = {c["id"]: c["error"] for c in search if c["status"] != "completed"}
    assert rc == 0, errors
    assert len(search) == 2
    for cell in search:
        config = json.loads((out / "search" / "runs" / cell["id"] / "config.json").read_text())
        assert config["evaluate-on"] == "validation" and config["validation-samples"] == 400
        rounds = pd.read_csv(out / "search" / "runs" / cell["id"] / "rounds.csv")
        # 3 nodes, each sends one model per matched gossip step: two steps a round.
        assert (rounds["bytes_sent_cum_per_node"].diff().dropna() > 0).all()
    choice = json.loads((out / "tune.json").read_text())["groups"][0]
    best = max(choice["candidates"], key=lambda c: c["validation_accuracy"])
    assert choice["chosen"] == best["params"] and set(best["params"]) == {"lr", "gossip-steps"}
    final = json.loads((out / "final" / "manifest.json").read_text())["cells"]
    assert [c["status"] for c in final] == ["completed"]
    run = out / "final" / "runs" / final[0]["id"]
    config = json.loads((run / "config.json").read_text())
    assert config["evaluate-on"] == "test" and config["lr"] == best["params"]["lr"]
    summary = json.loads((run / "summary.json").read_text())
    # local-steps=3 for 2 rounds: every node planned and spent exactly 6 DP steps.
    nodes = summary["privacy"]["nodes"]
    assert len(nodes) == 3
    assert all(n["steps"] == n["planned-steps"] == 6 for n in nodes.values()), nodes
    assert (out / "tune.md").is_file()
