"""A node's side of the sealed gossip relay: seal for partners, open and mix what arrives.

Under `gossip-relay=sealed` (issue 28) the server draws the gossip schedule as the open
relay does, but every model moves sealed for one partner (`flower_app/sealed.py`): the
server routes ciphertexts and never holds a model. Each gossip step is one or more
*exchanges* (`edges` mode: one per batch of disjoint edges, so later edges see earlier
results); in exchange k a node seals its current model for its partners, and at the next
message it opens what they sealed for it and takes the weighted mean
`w_self * own + sum_j w_j * x_j`, summed in the order the server lists, so a sealed round
computes bit for bit what the open relay computes (`strategies/gossip.py`).

A partner whose model is missing, or does not open (tampered, replayed, misrouted, sealed
under another key), is replaced by the node's own model in that mean: the node keeps its
share, as for a partner that never answered, and says so in one line.

Pure: no flwr (`client_app/sealed.py` moves these through Flower's records).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from flower_app.config import RunConfig
from flower_app.data import BatchTensorDataset, to_tensors
from flower_app.preflight import evaluation_arrays
from flower_app.sealed import NodeKeys, Route, SealError, open_sealed, seal

logger = logging.getLogger(__name__)

# Record names in the messages and replies of the sealed relay.
# The exchange to apply (deliveries of exchange `apply-step`) and the one to seal for.


@dataclass(frozen=True)
class Peer:
    """A gossip partner in one exchange: its node id, public key and weight in the mean."""

    node_id: int
    public_key: bytes
    weight: float = 0.5


@dataclass(frozen=True)
class Delivery:
    """What a node receives for one exchange: its self weight and each sender's blob."""

    step: int
    self_weight: float
    peers: Sequence[Peer]
    blobs: Sequence[bytes]


def as_float64(model: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The model as float64 arrays: what the relay mixes (the open relay mixes float64 too)."""
    return [np.asarray(a, dtype=np.float64) for a in model]


def compact(model: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each array as float32 where that is exact (a freshly trained model), else float64.

    Halves what a step after training sends without changing a single value.
    """
    out = []
    for a in model:
        f32 = a.astype(np.float32)
        out.append(f32 if np.array_equal(f32.astype(np.float64), a) else a)
    return out


def seal_for(
    model: Sequence[np.ndarray],
    keys: NodeKeys,
    peers: Sequence[Peer],
    *,
    run_id: int,
    server_round: int,
    step: int,
    node_id: int,
) -> list[bytes]:
    """One blob per peer: `model` sealed for it, bound to this run, round and exchange."""
    plain = compact(model)
    return [
        seal(plain, Route(run_id, server_round, step, node_id, p.node_id), keys, p.public_key)
        for p in peers
    ]


def apply_delivery(
    own: Sequence[np.ndarray],
    delivery: Delivery,
    keys: NodeKeys,
    *,
    run_id: int,
    server_round: int,
    node_id: int,
) -> tuple[list[np.ndarray], list[str]]:
    """The mixed model, and one line per partner that was left out (its share stays own)."""
    own = as_float64(own)
    terms: list[tuple[float, list[np.ndarray]]] = [(delivery.self_weight, own)]
    refused: list[str] = []
    seen: set[int] = set()
    for peer, blob in zip(delivery.peers, delivery.blobs, strict=True):
        route = Route(run_id, server_round, delivery.step, peer.node_id, node_id)
        model, why = _open_one(own, blob, route, keys, peer, seen)
        if why is not None:
            refused.append(why)
            logger.warning("%s", why)
        terms.append((peer.weight, own if model is None else model))
        seen.add(peer.node_id)
    return _weighted_sum(terms), refused


def _open_one(
    own: list[np.ndarray],
    blob: bytes,
    route: Route,
    keys: NodeKeys,
    peer: Peer,
    seen: set[int],
) -> tuple[list[np.ndarray] | None, str | None]:
    """The partner's model, or None and the one line saying why the node keeps its own."""
    where = route.describe()
    if peer.node_id in seen:
        return None, f"refused a second model {where}: at most one per sender and step"
    if not blob:
        return None, f"no model arrived {where}: keeping my own for that exchange"
    try:
        model = as_float64(open_sealed(blob, route, keys, peer.public_key))
    except SealError as err:
        return None, f"refused: {err}; keeping my own model for that exchange"
    if [a.shape for a in model] != [a.shape for a in own]:
        return None, f"refused the model {where}: its shapes are not my model's"
    return model, None


def _weighted_sum(terms: Sequence[tuple[float, list[np.ndarray]]]) -> list[np.ndarray]:
    """`sum_j w_j x_j` array by array, in the order given (the open relay's order)."""
    first_w, first = terms[0]
    out = [first_w * a for a in first]
    for w, model in terms[1:]:
        out = [acc + w * a for acc, a in zip(out, model, strict=True)]
    return out


@lru_cache(maxsize=4)
def node_test_set(cfg: RunConfig) -> BatchTensorDataset:
    """The public images node accuracy is measured on: the server's per-node test subset.

    The same set `server_app.evaluation.central_test_sets` scores the open relay's node
    models on (a test checks they agree), so both relays report the same node accuracy.
    """
    x, y, _, node_idx = evaluation_arrays(cfg)
    return to_tensors(cfg.dataset, x[node_idx], y[node_idx], cfg.normalize)
