"""FedAvg whose evaluation is central and which keeps each node's privacy spend."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flower_app.wire import (
    ARRAYS,
    CONFIG,
    EPS,
    EPS_MAX,
    EPS_MEAN,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    SERVER_ROUND,
    TRAIN_LOSS,
)
from strategies.base import (
    CentralEvaluationMixin,
    NodeReports,
    PrivacyBounds,
    registration_order,
    reply_order,
)


def aggregate_train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Largest and mean ε among the repliers; the mean training loss only without DP.

    A private node never sends its (un-noised) training loss.
    """
    metrics = [r[METRICS] for r in replies]
    out: dict[str, float] = {}
    if losses := [m for m in metrics if TRAIN_LOSS in m]:
        total = sum(float(m[weight_key]) for m in losses)
        out[TRAIN_LOSS] = sum(float(m[TRAIN_LOSS]) * float(m[weight_key]) for m in losses) / total
    if eps := [float(m[EPS]) for m in metrics if EPS in m]:
        out |= {EPS_MAX: max(eps), EPS_MEAN: sum(eps) / len(eps)}
    return MetricRecord(out)


class CentralFedAvg(CentralEvaluationMixin, FedAvg):
    """Global example-weighted average of the sampled nodes' models (McMahan et al.).

    Evaluation happens on the server, on the central test set, so there is no federated
    evaluation round.
    """

    def __init__(
        self,
        *,
        num_nodes: int,
        fraction_train: float = 1.0,
        min_available_nodes: int = 2,
        seed: int = 0,
        bounds: PrivacyBounds | None = None,
        bindings: Mapping[int, int] | None = None,
        keep_uploads: bool = False,
    ) -> None:
        """Store the knobs; weights come from each reply's `num-examples`.

        `bindings`: partition id -> the node id that alone may report it (`partition-nodes`).
        `keep_uploads`: remember each node's latest upload as the server received it (what
        a privacy audit scores from the server's view).
        """
        super().__init__(
            fraction_train=fraction_train,
            min_train_nodes=min(min_available_nodes, num_nodes),
            min_available_nodes=min_available_nodes,
            weighted_by_key=NUM_EXAMPLES,
            arrayrecord_key=ARRAYS,
            configrecord_key=CONFIG,
            train_metrics_aggr_fn=aggregate_train_metrics,
        )
        self.num_nodes = num_nodes
        self.seed = seed
        self.reports = NodeReports(
            bounds or PrivacyBounds(), quorum=min_available_nodes, bindings=bindings
        )
        self.last_round: dict[str, Any] = {}
        self.keep_uploads = keep_uploads
        self.uploads: dict[int, list[np.ndarray]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample `fraction-train` of the nodes; remember whom it asked.

        Flower's FedAvg draws from the global `random`, which Flower's own heartbeat thread
        also draws from at moments that vary between runs, so one seed sampled different
        clients in different runs. This draw has its own generator per (seed, round), over
        the nodes in registration order (simulation: partition order).
        """
        nodes = registration_order(grid)
        size = min(len(nodes), max(int(len(nodes) * self.fraction_train), self.min_train_nodes))
        node_ids = random.Random(f"{self.seed}:{server_round}").sample(nodes, size)
        log(INFO, "configure_train: sampled %d nodes (out of %d)", size, len(nodes))
        config[SERVER_ROUND] = server_round
        # One payload for every sampled node, as Flower's FedAvg sends it.
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = [
            Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node)
            for node in node_ids
        ]
        self.reports.asked(node_ids)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's weighted average, plus bookkeeping of who trained and what they spent."""
        # Flower sums the replies in arrival order, which varies from run to run; float sums
        # then differ in the last bits, and this chaotic training amplified that to runs of
        # one config ending 6 points apart. A fixed order makes a seed reproduce bit for bit.
        replies = sorted(replies, key=reply_order)
        ok = self.reports.remember(server_round, replies)
        if self.keep_uploads:
            for r in ok:
                pid = int(r.content[METRICS][PARTITION_ID])
                self.uploads[pid] = r.content[self.arrayrecord_key].to_numpy_ndarrays()
        arrays, metrics = super().aggregate_train(server_round, ok)
        self.last_round = {
            "nodes_trained": len(ok),
            "nodes_failed": self.reports.nodes_failed,
            # Only non-private nodes report a training loss.
            "train_loss": float(metrics[TRAIN_LOSS]) if metrics and TRAIN_LOSS in metrics else None,
            # Every node ends the round holding the same global model.
            "consensus_distance": 0.0,
            # Each trained node uploads its model once (downloads are not counted).
            "bytes_sent_per_node": (
                arrays.count_bytes() * len(ok) / max(self.num_nodes, len(ok))
                if arrays is not None
                else 0.0
            ),
        }
        return arrays, metrics

    def round_diagnostics(self) -> dict[str, Any]:
        """Per-round columns beyond accuracy and loss."""
        return {**self.last_round, "eps_spent": self.reports.eps_spent()}

    def own_models(self) -> dict[int, list[np.ndarray]]:
        """Each node's latest upload, by partition id (empty unless `keep_uploads`)."""
        return dict(self.uploads)

    def run_summary(self) -> dict[str, Any]:
        """Strategy facts for `summary.json` (a global average has no topology)."""
        return {"aggregation": "example-weighted mean of all sampled nodes"}
