"""Strategies, by run-config name."""

from __future__ import annotations

from collections.abc import Callable

from flower_app.config import RunConfig, claims_per_round
from flower_app.network_calibration import node_network_plan
from flower_app.preflight import check_privacy_plan, gossip_graph
from strategies.base import PrivacyBounds, RunStrategy
from strategies.fedavg import CentralFedAvg
from strategies.gossip import ArraysEvaluator, Gossip
from strategies.sealed_relay import SealedGossip


def privacy_bounds(cfg: RunConfig, num_nodes: int = 0) -> PrivacyBounds:
    """The most one node can spend in this run: its calibrated plan (every node's ε <= it).

    A dp-mode=update plan needs nothing from the nodes, so it is calibrated here first: an
    eps no noise meets stops the run before training (`ConfigError`), not in every node.
    With privacy-unit=network a node's own (local) ε exceeds `eps`: the bound is that ε.
    """
    # The ε maths is Opacus's: imported when a run starts, so that importing strategies
    # loads neither torch nor Opacus.
    from flower_app.privacy import epsilon, gaussian_sigma

    check_privacy_plan(cfg, num_nodes)
    if not cfg.private:
        bound = 0.0
    elif network := node_network_plan(cfg, num_nodes):
        bound = epsilon(
            noise_multiplier=network.noise_multiplier,
            sample_rate=1.0,
            steps=cfg.num_server_rounds,
            delta=cfg.delta,
            accountant=cfg.accountant,
        )
    elif claims_per_round(cfg):
        bound = epsilon(
            noise_multiplier=gaussian_sigma(cfg.eps, cfg.delta),
            sample_rate=1.0,
            steps=cfg.num_server_rounds,
            delta=cfg.delta,
            accountant=cfg.accountant,
        )
    else:
        bound = cfg.eps
    return PrivacyBounds(
        delta=cfg.delta, accountant=cfg.accountant, run_bound=bound, dp_mode=cfg.dp_mode
    )


def _fedavg(cfg: RunConfig, num_nodes: int, evaluate_arrays: ArraysEvaluator) -> RunStrategy:
    return CentralFedAvg(
        num_nodes=num_nodes,
        fraction_train=cfg.fraction_train,
        min_available_nodes=cfg.min_available_nodes,
        seed=cfg.seed,
        bounds=privacy_bounds(cfg),
        bindings=cfg.bindings,
        keep_uploads=cfg.audited,
    )


def _gossip(cfg: RunConfig, num_nodes: int, evaluate_arrays: ArraysEvaluator) -> RunStrategy:
    graph = gossip_graph(cfg, num_nodes)
    relay = {"timeout": cfg.round_timeout} if cfg.sealed_relay else {}
    return (SealedGossip if cfg.sealed_relay else Gossip)(
        graph,
        **relay,
        mode=cfg.gossip_mode,
        edges_per_round=cfg.gossip_edges,
        steps_per_round=cfg.gossip_steps,
        seed=cfg.seed,
        min_available_nodes=cfg.min_available_nodes,
        evaluate_arrays=evaluate_arrays,
        bounds=privacy_bounds(cfg, num_nodes),
        bindings=cfg.bindings,
    )


# Builds the strategy from the run config, the node count and a per-node model evaluator;
# raises ConfigError when the combination cannot run.
STRATEGIES: dict[str, Callable[[RunConfig, int, ArraysEvaluator], RunStrategy]] = {
    "fedavg": _fedavg,
    "gossip": _gossip,
}
