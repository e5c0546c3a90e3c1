"""`flwr run` with a model defined in the test suite and a dataset the test writes to disk."""

import csv
import json

import pytest

from tests.test_byo_model_data import write_dataset

pytestmark = pytest.mark.e2e


def test_own_model_and_npz_dataset_run_end_to_end(superlink, tmp_path):
    # The ClientApps and the ServerApp run from the staged app: the test model ships in it.
    assert (superlink.staged_app() / "tests" / "byo_models.py").is_file()
    dataset = write_dataset(tmp_path / "data.npz", n_train=600, n_test=200)
    outcome = superlink.run(
        {
            "model": "tests.byo_models:build",
            "dataset": dataset,
            "num-server-rounds": 2,
            "batch-size": 16,
            "eps": 4.0,
            "results-dir": str(tmp_path),
            "run-name": "byo",
        },
        num_nodes=3,
        timeout=600,
    )
    assert outcome.completed, (
        f"{outcome.status}: {outcome.details}\n{superlink.logs(outcome.run_id)}"
    )
    summary = json.loads((tmp_path / "byo" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    rows = list(csv.DictReader((tmp_path / "byo" / "rounds.csv").open()))
    assert all(int(r["nodes_trained"]) == 3 for r in rows)
    assert float(rows[-1]["accuracy"]) > 0.4, "not clearly better than chance (1/3)"
