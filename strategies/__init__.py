"""Strategies, by run-config name."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import Strategy

from flower_app.config import ConfigError, RunConfig
from flower_app.topology import TopologyError, build_topology
from strategies.fedavg import CentralFedAvg
from strategies.gossip import ArraysEvaluator, Gossip


def _fedavg(cfg: RunConfig, num_nodes: int, evaluate_arrays: ArraysEvaluator) -> Strategy:
    return CentralFedAvg(
        num_nodes=num_nodes,
        fraction_train=cfg.fraction_train,
        min_available_nodes=cfg.min_available_nodes,
        seed=cfg.seed,
    )


def _gossip(cfg: RunConfig, num_nodes: int, evaluate_arrays: ArraysEvaluator) -> Strategy:
    if num_nodes < 2:
        raise ConfigError(
            f"strategy=gossip needs at least 2 nodes; this federation has {num_nodes}"
        )
    try:
        graph = build_topology(
            cfg.topology, num_nodes, seed=cfg.seed, degree=cfg.degree, edge_prob=cfg.edge_prob
        )
    except TopologyError as err:
        raise ConfigError(str(err)) from None
    return Gossip(
        graph,
        mode=cfg.gossip_mode,
        edges_per_round=cfg.gossip_edges,
        seed=cfg.seed,
        min_available_nodes=cfg.min_available_nodes,
        evaluate_arrays=evaluate_arrays,
    )


# Builds the strategy from the run config, the node count and a per-node model evaluator;
# raises ConfigError when the combination cannot run.
STRATEGIES: dict[str, Callable[[RunConfig, int, ArraysEvaluator], Strategy]] = {
    "fedavg": _fedavg,
    "gossip": _gossip,
}
