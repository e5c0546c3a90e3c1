"""The run's privacy audit: score every canary from each observer's view, write audit.json.

The ServerApp already holds what each observer sees: FedAvg's server receives every node's
upload and sends the global model every node then holds; gossip's relay holds every node's
own model. Observers (`distance`: 0 the owner itself, d >= 1 a gossip node d hops away, None a
model every node holds or the network's average):

- FedAvg: `owner` (the owner's latest upload as the server saw it), `global`.
- Gossip: `owner` (its own model), `distance-d` for d = 1 .. diameter (for each canary one
  node at exactly d hops from its owner, drawn from `audit-seed`, so guesses stay
  independent), `average` (the mean of all node models, which no node holds).
- Gossip under `gossip-relay=sealed`: the server holds no model, so each node scores the
  canaries it observes on its own model and sends the scores (`sealed_audit_scores`); the
  same `owner` and `distance-d` views, and no `average`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np
import torch
from flwr.app import ArrayRecord

from flower_app.audit import (
    CONFIDENCE,
    Canaries,
    audit_scores,
    joint_confidence,
    make_canaries,
)
from flower_app.canary_scores import canary_scores as model_canary_scores
from flower_app.config import RunConfig
from flower_app.results import write_json
from flower_app.shards import canary_set

AUDIT = "audit.json"
_OBSERVER_STREAM = 0xD157


def canary_scores(
    cfg: RunConfig, arrays: Sequence[np.ndarray], images: torch.Tensor, labels: torch.Tensor
) -> np.ndarray:
    """Minus each canary's cross-entropy at its label under the model: high = "in"."""
    return model_canary_scores(cfg.model, arrays, images, labels)


def observer_assignments(
    owners: np.ndarray, graph: nx.Graph | None, audit_seed: int
) -> list[tuple[str, int | None, np.ndarray]]:
    """(observer, distance, the node scoring each canary or -1 to leave it out) per view.

    The last view (the shared model) is marked by node -2 for every canary.
    """
    views: list[tuple[str, int | None, np.ndarray]] = [("owner", 0, owners.copy())]
    if graph is not None:
        rng = np.random.default_rng([audit_seed, _OBSERVER_STREAM])
        rings = {
            v: _by_distance(nx.single_source_shortest_path_length(graph, v))
            for v in np.unique(owners)
        }
        diameter = max((max(r) for r in rings.values() if r), default=0)
        for d in range(1, diameter + 1):
            chosen = np.full(len(owners), -1)
            for i, owner in enumerate(owners):
                candidates = rings[owner].get(d)
                if candidates:
                    chosen[i] = candidates[int(rng.integers(len(candidates)))]
            views.append((f"distance-{d}", d, chosen))
    views.append(("average" if graph is not None else "global", None, np.full(len(owners), -2)))
    return views


def audit_requests(
    owners: np.ndarray, graph: nx.Graph | None, audit_seed: int
) -> dict[int, np.ndarray]:
    """Under a sealed relay: which canaries each node scores on its own model, by node.

    Exactly the canaries `observer_assignments` gives it in any view (owner, distance-d);
    the shared view has no observer (no one holds the average model).
    """
    wanted: dict[int, set[int]] = {}
    for _, _, scorer in observer_assignments(owners, graph, audit_seed):
        for i, node in enumerate(scorer):
            if node >= 0:
                wanted.setdefault(int(node), set()).add(i)
    return {node: np.array(sorted(idx), dtype=np.int64) for node, idx in wanted.items()}


def sealed_audit_scores(cfg: RunConfig, strategy: Any, num_nodes: int) -> dict[int, np.ndarray]:
    """Under a sealed relay the nodes are the observers: ask each for its canaries' scores."""
    owners = make_canaries(num_nodes, cfg.audit_canaries, cfg.audit_seed).owner
    requests = audit_requests(owners, strategy.graph, cfg.audit_seed)
    return strategy.canary_scores(requests, len(owners))


def _by_distance(lengths: Mapping[Any, int]) -> dict[int, list[int]]:
    rings: dict[int, list[int]] = {}
    for node, d in sorted(lengths.items()):
        if d > 0:
            rings.setdefault(d, []).append(int(node))
    return rings


