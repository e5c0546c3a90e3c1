"""The ServerApp's per-round recorder: rows, and the warning when the model diverges."""

import csv
import math
from unittest.mock import Mock

import numpy as np
import torch
from flwr.app import ArrayRecord

from flower_app.config import RunConfig
from flower_app.data import to_tensors
from flower_app.model import build_model
from flower_app.results import RunFiles
from server_app.app import summarize
from server_app.evaluation import RoundRecorder, round_line


def _recorder(tmp_path, cfg=None):
    rng = np.random.default_rng(0)
    test = to_tensors(
        "fashion-mnist",
        rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 50).astype(np.int64),
    )
    files = RunFiles(tmp_path / "run")
    files.start({})
    strategy = Mock()
    strategy.round_diagnostics.return_value = {"eps_spent": 0.0, "nodes_trained": 2}
    return RoundRecorder(cfg or RunConfig(model="mlp"), files, strategy, test), files


def test_a_sealed_relay_evaluates_no_central_model(tmp_path):
    """The server holds no model under gossip-relay=sealed: `arrays` is still the initial
    one, so scoring it would report the initial model's accuracy as the round's."""
    cfg = RunConfig(model="mlp", strategy="gossip")
    recorder, files = _recorder(tmp_path, cfg)
    recorder.strategy.round_diagnostics.return_value = {
        "eps_spent": 0.0,
        "node_acc_mean": 0.5,
        "node_acc_min": 0.4,
        "node_acc_max": 0.6,
        "consensus_distance": None,
    }
    model = build_model("mlp", seed=0)
    recorder(0, ArrayRecord(model.state_dict()))
    assert recorder(1, ArrayRecord(model.state_dict())).keys() == set()
    broken = {k: torch.full_like(v, math.nan) for k, v in model.state_dict().items()}
    recorder(2, ArrayRecord(broken))  # never evaluated, so never "diverged"
    assert recorder.diverged_at is None and recorder.last_arrays is not None
    rows = list(csv.DictReader((files.folder / "rounds.csv").open()))
    assert [(r["accuracy"], r["loss"], r["consensus_distance"]) for r in rows] == [("", "", "")] * 2
    assert [r["node_acc_mean"] for r in rows] == ["0.5", "0.5"]


def test_a_diverged_model_is_flagged_once_at_its_first_round(tmp_path):
    recorder, files = _recorder(tmp_path)
    model = build_model("mlp", seed=0)
    recorder(0, ArrayRecord(model.state_dict()))
    recorder(1, ArrayRecord(model.state_dict()))
    assert recorder.diverged_at is None
    broken = {k: torch.full_like(v, math.nan) for k, v in model.state_dict().items()}
    recorder(2, ArrayRecord(broken))
    recorder(3, ArrayRecord(broken))
    assert recorder.diverged_at == 2
    rows = list(csv.DictReader((files.folder / "rounds.csv").open()))
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert math.isfinite(float(rows[0]["loss"])) and math.isnan(float(rows[1]["loss"]))


def test_the_round_line_leads_with_node_accuracy_under_gossip():
    row = {
        "round": 2,
        "accuracy": 0.5,
        "loss": 1.25,
        "eps_spent": 0.75,
        "node_acc_mean": 0.4,
        "node_acc_min": 0.3,
        "node_acc_max": 0.5,
        "consensus_distance": 0.01,
        "round_s": 1.26,
    }
    fedavg = round_line(RunConfig(eps=2.0, num_server_rounds=5), row)
    assert fedavg == "round 2/5  accuracy 0.5000  loss 1.2500  ε spent 0.750 of 2 " + (
        "(δ=1e-05, sample-level)  1.3s"
    )
    gossip = round_line(
        RunConfig(strategy="gossip", gossip_relay="open", eps=2.0, num_server_rounds=5), row
    )
    assert gossip.startswith("round 2/5  node accuracy 0.4000 (0.300..0.500)  consensus 0.01")
    sealed_row = row | {"accuracy": None, "loss": None, "consensus_distance": None}
    sealed = round_line(RunConfig(strategy="gossip", eps=2.0, num_server_rounds=5), sealed_row)
    assert sealed.startswith(
        "round 2/5  node accuracy 0.4000 (0.300..0.500)  (sealed relay: no consensus or avg-model)"
    )
    audited = round_line(RunConfig(eps=2.0, num_server_rounds=5, audit_canaries=50), row)
    assert "(δ=1e-05, sample-level, AUDIT: 50 canaries per node)" in audited
    network = RunConfig(strategy="gossip", dp_mode="update", privacy_unit="network", eps=2.0)
    # eps is the far class's target; the node's own ε, which is larger, is the one spent.
    assert "local ε spent 0.750 (target 2 at distance >= 2) (δ=1e-05" in round_line(
        network, sealed_row
    )


def test_the_summary_has_the_fields_summary_json_always_had(tmp_path):
    recorder, files = _recorder(tmp_path)
    model = build_model("mlp", seed=0)
    recorder(0, ArrayRecord(model.state_dict()))
    recorder(1, ArrayRecord(model.state_dict()))
    strategy = Mock()
    strategy.run_summary.return_value = {"aggregation": "mean"}
    strategy.reports.privacy_by_node.return_value = {}
    strategy.reports.metrics = {0: {"device": -1}, 1: {"device": -1}}  # both trained on a CPU
    cfg = RunConfig(model="mlp", num_server_rounds=1, device="cpu")
    summary = summarize(cfg, strategy, recorder, run_name="r", num_nodes=2, wall_s=1.23456)
    assert summary.devices == {"requested": "cpu", "server": "cpu", "nodes": {"cpu": 2}}
    assert summary.status == "completed" and summary.wall_s == 1.235
    assert summary.rounds_completed == 1 and summary.final_accuracy == recorder.last_row["accuracy"]
    assert "topology" not in summary.to_dict() and summary.to_dict()["aggregation"] == "mean"
