"""Gossip under `gossip-relay=sealed`: the server draws the schedule and routes ciphertexts.

The open relay (`strategies/gossip.py`) holds every node's model and averages them itself.
Here each node keeps its own model (`client_app/sealed.py`) and the server only routes:

- `train` (one round trip): every node trains ITS model (round 1: the public initial model,
  which is all the server ever sends) and replies its metrics and X25519 public key.
- the schedule is drawn exactly as the open relay draws it (same rng, same calls), as a
  list of exchanges: one per gossip step (`matching`, `metropolis`), or one per batch of
  consecutive disjoint edges (`edges`, so later edges see earlier results).
- `train.gossip`, one round trip per exchange: each node gets the blobs sealed for it in the
  previous exchange (with their senders, public keys and weights) and the partners of this
  one; it opens and mixes, then replies one blob per partner.
- `evaluate`, one round trip: the last exchange's blobs; each node mixes, then scores its
  own model on the public node test set and replies counts (correct, total).
- A node that does not answer a message is not sent another in that round (each wait costs
  a `round-timeout`); its partners find no model from it and keep their own share.
- After the last round of an audit run, `query.audit`: each node scores the canaries it
  observes on its own model (`canary_scores`).

The server never holds a model after the initial one, so consensus distance, the average
model and its central accuracy do not exist under this relay (`rounds.csv` leaves those
columns empty; `summary.json`'s topology says why).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flower_app.gossip import metropolis_weights, random_edges, random_matching
from flower_app.wire import (
    APPLY_BLOBS,
    APPLY_FROM,
    APPLY_KEYS,
    APPLY_SELF_WEIGHT,
    APPLY_STEP,
    APPLY_WEIGHTS,
    ARRAYS,
    BLOBS,
    CANARIES,
    CONFIG,
    CORRECT,
    METRICS,
    PUBLIC_KEY,
    REFUSED,
    SCORES,
    SEAL_KEYS,
    SEAL_STEP,
    SEAL_TO,
    SEALED,
    SERVER_ROUND,
    TOTAL,
)
from strategies.gossip import Gossip, mean_loss

GOSSIP_STEP = f"{MessageType.TRAIN}.gossip"  # a ClientApp action: client_app/app.py
AUDIT_QUERY = f"{MessageType.QUERY}.audit"
UNAVAILABLE = (
    "consensus_distance, the average model and its central accuracy: under "
    "gossip-relay=sealed the server holds no node model (use gossip-relay=open for them)"
)

# One exchange: receiving vertex -> (its own weight, [(sending vertex, weight), ...]) in the
# order the open relay sums them.
Exchange = dict[int, tuple[float, list[tuple[int, float]]]]


def pair_exchange(pairs: Iterable[tuple[int, int]]) -> Exchange:
    """Disjoint pairs, each replaced by its plain mean."""
    out: Exchange = {}
    for u, v in pairs:
        out[u] = (0.5, [(v, 0.5)])
        out[v] = (0.5, [(u, 0.5)])
    return out


def disjoint_batches(pairs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Consecutive runs of vertex-disjoint pairs, each one exchange.

    Applied one batch after another they compute exactly what the pairs applied one after
    another compute: within a batch no vertex waits for another pair's result.
    """
    batches: list[list[tuple[int, int]]] = []
    busy: set[int] = set()
    for u, v in pairs:
        if not batches or u in busy or v in busy:
            batches.append([])
            busy = set()
        batches[-1].append((u, v))
        busy |= {u, v}
    return batches


def metropolis_exchange(w: dict[tuple[int, int], float], active: set[int]) -> Exchange:
    """Every active vertex's Metropolis row, self first, in `apply_metropolis`'s order."""
    rows: dict[int, list[tuple[int, float]]] = {}
    for (i, j), x in w.items():
        rows.setdefault(i, []).append((j, x))
    out: Exchange = {}
    for i in sorted(active):
        (self_j, self_w), *others = rows[i]
        assert self_j == i, "Metropolis rows start with the vertex itself"
        out[i] = (self_w, others)
    return out


@dataclass
class _Pending:
    """Blobs sealed in one exchange, waiting to be delivered to their receiver."""

    step: int
    self_weight: float
    senders: list[tuple[int, float]]
    blobs: dict[int, bytes] = field(default_factory=dict)


