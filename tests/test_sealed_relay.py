"""gossip-relay=sealed end to end in one process: the real ClientApp behind a recording Grid."""

import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from flower_app.config import RunConfig
from flower_app.sealed import NodeKeys, Route, SealError, open_sealed, parse
from flower_app.sealed_node import (
    node_test_set,
)
from flower_app.wire import (
    APPLY_BLOBS,
    APPLY_FROM,
    APPLY_STEP,
    SEALED,
    SERVER_ROUND,
)
from server_app.evaluation import central_test_sets
from strategies.sealed_relay import GOSSIP_STEP, SealedGossip, disjoint_batches
from tests.inprocess_grid import RUN_ID, run_gossip
from tests.inprocess_grid import TINY as INPROCESS_TINY

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = 4
TINY = {**INPROCESS_TINY, "gossip-steps": 2, "gossip-edges": 5}


def _records(msg):
    return list(msg.content.items())


def _bytes_values(msg):
    for _, rec in _records(msg):
        if isinstance(rec, ConfigRecord):
            for value in rec.values():
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, bytes):
                        yield v


def test_the_server_never_holds_a_model_it_can_read():
    """Every message sent or received under sealed: no model but round 1's public initial one,
    and no blob opens with any key the server has or can make (its receiver's key does)."""
    strategy, grid = run_gossip({**TINY, "gossip-relay": "sealed"}, NODES)
    assert isinstance(strategy, SealedGossip)
    initial = strategy.initial.to_numpy_ndarrays()
    public = {strategy.public_keys[v] for v in range(NODES)}
    assert len(public) == NODES
    models = [grid.node_model(v) for v in range(NODES)]
    for msg in grid.sent + grid.received:
        for name, rec in _records(msg):
            if isinstance(rec, ArrayRecord):  # only the initial model, only server -> node
                assert msg in grid.sent and name == "arrays"
                for got, want in zip(rec.to_numpy_ndarrays(), initial, strict=True):
                    np.testing.assert_array_equal(got, want)
            if isinstance(rec, ConfigRecord | MetricRecord):
                for value in rec.values():
                    assert not isinstance(value, list) or len(value) <= NODES, name
        for blob in _bytes_values(msg):
            if blob in public or not blob:
                continue
            with pytest.raises(SealError):
                parse(blob)  # not a plaintext model
            with pytest.raises(SealError):
                parse(blob[13:-16])  # nor one behind the header
            for model in models:  # no node's model, as float64 or float32 bytes
                assert model[:16].tobytes() not in blob
                assert model[:16].astype(np.float32).tobytes() not in blob
    opened = 0
    server_keys = NodeKeys.generate()
    for _msg, route, blob in _deliveries(grid):
        for key in public:  # any public key as the sender's, the server's own private key
            with pytest.raises(SealError):
                open_sealed(blob, route, server_keys, key)
        receiver = grid.contexts[route.receiver].state[f"sealed-node:{RUN_ID}"]
        sender_key = strategy.public_keys[grid.node_ids.index(route.sender)]
        open_sealed(blob, route, NodeKeys.from_private(receiver["private-key"]), sender_key)
        opened += 1
    assert opened > 0, "nothing was relayed: the test would pass vacuously"
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert sum("arrays" in m.content for m in trains) == NODES, "initial model sent again"


def _deliveries(grid):
    """(message, route, blob) of every blob the server delivered."""
    for msg in grid.sent:
        rec = msg.content[SEALED] if SEALED in msg.content else {}
        if APPLY_BLOBS not in rec:
            continue
        for sender, blob in zip(rec[APPLY_FROM], rec[APPLY_BLOBS], strict=True):
            if blob:
                route = Route(
                    RUN_ID,
                    int(rec[SERVER_ROUND]),
                    int(rec[APPLY_STEP]),
                    int(sender),
                    msg.metadata.dst_node_id,
                )
                yield msg, route, bytes(blob)


@pytest.mark.parametrize("mode", ["matching", "edges", "metropolis"])
def test_sealed_and_open_give_the_same_node_models_every_round(mode):
    """Same seed and noise-seed: sealing changes who can read, not the maths (bit for bit)."""
    seen = {}

    def open_round(server_round, strategy, grid):
        seen[("open", server_round)] = [strategy.models[v].copy() for v in range(NODES)]
        seen[("open-acc", server_round)] = strategy.round_diagnostics()["node_acc_mean"]

    def sealed_round(server_round, strategy, grid):
        seen[("sealed", server_round)] = [grid.node_model(v) for v in range(NODES)]
        seen[("sealed-acc", server_round)] = strategy.round_diagnostics()["node_acc_mean"]

    cfg = {**TINY, "gossip-mode": mode}
    run_gossip({**cfg, "gossip-relay": "open"}, NODES, after_round=open_round)
    sealed, _ = run_gossip({**cfg, "gossip-relay": "sealed"}, NODES, after_round=sealed_round)
    for r in (1, 2):
        for v in range(NODES):
            np.testing.assert_array_equal(seen[("sealed", r)][v], seen[("open", r)][v])
        assert seen[("sealed-acc", r)] == seen[("open-acc", r)]
    # The models moved: gossip happened, and they are not all equal (no trivial identity).
    assert sealed.last_round["gossip_exchanges"] >= 2
    assert len({m.tobytes() for m in seen[("sealed", 2)]}) > 1


