"""Gossip learning emulated in Flower: the server only relays neighbour averages.

No global model exists. Every node keeps its own model (indexed by partition id, the graph
vertex); each round every node trains its own model, then neighbour pairs chosen on the
topology replace their models by their plain mean. The server plays the network: it holds
the models between rounds only because Flower's nodes cannot talk to each other directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from typing import Any

import networkx as nx
import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flower_app.config import ConfigError
from flower_app.gossip import (
    apply_metropolis,
    apply_pairs,
    consensus_distance,
    gossip_matrix,
    mean_model,
    metropolis_weights,
    random_edges,
    random_matching,
    schedule_rng,
)
from flower_app.gossip_schedule import ScheduleLog
from flower_app.topology import graph_facts
from flower_app.wire import (
    ARRAYS,
    CANARY_INCREMENTS,
    CONFIG,
    METRICS,
    NUM_PARTITIONS,
    PARTITION_ID,
    SERVER_ROUND,
    TRAIN_LOSS,
)
from strategies.base import CentralEvaluationMixin, NodeReports, PrivacyBounds

# Evaluates one model given as the list of its arrays: returns (loss, accuracy).
ArraysEvaluator = Callable[[list[np.ndarray]], tuple[float, float]]


def mean_loss(replies: list[Message]) -> float | None:
    """Mean training loss of the replies that carry one (only non-private nodes do)."""
    losses = [
        float(r.content[METRICS][TRAIN_LOSS]) for r in replies if TRAIN_LOSS in r.content[METRICS]
    ]
    return float(np.mean(losses)) if losses else None


class Layout:
    """How to flatten a model's arrays into one float64 vector and back."""

    def __init__(self, record: ArrayRecord) -> None:
        """Remember names, shapes and dtypes of the template model."""
        self.keys = list(record.keys())
        arrays = record.to_numpy_ndarrays()
        self.shapes = [a.shape for a in arrays]
        self.dtypes = [a.dtype for a in arrays]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.nbytes = int(sum(a.nbytes for a in arrays))

    def flatten(self, record: ArrayRecord) -> np.ndarray:
        """One float64 vector (averaging in float64 keeps repeated means exact enough)."""
        return np.concatenate(
            [np.asarray(a, dtype=np.float64).ravel() for a in record.to_numpy_ndarrays()]
        )

    def unflatten(self, vector: np.ndarray) -> list[np.ndarray]:
        """The model's arrays again, in their original shapes and dtypes."""
        parts = np.split(vector, np.cumsum(self.sizes)[:-1])
        return [
            p.reshape(s).astype(d) for p, s, d in zip(parts, self.shapes, self.dtypes, strict=True)
        ]

    def to_record(self, vector: np.ndarray) -> ArrayRecord:
        """An ArrayRecord with the model's own array names (a state_dict's keys)."""
        arrays = self.unflatten(vector)
        return ArrayRecord({k: Array(a) for k, a in zip(self.keys, arrays, strict=True)})


