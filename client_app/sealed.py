"""The node's side of `gossip-relay=sealed` in Flower's records (flower_app/sealed_node.py).

The node keeps, in its own `context.state` (never sent; one entry per run, since Flower
shares the state across a run series): its X25519 key pair for the run, its model as float64
arrays (the relay mixes in float64, as the open relay does), the model's dtypes for training,
and the last exchange it applied (an older or repeated one is refused: no replays).
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log

from client_app.cell import run_of
from client_app.replies import train_reply
from flower_app.canary_scores import canary_scores
from flower_app.config import RunConfig
from flower_app.device import resolve_device
from flower_app.model import model_for
from flower_app.node import NodeRound
from flower_app.policy import NodePolicy, node_run_config, torch_threads
from flower_app.sealed import NodeKeys
from flower_app.sealed_node import (
    Delivery,
    Peer,
    apply_delivery,
    as_float64,
    node_test_set,
    seal_for,
)
from flower_app.shards import canary_set
from flower_app.train import evaluate
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

_PRIVATE = "private-key"
_DTYPES = "dtypes"
_APPLIED = "applied"  # [round, step] of the last exchange applied


class SealedState:
    """The node's sealed-relay entry in `context.state` for the context's run."""

    def __init__(self, context: Context, run: str) -> None:
        """Load (or, on first use in `run`, make) the node's key pair for it (`cell.run_of`)."""
        self.context = context
        self.meta_key, self.model_key = f"sealed-node:{run}", f"sealed-model:{run}"
        if self.meta_key not in context.state:
            _drop_earlier_cells(context, run)
            keys = NodeKeys.generate()
            context.state[self.meta_key] = ConfigRecord(
                {_PRIVATE: keys.export_private(), _DTYPES: [], _APPLIED: [0, -1]}
            )
        self.meta = context.state[self.meta_key]
        self.keys = NodeKeys.from_private(bytes(self.meta[_PRIVATE]))

    @property
    def model(self) -> tuple[list[str], list[np.ndarray]] | None:
        """The node's own model (names, float64 arrays), None before its first round."""
        if self.model_key not in self.context.state:
            return None
        record = self.context.state[self.model_key]
        return list(record.keys()), as_float64(record.to_numpy_ndarrays())

    def store(self, names: list[str], arrays: list[np.ndarray]) -> None:
        """Keep the node's model as float64 arrays under their state_dict names."""
        pairs = zip(names, arrays, strict=True)
        self.context.state[self.model_key] = ArrayRecord(
            {k: Array(np.ascontiguousarray(a, dtype=np.float64)) for k, a in pairs}
        )

    def start_weights(self, msg: Message) -> dict[str, torch.Tensor]:
        """What this round trains: the node's own model, or round 1's public initial one."""
        held = self.model
        if held is None:
            if ARRAYS not in msg.content:
                raise RuntimeError("sealed relay: this node holds no model and none was sent")
            initial = msg.content[ARRAYS]
            self.meta[_DTYPES] = [str(a.dtype) for a in initial.to_numpy_ndarrays()]
            held = list(initial.keys()), as_float64(initial.to_numpy_ndarrays())
        names, arrays = held
        dtypes = list(self.meta[_DTYPES])
        return {
            k: torch.from_numpy(np.ascontiguousarray(a.astype(d)))
            for k, a, d in zip(names, arrays, dtypes, strict=True)
        }

    def trained_arrays(self) -> list[np.ndarray] | None:
        """The node's model in its training dtypes (what the open relay's server holds)."""
        held = self.model
        if held is None:
            return None
        dtypes = list(self.meta[_DTYPES])
        return [a.astype(d) for a, d in zip(held[1], dtypes, strict=True)]

    def check_fresh(self, server_round: int, step: int) -> str | None:
        """One line if (round, step) is not after the last exchange applied (a replay)."""
        last = tuple(int(x) for x in self.meta[_APPLIED])
        if (server_round, step) <= last:
            return (
                f"refused every model of round {server_round} step {step}: already applied "
                f"round {last[0]} step {last[1]} (a replayed or reordered delivery)"
            )
        self.meta[_APPLIED] = [server_round, step]
        return None


def _drop_earlier_cells(context: Context, run: str) -> None:
    """Forget the sealed keys and models of this run's earlier cells.

    A sweep's cells run one after another, so a node in a new cell never needs them again;
    a whole sweep would otherwise pile them up in its memory.
    """
    prefix = f"{context.run_id}:"
    if not run.startswith(prefix):
        return
    for key in list(context.state.keys()):
        if key.startswith((f"sealed-node:{prefix}", f"sealed-model:{prefix}")):
            del context.state[key]