class SealedGossip(Gossip):
    """Gossip whose server cannot read the models it relays (see the module docstring)."""

    def __init__(self, graph: Any, *, timeout: float = 3600.0, **kwargs: Any) -> None:
        """The open relay's knobs, plus the timeout of each extra round trip."""
        super().__init__(graph, **kwargs)
        self.timeout = timeout
        self.public_keys: dict[int, bytes] = {}  # vertex -> the node's public key
        self.holding: set[int] = set()  # node ids that hold a model of their own
        self.grid: Grid | None = None
        self.pending: dict[int, _Pending] = {}
        self.answering: set[int] = set()
        self.refused = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask every node to train its own model; only a node holding none gets the initial."""
        if self.initial is None:
            self.initial = arrays  # round 1: `arrays` is the common, public initial model
        self.grid = grid
        sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        node_ids = list(grid.get_node_ids())
        self.reports.asked(node_ids)
        config["server-round"] = server_round
        out = []
        for n in node_ids:
            content = RecordDict({CONFIG: config})
            if n not in self.holding:
                content[ARRAYS] = self.initial
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Learn who trained and their public keys, then route the round's exchanges."""
        ok = self.reports.remember(server_round, list(replies))
        active: set[int] = set()
        for r in ok:
            vertex = self._vertex_of(server_round, r)
            if SEALED not in r.content:  # it kept no model of its own to gossip with
                log(WARNING, "round %d: partition-id=%d sent no public key", server_round, vertex)
                continue
            self.public_keys[vertex] = bytes(r.content[SEALED][PUBLIC_KEY])
            self.holding.add(r.metadata.src_node_id)
            active.add(vertex)
        self.answering = set(active)  # vertices still answering this round
        self.schedule_log.start_round(active)
        self.keep_canary_increments(server_round, ok, active)
        exchanges = [ex for _ in range(self.steps_per_round) for ex in self._draw(active)]
        self.refused = 0
        sent = self._relay(server_round, exchanges)
        self.last_round = {
            "nodes_trained": len(active),
            "nodes_failed": self.reports.nodes_failed,
            "train_loss": mean_loss(ok),
            "consensus_distance": None,  # needs every model: gossip-relay=open only
            "bytes_sent_per_node": sent / self.graph.number_of_nodes(),
            "gossip_exchanges": len(exchanges),
        }
        loss = self.last_round["train_loss"]
        return None, MetricRecord({} if loss is None else {"train-loss": loss})

    def _draw(self, active: set[int]) -> list[Exchange]:
        """One gossip step's exchanges, drawn with the open relay's rng and calls."""
        if self.mode == "metropolis":
            w = metropolis_weights(self.graph, active)
            self.schedule_log.metropolis(w)
            return [metropolis_exchange(w, active)]
        if self.mode == "matching":
            pairs = random_matching(self.graph, self.rng, active)
            self.schedule_log.pairs(pairs)
            return [pair_exchange(pairs)]
        pairs = random_edges(self.graph, self.edges_per_round, self.rng, active)
        self.schedule_log.edges(pairs)  # the batches apply them in this order
        return [pair_exchange(batch) for batch in disjoint_batches(pairs)]

    def _relay(self, server_round: int, exchanges: list[Exchange]) -> int:
        """Run the exchanges, one round trip each; returns the ciphertext bytes routed."""
        self.pending, routed = {}, 0
        for step, exchange in enumerate(exchanges):
            targets = sorted((set(exchange) | set(self.pending)) & self.answering)
            msgs = [self._step_message(server_round, step, v, exchange) for v in targets]
            assert self.grid is not None, "configure_train keeps the round's grid"
            replies = self.grid.send_and_receive(msgs, timeout=self.timeout)
            self.pending = {
                v: _Pending(step, w_self, senders) for v, (w_self, senders) in exchange.items()
            }
            sent, answered = self._collect(server_round, replies, exchange)
            routed += sent
            # A node that did not answer is not waited for again this round: its partners
            # find no model from it and keep their own share.
            if missing := set(targets) - answered:
                self.schedule_log.broken(f"round {server_round}: {len(missing)} node(s) left out")
            self.answering -= missing
        return routed

    def _node_and_key(self, vertex: int) -> tuple[int, bytes]:
        return self.reports.node_of[vertex], self.public_keys[vertex]

    def _apply_fields(self, vertex: int) -> dict[str, Any]:
        """What `vertex` needs to open and mix the previous exchange's blobs for it."""
        p = self.pending.get(vertex)
        if p is None:
            return {}
        senders = [self._node_and_key(s) for s, _ in p.senders]
        return {
            APPLY_STEP: p.step,
            APPLY_SELF_WEIGHT: p.self_weight,
            APPLY_FROM: [n for n, _ in senders],
            APPLY_KEYS: [k for _, k in senders],
            APPLY_WEIGHTS: [w for _, w in p.senders],
            APPLY_BLOBS: [p.blobs.get(s, b"") for s, _ in p.senders],
        }

    def _step_message(
        self, server_round: int, step: int, vertex: int, exchange: Exchange
    ) -> Message:
        fields_: dict[str, Any] = {SERVER_ROUND: server_round, **self._apply_fields(vertex)}
        if vertex in exchange:
            partners = [self._node_and_key(s) for s, _ in exchange[vertex][1]]
            fields_ |= {
                SEAL_STEP: step,
                SEAL_TO: [n for n, _ in partners],
                SEAL_KEYS: [k for _, k in partners],
            }
        return Message(
            content=RecordDict({SEALED: ConfigRecord(fields_)}),
            message_type=GOSSIP_STEP,
            dst_node_id=self.reports.node_of[vertex],
        )

    def _collect(
        self, server_round: int, replies: Iterable[Message], exchange: Exchange
    ) -> tuple[int, set[int]]:
        """File each reply's blobs under their receivers; log refusals.

        Returns the bytes routed and the vertices that answered.
        """
        routed, answered = 0, set()
        for r in replies:
            vertex = self.reports.partition_of.get(r.metadata.src_node_id)
            if r.has_error() or vertex is None or SEALED not in r.content:
                log(
                    WARNING,
                    "round %d: no gossip reply from node %s",
                    server_round,
                    r.metadata.src_node_id,
                )
                continue
            rec = r.content[SEALED]
            answered.add(vertex)
            self._log_refused(server_round, r.metadata.src_node_id, rec)
            partners = [s for s, _ in exchange.get(vertex, (0.0, []))[1]]
            blobs = [bytes(b) for b in rec[BLOBS]] if BLOBS in rec else []
            if len(blobs) != len(partners):
                self.schedule_log.broken(f"round {server_round}: a node's blobs went undelivered")
                continue  # a node that sealed for the wrong partners: none delivered
            for receiver, blob in zip(partners, blobs, strict=True):
                self.pending[receiver].blobs[vertex] = blob
                routed += len(blob)
        return routed, answered

    def _log_refused(self, server_round: int, node: int, rec: ConfigRecord) -> None:
        for line in rec[REFUSED] if REFUSED in rec else []:
            self.refused += 1
            self.schedule_log.broken(f"round {server_round}: a node refused a delivery")
            log(WARNING, "round %d: node %s: %s", server_round, node, line)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Deliver the last exchange; every node that answered this round scores its model.

        Counts only. A node that did not answer is not waited for (it would cost a whole
        `round-timeout`): node accuracy is over the nodes that answered the round.
        """
        return [
            Message(
                content=RecordDict(
                    {SEALED: ConfigRecord({SERVER_ROUND: server_round, **self._apply_fields(v)})}
                ),
                message_type=MessageType.EVALUATE,
                dst_node_id=self.reports.node_of[v],
            )
            for v in sorted(self.answering)
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Node accuracy from each node's counts on its own model."""
        accs, replies = [], list(replies)
        if len(replies) < len(self.answering):  # some kept the last deliveries unapplied
            self.schedule_log.broken(f"round {server_round}: a node missed the last delivery")
        for r in replies:
            if r.has_error():
                self.schedule_log.broken(f"round {server_round}: a node missed the last delivery")
                log(
                    WARNING,
                    "round %d: no accuracy from node %s",
                    server_round,
                    r.metadata.src_node_id,
                )
                continue
            if SEALED in r.content:
                self._log_refused(server_round, r.metadata.src_node_id, r.content[SEALED])
            m = r.content[METRICS]
            if TOTAL in m and int(m[TOTAL]) > 0:
                accs.append(int(m[CORRECT]) / int(m[TOTAL]))
        self.pending = {}
        self.last_round["exchanges_refused"] = self.refused
        if not accs:
            return None
        self.last_round |= {
            "node_acc_mean": float(np.mean(accs)),
            "node_acc_min": float(np.min(accs)),
            "node_acc_max": float(np.max(accs)),
        }
        log(
            INFO,
            "round %d: node accuracy %.4f over %d nodes",
            server_round,
            np.mean(accs),
            len(accs),
        )
        return MetricRecord({"node-acc-mean": float(np.mean(accs))})

    def canary_scores(
        self, requests: Mapping[int, np.ndarray], total: int
    ) -> dict[int, np.ndarray]:
        """An audit: each node scores the canaries asked (by vertex) on its own model.

        One round trip after the last round; by vertex, `total` scores, NaN where not asked.
        """
        msgs = [
            Message(
                content=RecordDict({SEALED: ConfigRecord({CANARIES: [int(i) for i in idx]})}),
                message_type=AUDIT_QUERY,
                dst_node_id=self.reports.node_of[v],
            )
            for v, idx in requests.items()
            if v in self.reports.node_of
        ]
        assert self.grid is not None, "configure_train keeps the run's grid"
        out: dict[int, np.ndarray] = {}
        for r in self.grid.send_and_receive(msgs, timeout=self.timeout):
            v = self.reports.partition_of.get(r.metadata.src_node_id)
            got = [] if r.has_error() or v is None else list(r.content[SEALED][SCORES])
            if v is None or len(got) != len(requests[v]):
                log(WARNING, "audit: no canary scores from node %s", r.metadata.src_node_id)
                continue
            out[v] = np.full(total, np.nan)
            out[v][requests[v]] = got
        return out

    def round_diagnostics(self) -> dict[str, Any]:
        """The round's columns: node accuracy from the nodes' counts, no consensus."""
        return {**self.last_round, "eps_spent": self.reports.eps_spent()}

    def own_models(self) -> dict[int, list[np.ndarray]]:
        """None: the server holds no node model under a sealed relay."""
        return {}

    def topology_facts(self) -> dict[str, Any]:
        """The open relay's facts, plus the relay and what it makes unavailable."""
        return {**super().topology_facts(), "relay": "sealed", "unavailable": UNAVAILABLE}

    def run_summary(self) -> dict[str, Any]:
        """Topology facts and the relay for `summary.json`."""
        return {
            "aggregation": f"gossip ({self.mode}), plain pairwise means, sealed relay",
            "topology": self.topology_facts(),
        }
