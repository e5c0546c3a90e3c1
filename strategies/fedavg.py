"""FedAvg whose evaluation is central and which keeps each node's privacy spend."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flower_app.privacy import epsilon
from flower_app.records import METRICS, NUM_EXAMPLES, REFUSAL


def aggregate_train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Largest and mean ε among the repliers; the mean training loss only without DP.

    A private node never sends its (un-noised) training loss.
    """
    metrics = [r[METRICS] for r in replies]
    out: dict[str, float] = {}
    if losses := [m for m in metrics if "train-loss" in m]:
        total = sum(float(m[weight_key]) for m in losses)
        out["train-loss"] = (
            sum(float(m["train-loss"]) * float(m[weight_key]) for m in losses) / total
        )
    if eps := [float(m["eps"]) for m in metrics if "eps" in m]:
        out |= {"eps-max": max(eps), "eps-mean": sum(eps) / len(eps)}
    return MetricRecord(out)


def reply_order(reply: Message) -> tuple[int, int]:
    """Replies by partition id (error replies, which carry none, last by sender)."""
    if reply.has_error() or METRICS not in reply.content:
        return (1, reply.metadata.src_node_id)
    return (0, int(reply.content[METRICS]["partition-id"]))


class QuorumError(RuntimeError):
    """Too few nodes answered a round for the run to go on."""


class NodeRefused(RuntimeError):
    """A node's privacy policy refused the run: the message names the node and the limit."""


@dataclass(frozen=True)
class PrivacyBounds:
    """What the server needs to bound the ε of a node whose reply was lost."""

    delta: float = 1e-5
    accountant: str = "rdp"
    # The most any node can spend in this run (its plan), for a node never heard from.
    run_bound: float = 0.0
    dp_mode: str = "sample"


