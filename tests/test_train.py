"""flower_app.train changes no process-wide state: logging and warning filters stay as found."""

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from flower_app.data import to_tensors
from flower_app.model import build_model
from flower_app.privacy import plan_ledger
from flower_app.train import quiet_opacus_logging, train_dp

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_training_code_leaves_flower_logging_alone():
    code = "import logging, flower_app.train; assert logging.getLogger('flwr').propagate"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_quiet_opacus_logging_stops_flower_lines_reaching_the_root_handler(monkeypatch):
    flwr_logger = logging.getLogger("flwr")
    monkeypatch.setattr(flwr_logger, "propagate", True)
    quiet_opacus_logging()
    assert not flwr_logger.propagate


def test_dp_training_leaves_the_process_warning_filters_as_it_found_them():
    rng = np.random.default_rng(0)
    data = to_tensors(
        "fashion-mnist",
        rng.integers(0, 256, size=(8, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, size=8).astype(np.int64),
    )
    ledger = plan_ledger(
        num_samples=8, batch_size=4, total_epochs=1, target_eps=8.0, delta=1e-3, accountant="rdp"
    )
    before = list(warnings.filters)
    for mode in ("hooks", "ew"):
        train_dp(
            build_model("mlp", seed=0),
            data,
            ledger,
            epochs=1,
            batch_size=4,
            lr=0.1,
            momentum=0.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
        )
    assert warnings.filters == before
