"""The run's privacy audit: score every canary from each observer's view, write audit.json.

The ServerApp already holds what each observer sees: FedAvg's server receives every node's
upload and sends the global model every node then holds; gossip's relay holds every node's
own model. Observers (`distance`: 0 the owner itself, d >= 1 a gossip node d hops away, None a
model every node holds or the network's average):

- FedAvg: `owner` (the owner's latest upload as the server saw it), `global`.
- Gossip: `owner` (its own model), `distance-d` for d = 1 .. diameter (for each canary one
  node at exactly d hops from its owner, drawn from `audit-seed`, so guesses stay
  independent), `average` (the mean of all node models, which no node holds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np
import torch
from flwr.app import ArrayRecord

from flower_app.audit import CONFIDENCE, audit_scores, joint_confidence
from flower_app.config import RunConfig
from flower_app.model import build_model
from flower_app.results import write_json
from flower_app.shards import canary_set

AUDIT = "audit.json"
_OBSERVER_STREAM = 0xD157
BATCH = 1024


def canary_scores(
    cfg: RunConfig, arrays: Sequence[np.ndarray], images: torch.Tensor, labels: torch.Tensor
) -> np.ndarray:
    """Minus each canary's cross-entropy at its label under the model: high = "in"."""
    model = build_model(cfg.model)
    keys = list(model.state_dict())
    model.load_state_dict(
        {k: torch.tensor(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)}
    )
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(labels), BATCH):
            logits = model(images[start : start + BATCH])
            loss = torch.nn.functional.cross_entropy(
                logits, labels[start : start + BATCH], reduction="none"
            )
            out.append(-loss.double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


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
) -> dict[str, Any]:
    """audit.json's content: one entry per observer with the bound beside the accountant's ε."""
    canaries, data = canary_set(cfg, num_nodes)
    images, labels = data.tensors
    shared_arrays = shared.to_numpy_ndarrays() if shared is not None else None
    observers = []
    views = observer_assignments(canaries.owner, graph, cfg.audit_seed)
    joint = joint_confidence(len(views))
    for name, distance, scorer in views:
        scores = _view_scores(cfg, scorer, own_models, shared_arrays, images, labels)
        keep = np.flatnonzero(~np.isnan(scores))
        if len(keep) == 0:
            continue
        owners = sorted({int(o) for o in canaries.owner[keep]})
        eps_accountant = max(node_eps.get(o, 0.0) for o in owners) if cfg.private else math.inf
        observers.append(
            {
                "observer": name,
                "distance": distance,
                **_observer_result(
                    scores[keep], canaries.included[keep], cfg.delta, joint, eps_accountant
                ),
            }
        )
    return _audit_header(cfg, joint) | {"observers": observers}


def _view_scores(
    cfg: RunConfig,
    scorer: np.ndarray,
    own_models: Mapping[int, Sequence[np.ndarray]],
    shared: Sequence[np.ndarray] | None,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> np.ndarray:
    """Each canary's score under the model its scorer holds (NaN: no scorer, or no model).

    `scorer` is -1 for a canary no node scores, -2 for the shared model (`shared`), else the
    node whose own model scores it.
    """
    scores = np.full(len(labels), np.nan)
    for node in np.unique(scorer):
        if node == -1:
            continue
        arrays = shared if node == -2 else own_models.get(int(node))
        if arrays is None:
            continue  # a node that never trained holds nothing to score with
        idx = np.flatnonzero(scorer == node)
        scores[idx] = canary_scores(cfg, arrays, images[idx], labels[idx])
    return scores


def _observer_result(
    scores: np.ndarray, included: np.ndarray, delta: float, joint: float, eps_accountant: float
) -> dict[str, Any]:
    """An observer's result: the best guessing rule's bound beside the accountant's ε.

    The bound alone and at the joint confidence, the rule's counts, and the mean score of the
    canaries in and out.
    """
    result = audit_scores(scores, included, delta)
    together = audit_scores(scores, included, delta, joint)
    return {
        "guesses": result["guesses"],
        "correct": result["correct"],
        "eps_lower": result["eps_lower"],
        "eps_lower_joint": together["eps_lower"],
        "eps_accountant": eps_accountant,
        "canaries": result["canaries"],
        "included": result["included"],
        "k_plus": result["k_plus"],
        "k_minus": result["k_minus"],
        "mean_score_in": float(np.mean(scores[included])),
        "mean_score_out": float(np.mean(scores[~included])),
    }


def _audit_header(cfg: RunConfig, joint: float) -> dict[str, Any]:
    """What the audit was: the method, the run's claim and the canaries."""
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