class Gossip(CentralEvaluationMixin, Strategy):
    """Decentralised learning on a graph: train locally, then average with neighbours.

    Modes: `matching` (a random maximal matching, pairs average at once), `edges` (k random
    edges averaged one after another, Boyd et al.), `metropolis` (every node takes the
    Metropolis-Hastings weighted mean of its neighbourhood, D-PSGD style). A round runs
    `steps_per_round` such gossip steps, each with a fresh draw, after training. Averages are
    plain (unweighted), so the network mean is conserved. Nodes that did not answer keep
    their last model and skip pairing.
    """

    def __init__(
        self,
        graph: nx.Graph,
        *,
        mode: str = "matching",
        edges_per_round: int = 10,
        steps_per_round: int = 1,
        seed: int = 0,
        min_available_nodes: int = 2,
        evaluate_arrays: ArraysEvaluator | None = None,
        bounds: PrivacyBounds | None = None,
        bindings: Mapping[int, int] | None = None,
    ) -> None:
        """Store the knobs; models appear once the first round's replies arrive.

        `bindings`: vertex (partition id) -> the node id that alone may report it.
        """
        self.graph = graph
        self.mode = mode
        self.edges_per_round = edges_per_round
        self.steps_per_round = steps_per_round
        self.rng = schedule_rng(seed)
        self.min_available_nodes = min_available_nodes
        self.evaluate_arrays = evaluate_arrays
        self.models: dict[int, np.ndarray] = {}
        self.layout: Layout | None = None
        self.initial: ArrayRecord | None = None
        # Binds each vertex (partition id) unbound by `bindings` to the first Flower node
        # that reports it.
        self.reports = NodeReports(
            bounds or PrivacyBounds(), quorum=min_available_nodes, bindings=bindings
        )
        self.last_round: dict[str, Any] = {}
        # Who trained and every step applied, for the network accountant (network_dp).
        self.schedule_log = ScheduleLog(graph.number_of_nodes())
        # A white-box audit: per logged round, each trained vertex's canary increments.
        self.canary_increments: list[dict[int, np.ndarray]] = []

    def summary(self) -> None:
        """Log the topology and the gossip mode."""
        facts = self.topology_facts()
        log(
            INFO,
            "\t├──> Topology %s: %d nodes, %d edges, diameter %d, spectral gap %.4f (%s, %d "
            "gossip step(s) per round)",
            self.graph.graph.get("name", "graph"),
            facts["nodes"],
            facts["edges"],
            facts["diameter"],
            facts["spectral_gap"],
            self.mode,
            self.steps_per_round,
        )

    def topology_facts(self) -> dict[str, Any]:
        """Size, diameter and spectral gap of the gossip matrix this mode actually uses."""
        w = gossip_matrix(self.graph, self.mode, edges_per_round=self.edges_per_round)
        return {
            "name": self.graph.graph.get("name", "graph"),
            "mode": self.mode,
            **({"edges_per_round": self.edges_per_round} if self.mode == "edges" else {}),
            "steps_per_round": self.steps_per_round,
            **graph_facts(self.graph, w),
        }

    def _record_for(self, node_id: int) -> ArrayRecord:
        vertex = self.reports.partition_of.get(node_id)
        if vertex is None or vertex not in self.models or self.layout is None:
            # Not heard from yet: its own model is still the common initial one.
            assert self.initial is not None
            return self.initial
        return self.layout.to_record(self.models[vertex])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send every node ITS OWN model (never an average over all nodes)."""
        if self.initial is None:
            self.initial = arrays  # round 1: `arrays` is the common initial model
        # Every node that is connected now trains; absent ones keep their model.
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        node_ids = list(grid.get_node_ids())
        self.reports.asked(node_ids)
        config[SERVER_ROUND] = server_round
        return [
            Message(
                content=RecordDict({ARRAYS: self._record_for(n), CONFIG: config}),
                message_type=MessageType.TRAIN,
                dst_node_id=n,
            )
            for n in node_ids
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Store each answering node's trained model, then let neighbours average.

        Returns the mean of all node models only as a diagnostic for central evaluation;
        no node ever receives it.
        """
        replies = list(replies)
        ok = self.reports.remember(server_round, replies)
        trained: dict[int, np.ndarray] = {}
        for r in ok:
            vertex = self._vertex_of(server_round, r)
            record = r.content[ARRAYS]
            self.layout = self.layout or Layout(record)
            trained[vertex] = self.layout.flatten(record)
        if self.layout is None:
            self.last_round = {"nodes_trained": 0, "nodes_failed": self.reports.nodes_failed}
            return None, None
        if not self.models:  # vertices never heard from hold the initial model
            start = self.layout.flatten(self.initial)
            self.models = {v: start for v in self.graph.nodes}
        self.models.update(trained)
        self.schedule_log.start_round(trained)
        self.keep_canary_increments(server_round, ok, set(trained))
        messages_sent = sum(self._gossip(set(trained)) for _ in range(self.steps_per_round))
        self.last_round = {
            "nodes_trained": len(trained),
            "nodes_failed": self.reports.nodes_failed,
            "train_loss": mean_loss(ok),
            "consensus_distance": consensus_distance(self.models),
            "bytes_sent_per_node": messages_sent * self.layout.nbytes / len(self.models),
        }
        mean = self.layout.to_record(mean_model(self.models))
        loss = self.last_round["train_loss"]
        return mean, MetricRecord({} if loss is None else {TRAIN_LOSS: loss})

    def keep_canary_increments(
        self, server_round: int, replies: list[Message], active: set[int]
    ) -> None:
        """A white-box audit: what each vertex of `active` released along every canary."""
        got = {}
        for r in replies:
            if CANARY_INCREMENTS in r.content and (v := self._vertex_of(server_round, r)) in active:
                got[v] = r.content[CANARY_INCREMENTS][CANARY_INCREMENTS].numpy()
        self.canary_increments.append(got)

    def _vertex_of(self, server_round: int, reply: Message) -> int:
        """The reply's graph vertex: its partition id, of as many partitions as graph nodes.

        A node whose num-partitions is not the node count the graph was built for would leave
        vertices unheard from forever, or share one with another node: the run stops.
        """
        m, n = reply.content[METRICS], self.graph.number_of_nodes()
        vertex = int(m[PARTITION_ID])
        # A node that does not report num-partitions has at least partition-id + 1.
        count = int(m[NUM_PARTITIONS]) if NUM_PARTITIONS in m else vertex + 1
        if vertex not in self.graph or (NUM_PARTITIONS in m and count != n):
            raise ConfigError(
                f"round {server_round}: node {reply.metadata.src_node_id} has partition-id="
                f"{vertex} of num-partitions={count}{'' if NUM_PARTITIONS in m else ' or more'}"
                f", but gossip runs on the {n} nodes connected at the start; give every node "
                f"num-partitions={n} (or set num-nodes to the partition count to wait for all)"
            )
        return vertex

    def _gossip(self, active: set[int]) -> int:
        """Average along the chosen edges among `active` vertices; returns models sent."""
        if self.mode == "metropolis":
            w = metropolis_weights(self.graph, active)
            mixed = apply_metropolis({v: self.models[v] for v in active}, w)
            self.models.update(mixed)
            self.schedule_log.metropolis(w)
            return sum(1 for (i, j) in w if i != j)
        if self.mode == "matching":
            pairs = random_matching(self.graph, self.rng, active)
            self.models = apply_pairs(self.models, pairs, sequential=False)
            self.schedule_log.pairs(pairs)
        else:
            pairs = random_edges(self.graph, self.edges_per_round, self.rng, active)
            self.models = apply_pairs(self.models, pairs, sequential=True)
            self.schedule_log.edges(pairs)
        return 2 * len(pairs)

    def round_diagnostics(self) -> dict[str, Any]:
        """Per-round columns: each node's own accuracy on the node test set, consensus, bytes."""
        out = {**self.last_round, "eps_spent": self.reports.eps_spent()}
        if self.evaluate_arrays is not None and self.models and self.layout is not None:
            accs = [self.evaluate_arrays(self.layout.unflatten(m))[1] for m in self.models.values()]
            out |= {
                "node_acc_mean": float(np.mean(accs)),
                "node_acc_min": float(np.min(accs)),
                "node_acc_max": float(np.max(accs)),
            }
        return out

    def own_models(self) -> dict[int, list[np.ndarray]]:
        """The model each vertex holds now, by partition id."""
        if self.layout is None:
            return {}
        return {v: self.layout.unflatten(m) for v, m in self.models.items()}

    def run_summary(self) -> dict[str, Any]:
        """Topology facts for `summary.json`."""
        return {
            "aggregation": f"gossip ({self.mode}), plain pairwise means",
            "topology": self.topology_facts(),
        }
