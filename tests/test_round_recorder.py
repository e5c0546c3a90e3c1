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
from server_app.app import RoundRecorder


def _recorder(tmp_path):
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
    return RoundRecorder(RunConfig(model="mlp"), files, strategy, test), files


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