class NodeLedgerMixin:
    """Each node's latest training metrics by partition id, and who holds which partition.

    A partition id (the node's shard, and its gossip vertex) is bound to the first Flower
    node that reports it; a reply from any other node claiming it is refused, so no node
    can overwrite another's privacy report or receive its gossip model.
    """

    node_reports: dict[int, dict[str, Any]]
    min_available_nodes: int
    bounds: PrivacyBounds
    # Nodes this round's train messages went to (set by configure_train): a node that never
    # replied within round-timeout has no reply at all, not an error reply.
    sent_to: frozenset[int] = frozenset()
    nodes_failed: int = 0

    def init_ledger(self, bounds: PrivacyBounds) -> None:
        """Empty reports and bindings."""
        self.bounds = bounds
        self.node_reports = {}
        self.partition_of: dict[int, int] = {}  # Flower node id -> partition id
        self.node_of: dict[int, int] = {}  # partition id -> Flower node id
        # Rounds a node was asked to train since its last report (its reply was lost):
        # it may have spent them, so its ε is bounded as if it had.
        self.lost_rounds: dict[int, int] = {}
        self.lost_unknown: set[int] = set()  # node ids lost before they ever reported

    def _claim(self, server_round: int, reply: Message) -> bool:
        node, pid = reply.metadata.src_node_id, int(reply.content[METRICS]["partition-id"])
        owner = self.node_of.setdefault(pid, node)
        held = self.partition_of.setdefault(node, pid)
        if owner == node and held == pid:
            return True
        log(
            WARNING,
            "round %d: node %s claims partition-id=%d, which is bound to node %s (node %s "
            "holds partition-id=%d): reply refused",
            server_round,
            node,
            pid,
            owner,
            node,
            held,
        )
        return False

    def remember(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Store the metrics of replies without error; return those replies.

        A refusal by any node's policy stops the run with that node's reason. A node that
        failed or timed out is left out of the round (and logged, and counted in
        `nodes_failed`); the run stops only when fewer than `min_available_nodes` answered.
        """
        refusals = [r for r in replies if not r.has_error() and REFUSAL in r.content]
        if refusals:
            reasons = "; ".join(
                f"partition-id={r.content[REFUSAL]['partition-id']}: {r.content[REFUSAL]['reason']}"
                for r in sorted(refusals, key=lambda r: int(r.content[REFUSAL]["partition-id"]))
            )
            raise NodeRefused(f"round {server_round}: refused by the node's policy: {reasons}")
        for r in replies:
            if r.has_error():
                log(
                    WARNING,
                    "round %d: error reply from %s: %s",
                    server_round,
                    r.metadata.src_node_id,
                    r.error.reason,
                )
        ok = [r for r in replies if not r.has_error() and self._claim(server_round, r)]
        # Whom we asked minus who answered: a node that never replied sent nothing, and the
        # error the SuperLink writes for an offline node carries the SuperLink's id, not its.
        failed = sorted(self.sent_to - {r.metadata.src_node_id for r in ok})
        for node in failed:
            log(WARNING, "round %d: node %s left out", server_round, node)
            if (pid := self.partition_of.get(node)) is not None:
                self.lost_rounds[pid] = self.lost_rounds.get(pid, 0) + 1
            else:
                self.lost_unknown.add(node)
        self.nodes_failed = len(failed) if self.sent_to else len(replies) - len(ok)
        if len(ok) < self.min_available_nodes:
            raise QuorumError(
                f"round {server_round}: only {len(ok)} node(s) answered, fewer than "
                f"min-available-nodes={self.min_available_nodes}"
            )
        for r in ok:
            m = r.content[METRICS]
            pid = int(m["partition-id"])
            self.node_reports[pid] = dict(m)
            self.lost_rounds.pop(pid, None)
            self.lost_unknown.discard(r.metadata.src_node_id)
        return ok

    def node_eps(self, pid: int, *, strict: bool = False) -> float:
        """The node's cumulative ε as it reported it, or its bound if replies were lost since.

        `strict`: against the server (update mode: replacing the node's data, 2C).
        """
        m = self.node_reports[pid]
        key = "eps-strict" if strict else "eps"
        lost = self.lost_rounds.get(pid, 0)
        if key not in m or not lost:
            return float(m.get(key, 0.0))
        sigma = float(m["noise-multiplier"])
        if strict and self.bounds.dp_mode == "update":
            sigma /= 2
        return epsilon(
            noise_multiplier=sigma,
            sample_rate=float(m["sample-rate"]),
            steps=min(int(m["steps"]) + lost * int(m["round-steps"]), int(m["planned-steps"])),
            delta=self.bounds.delta,
            accountant=self.bounds.accountant,
        )

    def eps_spent(self, *, strict: bool = False) -> float:
        """Largest cumulative ε over all nodes asked to train so far (0 without DP).

        Counts every node that may have trained, including one whose reply was lost.
        """
        spent = [self.node_eps(pid, strict=strict) for pid in self.node_reports]
        if self.lost_unknown:
            spent.append(math.inf if strict else self.bounds.run_bound)
        return max(spent, default=0.0)

    def privacy_by_node(self) -> dict[str, dict[str, Any]]:
        """Each node's privacy parameters as it last reported them, for `summary.json`."""
        keys = (
            "eps",
            "eps-strict",
            "lifetime-eps",
            "noise-multiplier",
            "sample-rate",
            "steps",
            "planned-steps",
            NUM_EXAMPLES,
        )
        out: dict[str, dict[str, Any]] = {}
        for pid, m in sorted(self.node_reports.items()):
            out[str(pid)] = {k: m[k] for k in keys if k in m}
            if lost := self.lost_rounds.get(pid, 0):
                out[str(pid)] |= {"lost-rounds": lost, "eps-bound": self.node_eps(pid)}
        return out


class CentralEvaluationMixin:
    """No federated evaluation round: the ServerApp evaluates models on its test set."""

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send nothing (see the class docstring)."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate."""
        return None


def registration_order(grid: Grid) -> list[int]:
    """Node ids by registration time (ties by id).

    Flower hands out node ids as a set of random integers, so a seeded sample over them
    picked different nodes in every run. Simulated nodes register in partition order, so
    over this order the same seed samples the same partitions.
    """
    nodes = sorted(
        grid.get_nodes(), key=lambda n: (datetime.fromisoformat(n.registered_at), n.node_id)
    )
    return [n.node_id for n in nodes]


class CentralFedAvg(CentralEvaluationMixin, NodeLedgerMixin, FedAvg):
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
    ) -> None:
        """Store the knobs; weights come from each reply's `num-examples`."""
        super().__init__(
            fraction_train=fraction_train,
            min_train_nodes=min(min_available_nodes, num_nodes),
            min_available_nodes=min_available_nodes,
            weighted_by_key=NUM_EXAMPLES,
            train_metrics_aggr_fn=aggregate_train_metrics,
        )
        self.num_nodes = num_nodes
        self.seed = seed
        self.init_ledger(bounds or PrivacyBounds())
        self.last_round: dict[str, Any] = {}

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
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = list(self._construct_messages(record, node_ids, MessageType.TRAIN))
        self.sent_to = frozenset(m.metadata.dst_node_id for m in messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's weighted average, plus bookkeeping of who trained and what they spent."""
        # Flower sums the replies in arrival order, which varies from run to run; float sums
        # then differ in the last bits, and this chaotic training amplified that to runs of
        # one config ending 6 points apart. A fixed order makes a seed reproduce bit for bit.
        replies = sorted(replies, key=reply_order)
        ok = self.remember(server_round, replies)
        arrays, metrics = super().aggregate_train(server_round, ok)
        self.last_round = {
            "nodes_trained": len(ok),
            "nodes_failed": self.nodes_failed,
            # Only non-private nodes report a training loss.
            "train_loss": float(metrics["train-loss"])
            if metrics and "train-loss" in metrics
            else None,
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
        return {**self.last_round, "eps_spent": self.eps_spent()}

    def run_summary(self) -> dict[str, Any]:
        """Strategy facts for `summary.json` (a global average has no topology)."""
        return {"aggregation": "example-weighted mean of all sampled nodes"}
