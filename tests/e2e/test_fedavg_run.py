"""The real `flwr run .` path: SuperLink, simulation runtime, Ray, ClientApps with Opacus."""

import csv
import json
import math

import pytest
import torch

from flower_app.cells import Cell, read_status, write_cells

pytestmark = pytest.mark.e2e

SMALL = {"num-server-rounds": 2, "samples-per-node": 500, "test-samples": 1000}


def read_run(folder):
    rows = list(csv.DictReader((folder / "rounds.csv").open()))
    summary = json.loads((folder / "summary.json").read_text())
    return rows, summary


@pytest.mark.parametrize("eps", [2.0, math.inf], ids=["eps2", "no-dp"])
def test_fedavg_run_completes_and_writes_results(superlink, tmp_path, eps):
    outcome = superlink.run(
        {**SMALL, "eps": eps, "results-dir": str(tmp_path), "run-name": "r"},
        num_nodes=4,
        timeout=600,
    )
    assert outcome.completed, (
        f"{outcome.status}: {outcome.details}\n{superlink.logs(outcome.run_id)}"
    )
    rows, summary = read_run(tmp_path / "r")
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert float(rows[-1]["accuracy"]) > 0.2, "not clearly better than chance (0.1)"
    assert all(int(r["nodes_trained"]) == 4 for r in rows)
    # device=auto, resolved by each node on its own machine: each reply says where it trained.
    if not torch.cuda.is_available():
        assert summary["devices"] == {"requested": "auto", "server": "cpu", "nodes": {"cpu": 4}}
    if math.isfinite(eps):
        spent = [float(r["eps_spent"]) for r in rows]
        assert 0 < spent[0] < spent[1] <= eps
        assert spent[1] >= 0.9 * eps
        nodes = summary["privacy"]["nodes"]
        assert set(nodes) == {"0", "1", "2", "3"}
        assert all(n["noise-multiplier"] > 0 and n["steps"] > 0 for n in nodes.values())
        assert "sample-level" in summary["privacy"]["unit"]
        # n is public, so the replace-one ε is reported beside the add/remove one, above it.
        assert all(n["eps-replace-one"] > n["eps"] for n in nodes.values())
        assert summary["privacy"]["eps_replace_one"] == max(
            n["eps-replace-one"] for n in nodes.values()
        )
    else:
        assert all(float(r["eps_spent"]) == 0 for r in rows)
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["eps"] == ("inf" if math.isinf(eps) else eps)


def test_bad_run_config_fails_the_run_with_one_clear_line_and_writes_nothing(superlink, tmp_path):
    outcome = superlink.run(
        {**SMALL, "eps": -1, "results-dir": str(tmp_path), "run-name": "bad"},
        num_nodes=2,
        timeout=300,
    )
    assert outcome.status == "finished:failed"
    assert "eps=-1.0 is not valid" in outcome.details and "inf for no DP" in outcome.details
    assert not (tmp_path / "bad").exists()
    # What `flwr run --stream` / `flwr log` show: the one line, no traceback, no exit-code text.
    logs = superlink.logs(outcome.run_id)
    assert (
        "invalid run: eps=-1.0 is not valid; expected a number > 0 and <= 1000, or inf for no DP"
        in logs
    )
    assert "Traceback" not in logs and "Exit Code: 700" not in logs, logs


def test_dp_noise_is_secret_unless_noise_seed_is_set(superlink, tmp_path):
    """Same run config twice (two cells of one Flower run, as fl-sweep runs them): different
    models. (Same noise-seed twice gives identical models: tests/e2e/test_sealed_run.py,
    whose two runs share one noise-seed.)"""
    tiny = {
        "num-server-rounds": 1,
        "samples-per-node": 200,
        "test-samples": 300,
        "eps": 4.0,
        "results-dir": str(tmp_path),
    }
    cells = tmp_path / "cells.json"
    write_cells(cells, [Cell(name, {"run-name": name}) for name in ("a", "b")])
    outcome = superlink.run({**tiny, "cells": str(cells)}, num_nodes=2, timeout=600)
    assert outcome.completed, f"{outcome.status}: {outcome.details}"
    assert {c: s["status"] for c, s in read_status(cells).items()} == {
        "a": "completed",
        "b": "completed",
    }
    losses = {}
    for name in ("a", "b"):
        rows, summary = read_run(tmp_path / name)
        losses[name] = rows[-1]["loss"]  # full float repr of the evaluated global model
        assert summary["privacy"]["noise_seed"] is None
        assert "SEEDED" not in summary["privacy"]["noise"]
    assert losses["a"] != losses["b"], "two runs drew the same noise from the same run config"