def run_audit(
    cfg: RunConfig,
    *,
    num_nodes: int,
    own_models: Mapping[int, Sequence[np.ndarray]],
    shared: ArrayRecord | None,
    graph: nx.Graph | None,
    node_eps: Mapping[int, float],
    scores_by_node: Mapping[int, np.ndarray] | None = None,
) -> dict[str, Any]:
    """audit.json's content: one entry per observer with the bound beside the accountant's ε.

    `scores_by_node` (gossip-relay=sealed): each node's scores of the canaries it observes,
    computed by the node on its own model (`audit_requests`); the server scores nothing.
    """
    canaries, data = canary_set(cfg, num_nodes)
    images, labels = data.tensors
    shared_arrays = shared.to_numpy_ndarrays() if shared is not None else None

    def score(node: int, idx: np.ndarray) -> np.ndarray | None:
        if scores_by_node is not None:  # sealed: no one holds the shared (average) model
            return scores_by_node[node][idx] if node in scores_by_node else None
        arrays = shared_arrays if node == -2 else own_models.get(node)
        # A node that never trained holds nothing to score with.
        return None if arrays is None else canary_scores(cfg, arrays, images[idx], labels[idx])

    observers = []
    views = observer_assignments(canaries.owner, graph, cfg.audit_seed)
    joint = joint_confidence(len(views))
    for name, distance, scorer in views:
        scores = np.full(len(labels), np.nan)
        for node in np.unique(scorer):
            idx = np.flatnonzero(scorer == node)
            if node != -1 and (got := score(int(node), idx)) is not None:
                scores[idx] = got
        if (entry := _observer(cfg, name, distance, scores, canaries, node_eps, joint)) is not None:
            observers.append(entry)
    return {
        "audit": True,
        "method": "Steinke, Nasr & Jagielski 2023, one run, Theorem 3.1 with delta",
        "strategy": cfg.strategy,
        "eps_target": cfg.eps,
        "delta": cfg.delta,
        "confidence": CONFIDENCE,
        # eps_lower: this observer's bound at CONFIDENCE; eps_lower_joint: at joint_confidence,
        # so that every observer's bound holds at once at CONFIDENCE (Bonferroni).
        "joint_confidence": joint,
        "canaries_per_node": cfg.audit_canaries,
        "audit_seed": cfg.audit_seed,
        "canary": "an image of random sparse pixels with a random label",
        "score": "minus the cross-entropy at the canary's label",
        "observers": observers,
    }


def _observer(
    cfg: RunConfig,
    name: str,
    distance: int | None,
    scores: np.ndarray,
    canaries: Canaries,
    node_eps: Mapping[int, float],
    joint: float,
) -> dict[str, Any] | None:
    """One observer's audit.json entry from its scores (NaN: not scored); None if none."""
    keep = np.flatnonzero(~np.isnan(scores))
    if len(keep) == 0:
        return None
    owners = sorted({int(o) for o in canaries.owner[keep]})
    eps_accountant = max(node_eps.get(o, 0.0) for o in owners) if cfg.private else math.inf
    result = audit_scores(scores[keep], canaries.included[keep], cfg.delta)
    together = audit_scores(scores[keep], canaries.included[keep], cfg.delta, joint)
    return {
        "observer": name,
        "distance": distance,
        "guesses": result["guesses"],
        "correct": result["correct"],
        "eps_lower": result["eps_lower"],
        "eps_lower_joint": together["eps_lower"],
        "eps_accountant": eps_accountant,
        "canaries": result["canaries"],
        "included": result["included"],
        "k_plus": result["k_plus"],
        "k_minus": result["k_minus"],
        "mean_score_in": float(np.mean(scores[keep][canaries.included[keep]])),
        "mean_score_out": float(np.mean(scores[keep][~canaries.included[keep]])),
    }


def write_audit(folder: Any, audit: Mapping[str, Any]) -> None:
    """audit.json beside summary.json, atomically."""
    write_json(folder / AUDIT, dict(audit))


def headline_bound(audit: Mapping[str, Any]) -> float:
    """The largest ε lower bound that holds at CONFIDENCE for all observers together.

    The max of the per-observer 95% bounds is not one: with 12 observers and no leak at all
    it is above 0 far more often than 5% of the time. The max of the Bonferroni-corrected
    `eps_lower_joint` is.
    """
    return max((o["eps_lower_joint"] for o in audit["observers"]), default=0.0)