def test_a_tampered_blob_is_refused_and_the_round_goes_on(caplog):
    """A relay that flips one byte of one blob: the receiver keeps its model, says so, and
    the run completes."""
    hits = []

    def tamper(msg):
        if SEALED in msg.content and APPLY_BLOBS in msg.content[SEALED] and not hits:
            blobs = [bytes(b) for b in msg.content[SEALED][APPLY_BLOBS]]
            if blobs and blobs[0]:
                blobs[0] = blobs[0][:-1] + bytes([blobs[0][-1] ^ 1])
                msg.content[SEALED][APPLY_BLOBS] = blobs
                hits.append(msg.metadata.dst_node_id)
        return msg

    with caplog.at_level(logging.WARNING):
        strategy, _ = run_gossip(
            {**TINY, "gossip-relay": "sealed", "gossip-mode": "matching"}, NODES, tamper=tamper
        )
    assert hits, "nothing was tampered with"
    refusals = [r.getMessage() for r in caplog.records if "failed authentication" in r.getMessage()]
    assert refusals and all("\n" not in line for line in refusals)
    assert strategy.last_round["nodes_trained"] == NODES  # round 2 ran with every node


def test_a_node_that_stops_answering_is_not_waited_for_again_that_round(caplog):
    """Node 1 answers round 1's train, then no gossip message: its partners keep their own
    share, it gets no further message that round (each wait is a round-timeout), and round 2
    has it back."""
    silent = 10_037  # partition 1's node id in InProcessGrid

    def drop(msg):
        return msg.metadata.dst_node_id == silent and msg.metadata.message_type == GOSSIP_STEP

    with caplog.at_level(logging.WARNING):
        strategy, grid = run_gossip(
            {**TINY, "gossip-relay": "sealed", "gossip-mode": "metropolis"}, NODES, drop=drop
        )
    to_silent = [m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id == silent]
    # Each round: train, one gossip message (unanswered), and nothing more that round.
    assert to_silent == ["train", GOSSIP_STEP] * 2
    assert any("no model arrived node 10037" in r.getMessage() for r in caplog.records)
    assert strategy.last_round["nodes_trained"] == NODES


def test_edge_batches_are_disjoint_and_keep_the_order():
    pairs = [(0, 1), (2, 3), (1, 2), (0, 1), (3, 4)]
    batches = disjoint_batches(pairs)
    assert [p for b in batches for p in b] == pairs
    for batch in batches:
        flat = [x for p in batch for x in p]
        assert len(flat) == len(set(flat))
    assert len(batches) == 3


def test_nodes_score_on_the_servers_node_test_set():
    cfg = RunConfig.from_run_config(TINY)
    _, server = central_test_sets(cfg)
    node = node_test_set(cfg)
    for a, b in zip(server.tensors, node.tensors, strict=True):
        assert bool((a == b).all())


def test_a_sealed_audit_is_scored_by_the_nodes_and_matches_the_open_one():
    """Under sealed the nodes are the observers (their own models); the server scores
    nothing and receives scores only. Same seeds: the same bounds as the open relay's."""
    from flower_app.wire import ARRAYS
    from server_app.audit import run_audit, sealed_audit_scores

    audit = {**TINY, "num-server-rounds": 1, "audit-canaries": 6, "audit-seed": 3}
    results = {}
    for relay in ("open", "sealed"):
        raw = {**audit, "gossip-relay": relay}
        strategy, grid = run_gossip(raw, NODES)
        cfg = RunConfig.from_run_config(raw)
        before = len(grid.sent)
        scores = sealed_audit_scores(cfg, strategy, NODES) if relay == "sealed" else None
        if relay == "sealed":
            queries, replies = grid.sent[before:], grid.received[before:]
            assert {m.metadata.message_type for m in queries} == {"query.audit"}
            assert not any(ARRAYS in m.content for m in queries + replies)
            assert strategy.own_models() == {}  # the server had nothing to score with
        results[relay] = run_audit(
            cfg,
            num_nodes=NODES,
            own_models=strategy.own_models(),
            shared=None,
            graph=strategy.graph,
            node_eps={p: strategy.reports.node_eps(p) for p in range(NODES)},
            scores_by_node=scores,
        )["observers"]
    names = [o["observer"] for o in results["sealed"]]
    assert names[0] == "owner" and "distance-1" in names and "average" not in names
    assert results["sealed"] == results["open"]
    # Scored canaries, compared through their exact mean scores (no guess needs to be made).
    assert all(o["canaries"] > 0 and np.isfinite(o["mean_score_in"]) for o in results["sealed"])
