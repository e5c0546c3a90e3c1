"""What both strategies share: node reports, central evaluation, the ServerApp's hooks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from logging import WARNING
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from flower_app.wire import (
    EPS,
    EPS_STRICT,
    LIFETIME_EPS,
    METRICS,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    PARTITION_ID,
    PLANNED_STEPS,
    REASON,
    REFUSAL,
    ROUND_STEPS,
    SAMPLE_RATE,
    STEPS,
)

# What each node reports in `summary.json`'s privacy section, when it reported it.
PRIVACY_KEYS = (
    EPS,
    EPS_STRICT,
    LIFETIME_EPS,
    NOISE_MULTIPLIER,
    SAMPLE_RATE,
    STEPS,
    PLANNED_STEPS,
    NUM_EXAMPLES,
)


class Diagnostics(Protocol):
    """What the ServerApp reads from a strategy for `rounds.csv` and `summary.json`."""

    # Each node's reports and ε (`summary.json`'s privacy section, the audit's bounds).
    reports: NodeReports

    def round_diagnostics(self) -> dict[str, Any]:
        """Per-round columns beyond accuracy and loss (`eps_spent` among them)."""
        ...

    def run_summary(self) -> dict[str, Any]:
        """Strategy facts for `summary.json` (`aggregation`, maybe `topology`)."""
        ...

    def own_models(self) -> dict[int, list[np.ndarray]]:
        """The model the server saw or holds for each node, by partition id (for audits)."""
        ...


class RunStrategy(Diagnostics, Protocol):
    """A Flower strategy the ServerApp can run and report on (Flower 1.42's `start`)."""

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run the rounds (`flwr.serverapp.strategy.Strategy.start`)."""
        ...


def reply_order(reply: Message) -> tuple[int, int]:
    """Replies by partition id (error replies, which carry none, last by sender)."""
    if reply.has_error() or METRICS not in reply.content:
        return (1, reply.metadata.src_node_id)
    return (0, int(reply.content[METRICS][PARTITION_ID]))


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


def _stop_on_refusal(server_round: int, replies: list[Message]) -> None:
    """A refusal by any node (its policy, its data) stops the run with every node's reason."""
    refusals = [r for r in replies if not r.has_error() and REFUSAL in r.content]
    if not refusals:
        return
    reasons = "; ".join(
        f"partition-id={r.content[REFUSAL][PARTITION_ID]}: {r.content[REFUSAL][REASON]}"
        for r in sorted(refusals, key=lambda r: int(r.content[REFUSAL][PARTITION_ID]))
    )
    raise NodeRefused(f"round {server_round}: refused by its node(s): {reasons}")


def _log_error_replies(server_round: int, replies: list[Message]) -> None:
    for r in replies:
        if r.has_error():
            log(
                WARNING,
                "round %d: error reply from %s: %s",
                server_round,
                r.metadata.src_node_id,
                r.error.reason,
            )


class NodeReports:
    """Each node's latest training metrics by partition id, and who holds which partition.

    One per run, built by the strategy that owns it (as flwr's DP wrappers hold the strategy
    they wrap). A partition id (the node's shard, and its gossip vertex) is bound to the node
    id the run's `partition-nodes` names (`bindings`), else to the first Flower node that
    reports it; a reply from any other node claiming it is refused, so no node can overwrite
    another's privacy report or receive its gossip model.
    """

    def __init__(
        self, bounds: PrivacyBounds, *, quorum: int, bindings: Mapping[int, int] | None = None
    ) -> None:
        """No reports yet; `bindings` (partition id -> node id) bound before any reply.

        `quorum`: the fewest answers a round may have (`min-available-nodes`).
        """
        self.bounds = bounds
        self.quorum = quorum
        self.metrics: dict[int, dict[str, Any]] = {}  # partition id -> its latest metrics
        self.node_of: dict[int, int] = dict(bindings or {})  # partition id -> Flower node id
        self.partition_of = {node: pid for pid, node in self.node_of.items()}  # node -> pid
        # Rounds a node was asked to train since its last report (its reply was lost):
        # it may have spent them, so its ε is bounded as if it had.
        self.lost_rounds: dict[int, int] = {}
        self.lost_unknown: set[int] = set()  # node ids lost before they ever reported
        # Nodes this round's train messages went to (`asked`): a node that never replied
        # within round-timeout has no reply at all, not an error reply.
        self.sent_to: frozenset[int] = frozenset()
        self.nodes_failed = 0

    def asked(self, node_ids: Iterable[int]) -> None:
        """Remember whom this round's train messages went to (from `configure_train`)."""
        self.sent_to = frozenset(node_ids)

    def _claim(self, server_round: int, reply: Message) -> bool:
        node, pid = reply.metadata.src_node_id, int(reply.content[METRICS][PARTITION_ID])
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

        A refusal by any node (its policy, its data) stops the run with that node's reason. A
        node that failed or timed out is left out of the round (and logged, and counted in
        `nodes_failed`); the run stops only when fewer than `quorum` answered.
        """
        _stop_on_refusal(server_round, replies)
        _log_error_replies(server_round, replies)
        ok = [r for r in replies if not r.has_error() and self._claim(server_round, r)]
        self._mark_lost(server_round, replies, ok)
        self._check_quorum(server_round, ok)
        for r in ok:
            m = r.content[METRICS]
            pid = int(m[PARTITION_ID])
            self.metrics[pid] = dict(m)
            self.lost_rounds.pop(pid, None)
            self.lost_unknown.discard(r.metadata.src_node_id)
        return ok

    def _mark_lost(self, server_round: int, replies: list[Message], ok: list[Message]) -> None:
        """Log and count the nodes asked to train that gave no usable reply."""
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

    def _check_quorum(self, server_round: int, ok: list[Message]) -> None:
        """Stop the run when fewer than `quorum` (`min-available-nodes`) answered."""
        if len(ok) < self.quorum:
            raise QuorumError(
                f"round {server_round}: only {len(ok)} node(s) answered, fewer than "
                f"min-available-nodes={self.quorum}"
            )

    def node_eps(self, pid: int, *, strict: bool = False) -> float:
        """The node's cumulative ε as it reported it, or its bound if replies were lost since.

        `strict`: against the server (update mode: replacing the node's data, 2C).
        """
        m = self.metrics[pid]
        key = EPS_STRICT if strict else EPS
        lost = self.lost_rounds.get(pid, 0)
        if key not in m or not lost:
            return float(m.get(key, 0.0))
        # Opacus's accountant, imported only when a reply was lost: importing strategies
        # loads neither torch nor Opacus.
        from flower_app.privacy import epsilon

        sigma = float(m[NOISE_MULTIPLIER])
        if strict and self.bounds.dp_mode == "update":
            sigma /= 2
        return epsilon(
            noise_multiplier=sigma,
            sample_rate=float(m[SAMPLE_RATE]),
            steps=min(int(m[STEPS]) + lost * int(m[ROUND_STEPS]), int(m[PLANNED_STEPS])),
            delta=self.bounds.delta,
            accountant=self.bounds.accountant,
        )

    def eps_spent(self, *, strict: bool = False) -> float:
        """Largest cumulative ε over all nodes asked to train so far (0 without DP).

        Counts every node that may have trained, including one whose reply was lost.
        """
        spent = [self.node_eps(pid, strict=strict) for pid in self.metrics]
        if self.lost_unknown:
            spent.append(math.inf if strict else self.bounds.run_bound)
        return max(spent, default=0.0)

    def privacy_by_node(self) -> dict[str, dict[str, Any]]:
        """Each node's privacy parameters as it last reported them, for `summary.json`."""
        out: dict[str, dict[str, Any]] = {}
        for pid, m in sorted(self.metrics.items()):
            out[str(pid)] = {k: m[k] for k in PRIVACY_KEYS if k in m}
            if lost := self.lost_rounds.get(pid, 0):
                out[str(pid)] |= {"lost-rounds": lost, "eps-bound": self.node_eps(pid)}
        return out


class CentralEvaluationMixin:
    """No federated evaluation round: the ServerApp evaluates models on its test set.

    It holds no state: it only fills in Flower's two evaluation hooks.
    """

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
