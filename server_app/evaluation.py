"""Central evaluation: the test sets, the per-round recorder and its log line."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log

from flower_app.config import RunConfig, claims_per_round
from flower_app.data import BatchTensorDataset, to_tensors
from flower_app.device import data_on, device_name, resolve_device
from flower_app.model import model_for
from flower_app.preflight import evaluation_arrays
from flower_app.results import RunFiles, format_eps
from flower_app.train import evaluate
from flower_app.wire import DEVICE
from strategies.base import Diagnostics

# Short unit for the per-round line, by dp-mode.
UNIT_SHORT = {"sample": "sample-level", "update": "client-level"}


def central_test_sets(cfg: RunConfig) -> tuple[BatchTensorDataset, BatchTensorDataset]:
    """The central evaluation set and its fixed subset for per-node models.

    `evaluate-on=test`: the test set (capped at `test-samples`). `evaluate-on=validation`:
    the validation split carved off the training set, and nothing of the test set.
    """
    x, y, idx, node_idx = evaluation_arrays(cfg)  # checked in every run: the nodes carve it too
    return (
        to_tensors(cfg.dataset, x[idx], y[idx], cfg.normalize),
        to_tensors(cfg.dataset, x[node_idx], y[node_idx], cfg.normalize),
    )


def server_device(cfg: RunConfig) -> torch.device:
    """Where the ServerApp evaluates: `device` resolved on the server's own hardware.

    Raises `DeviceError` (a `ConfigError`: one line) for a CUDA device the server lacks.
    """
    return resolve_device(cfg.device)


def devices_used(cfg: RunConfig, reports: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """`summary.json`'s `devices`: what was asked, where the server evaluated, where nodes trained.

    `nodes` counts the nodes by the device each reported in its last reply (`wire.DEVICE`).
    """
    nodes = Counter(device_name(int(m[DEVICE])) for m in reports.values() if DEVICE in m)
    return {
        "requested": cfg.device,
        "server": str(server_device(cfg)),
        "nodes": dict(sorted(nodes.items())),
    }


def model_evaluator(
    cfg: RunConfig, test: BatchTensorDataset
) -> Callable[[list[np.ndarray]], tuple[float, float]]:
    """(loss, accuracy) of a model given as its list of arrays, on `test`, on `server_device`."""
    device = server_device(cfg)
    model = model_for(cfg).to(device)
    keys = list(model.state_dict())
    test = data_on(device, test)

    def evaluate_arrays(arrays: list[np.ndarray]) -> tuple[float, float]:
        model.load_state_dict(
            {k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)}
        )
        return evaluate(model, test)

    return evaluate_arrays


def round_line(cfg: RunConfig, row: Mapping[str, Any]) -> str:
    """The one log line of a round, from its rounds.csv row."""
    if cfg.sealed_relay:  # the server holds no model: only the nodes' own counts
        quality = "node accuracy " + (
            f"{row['node_acc_mean']:.4f} ({row['node_acc_min']:.3f}..{row['node_acc_max']:.3f})"
            if row.get("node_acc_mean") is not None
            else "unknown (no node answered)"
        )
        quality += "  (sealed relay: no consensus or avg-model)"
    elif cfg.strategy == "gossip":
        # No global model exists: lead with the nodes' own models.
        quality = (
            f"node accuracy {row['node_acc_mean']:.4f} "
            f"({row['node_acc_min']:.3f}..{row['node_acc_max']:.3f})  "
            f"consensus {row['consensus_distance']:.3g}  "
            f"avg-model accuracy {row['accuracy']:.4f}"
        )
    else:
        quality = f"accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}"
    if claims_per_round(cfg):
        budget = f"true composed ε {row['eps_spent']:.3f} (claimed: ε={cfg.eps:g} per round"
        budget += ", uncomposed)"
    elif cfg.privacy_unit == "network":  # eps is the far class's target, not the local ε
        budget = (
            f"local ε spent {row['eps_spent']:.3f} (target {format_eps(cfg.eps)} at distance "
            f">= {cfg.network_min_distance})"
        )
    else:
        budget = f"ε spent {row['eps_spent']:.3f} of {format_eps(cfg.eps)}"
    unit = UNIT_SHORT[cfg.dp_mode] + (", SEEDED noise" if cfg.seeded_noise else "")
    unit += f", AUDIT: {cfg.audit_canaries} canaries per node" if cfg.audited else ""
    return (
        f"round {row['round']}/{cfg.num_server_rounds}  {quality}  {budget} "
        f"(δ={cfg.delta:g}, {unit})  {row['round_s']:.1f}s"
    )


class RoundRecorder:
    """Evaluates the model after each round, logs one line and appends a row to rounds.csv."""

    def __init__(
        self, cfg: RunConfig, files: RunFiles, strategy: Diagnostics, test: BatchTensorDataset
    ) -> None:
        """Keep what each round's row needs (the test set on `server_device`)."""
        self.device = server_device(cfg)
        self.cfg, self.files, self.strategy = cfg, files, strategy
        self.test = data_on(self.device, test)
        self.t0 = self.t_last = time.monotonic()
        self.initial: dict[str, float] = {}
        self.last_row: dict[str, Any] = {}
        self.diverged_at: int | None = None
        self.bytes_sent = 0.0  # per node, over the rounds so far
        self.last_arrays: ArrayRecord | None = None  # the model evaluated last

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's `evaluate_fn`: called with round 0 before training, then after each round."""
        t_eval = time.monotonic()
        if server_round > 0 and self.cfg.sealed_relay:
            # The server holds no model (`arrays` is still the initial one): nothing central.
            return self._record(server_round, t_eval, None, None)
        self.last_arrays = arrays
        model = model_for(self.cfg).to(self.device)
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, self.test)
        if server_round == 0:
            self.initial = {"accuracy": accuracy, "loss": loss}
            self.t0 = self.t_last = time.monotonic()
            return MetricRecord(self.initial)
        return self._record(server_round, t_eval, accuracy, loss)

    def _record(
        self, server_round: int, t_eval: float, accuracy: float | None, loss: float | None
    ) -> MetricRecord:
        """Append the round's row, log its line; None: no central model was evaluated."""
        row = self._row(server_round, accuracy, loss)
        now = time.monotonic()  # after the per-node evaluation, which is part of the round
        row |= {
            "eval_s": round(now - t_eval, 3),  # central + per-node evaluation
            "round_s": round(now - self.t_last, 3),
            "wall_s": round(now - self.t0, 3),
        }
        self.t_last = now
        self.files.add_round(row)
        self.last_row = row
        if loss is not None:
            self._check_divergence(server_round, loss)
        log(INFO, "%s", round_line(self.cfg, row))
        if accuracy is None or loss is None:
            return MetricRecord({})
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    def _row(self, server_round: int, accuracy: float | None, loss: float | None) -> dict[str, Any]:
        """The round's rounds.csv columns but its timings (the strategy's diagnostics last)."""
        row = {
            "round": server_round,
            "strategy": self.cfg.strategy,
            "eps_target": self.cfg.eps,
            # The uncomposed per-round ε claimed (accounting=per-round); eps_spent is the truth.
            "eps_per_round_claimed": self.cfg.eps if claims_per_round(self.cfg) else None,
            "accuracy": accuracy,
            "loss": loss,
            # Where every node holds the evaluated model (FedAvg), node accuracy is its accuracy.
            "node_acc_mean": accuracy,
            "node_acc_min": accuracy,
            "node_acc_max": accuracy,
            **self.strategy.round_diagnostics(),
        }
        if (sent := row.get("bytes_sent_per_node")) is not None:
            self.bytes_sent += float(sent)
            row["bytes_sent_cum_per_node"] = self.bytes_sent
        return row

    def _check_divergence(self, server_round: int, loss: float) -> None:
        """Remember, and warn once about, the first round whose model has a non-finite loss."""
        if math.isfinite(loss) or self.diverged_at is not None:
            return
        self.diverged_at = server_round
        log(
            WARNING,
            "round %d: the evaluated model's loss is %s: it has diverged (non-finite "
            "weights), and its accuracy from here on is that of a constant guess",
            server_round,
            loss,
        )