def sealed_train_reply(out: NodeRound, partition_id: int, state: SealedState) -> RecordDict:
    """Keep the trained model in the node; reply its public facts and public key only."""
    names = list(out.state_dict)
    state.store(names, [out.state_dict[k].detach().cpu().numpy() for k in names])
    content = train_reply(out, partition_id)
    del content[ARRAYS]
    content[SEALED] = ConfigRecord({PUBLIC_KEY: state.keys.public_bytes()})
    return content


def _peers(rec: ConfigRecord, ids: str, keys: str, weights: str | None) -> list[Peer]:
    w = list(rec[weights]) if weights else [0.5] * len(list(rec[ids]))
    return [
        Peer(int(n), bytes(k), float(x)) for n, k, x in zip(rec[ids], rec[keys], w, strict=True)
    ]


def _apply(state: SealedState, rec: ConfigRecord, server_round: int) -> list[str]:
    """Open and mix the deliveries the message carries; the lines of what was left out."""
    if APPLY_STEP not in rec:
        return []
    step = int(rec[APPLY_STEP])
    if (stale := state.check_fresh(server_round, step)) is not None:
        log(WARNING, "%s", stale)
        return [stale]
    held = state.model
    if held is None:
        return [f"round {server_round} step {step}: no model of my own to mix into"]
    names, own = held
    delivery = Delivery(
        step=step,
        self_weight=float(rec[APPLY_SELF_WEIGHT]),
        peers=_peers(rec, APPLY_FROM, APPLY_KEYS, APPLY_WEIGHTS),
        blobs=[bytes(b) for b in rec[APPLY_BLOBS]],
    )
    mixed, refused = apply_delivery(
        own,
        delivery,
        state.keys,
        run_id=int(state.context.run_id),
        server_round=server_round,
        node_id=int(state.context.node_id),
    )
    state.store(names, mixed)
    return refused


def gossip_step(msg: Message, context: Context) -> Message:
    """Apply the previous exchange's deliveries, then seal the node's model for this one."""
    state = SealedState(context, run_of(msg, context)[1])
    rec = msg.content[SEALED]
    server_round = int(rec[SERVER_ROUND])
    refused = _apply(state, rec, server_round)
    blobs: list[bytes] = []
    if SEAL_STEP in rec and (held := state.model) is not None:
        blobs = seal_for(
            held[1],
            state.keys,
            _peers(rec, SEAL_TO, SEAL_KEYS, None),
            run_id=int(context.run_id),
            server_round=server_round,
            step=int(rec[SEAL_STEP]),
            node_id=int(context.node_id),
        )
    return Message(
        content=RecordDict({SEALED: ConfigRecord({BLOBS: blobs, REFUSED: refused})}),
        reply_to=msg,
    )


def evaluate_own(msg: Message, context: Context) -> Message:
    """Apply the round's last deliveries, then score the node's own model (counts only)."""
    torch.set_num_threads(torch_threads(context.node_config))
    # As for training: a node with a policy reads the images from the dataset's own place.
    policy = NodePolicy.from_node_config(context.node_config)
    run_config, run = run_of(msg, context)
    cfg = node_run_config(policy, RunConfig.from_run_config(run_config))
    state = SealedState(context, run)
    rec = msg.content[SEALED]
    refused = _apply(state, rec, int(rec[SERVER_ROUND]))
    metrics: dict[str, Any] = {"partition-id": int(context.node_config["partition-id"])}
    if (arrays := state.trained_arrays()) is not None:
        model = model_for(cfg).to(resolve_device(cfg.device))  # where the node trains
        names = list(model.state_dict())
        model.load_state_dict(
            {
                k: torch.from_numpy(np.ascontiguousarray(a))
                for k, a in zip(names, arrays, strict=True)
            }
        )
        test = node_test_set(cfg)
        _, accuracy = evaluate(model, test)
        metrics |= {CORRECT: round(accuracy * len(test)), TOTAL: len(test)}
    return Message(
        content=RecordDict(
            {METRICS: MetricRecord(metrics), SEALED: ConfigRecord({REFUSED: refused})}
        ),
        reply_to=msg,
    )


def score_canaries(msg: Message, context: Context) -> Message:
    """An audit under the sealed relay: score the canaries asked on the node's own model.

    The node is the observer (the server holds no model); it replies scores, never a model.
    """
    torch.set_num_threads(torch_threads(context.node_config))
    policy = NodePolicy.from_node_config(context.node_config)
    run_config, run = run_of(msg, context)
    cfg = node_run_config(policy, RunConfig.from_run_config(run_config))
    idx = np.asarray(list(msg.content[SEALED][CANARIES]), dtype=np.int64)
    arrays = SealedState(context, run).trained_arrays()
    scores: list[float] = []
    if arrays is not None:
        _, data = canary_set(cfg, int(context.node_config["num-partitions"]))
        images, labels = data.tensors
        scores = [float(x) for x in canary_scores(cfg.model, arrays, images[idx], labels[idx])]
    return Message(content=RecordDict({SEALED: ConfigRecord({SCORES: scores})}), reply_to=msg)
