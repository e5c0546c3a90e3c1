"""A node of the sealed relay refuses what it should not mix, in one line, and goes on."""

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.sealed import SealedState, gossip_step
from flower_app.sealed import NodeKeys
from flower_app.sealed_node import (
    Delivery,
    Peer,
    apply_delivery,
    compact,
    seal_for,
)
from flower_app.wire import (
    APPLY_BLOBS,
    APPLY_FROM,
    APPLY_KEYS,
    APPLY_SELF_WEIGHT,
    APPLY_STEP,
    APPLY_WEIGHTS,
    BLOBS,
    REFUSED,
    SEAL_KEYS,
    SEAL_STEP,
    SEAL_TO,
    SEALED,
    SERVER_ROUND,
)

RUN = 7
A, B, C = 101, 202, 303


@pytest.fixture
def keys():
    return {n: NodeKeys.generate() for n in (A, B, C)}


def model(value):
    return [np.full((2, 3), value, dtype=np.float64), np.full(3, value / 4, dtype=np.float64)]


def sealed(keys, sender, receiver, value, *, server_round=1, step=0):
    peer = Peer(receiver, keys[receiver].public_bytes())
    blob = seal_for(
        model(value),
        keys[sender],
        [peer],
        run_id=RUN,
        server_round=server_round,
        step=step,
        node_id=sender,
    )
    return blob[0]


def deliver(keys, blobs, *, senders=(B,), weights=(0.5,), self_weight=0.5, step=0):
    peers = [Peer(s, keys[s].public_bytes(), w) for s, w in zip(senders, weights, strict=True)]
    return apply_delivery(
        model(1.0),
        Delivery(step, self_weight, peers, blobs),
        keys[A],
        run_id=RUN,
        server_round=1,
        node_id=A,
    )


def assert_model(got, want):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_a_good_blob_is_mixed_as_the_plain_mean(keys):
    got, refused = deliver(keys, [sealed(keys, B, A, 3.0)])
    assert refused == []
    assert_model(got, model(2.0))


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("tampered", "failed authentication"),
        ("replayed", "failed authentication"),  # last step's blob delivered again
        ("misrouted", "failed authentication"),  # B sealed it for C, not A
        ("wrong-sender", "failed authentication"),  # C's blob presented as B's
        ("missing", "no model arrived"),
        ("truncated", "truncated"),
    ],
)
def test_a_bad_blob_is_refused_in_one_line_and_the_node_keeps_its_share(keys, case, words, caplog):
    blob = {
        "tampered": lambda: (b := bytearray(sealed(keys, B, A, 3.0)), b.__setitem__(20, b[20] ^ 1))[
            0
        ],
        "replayed": lambda: sealed(keys, B, A, 3.0, step=0),
        "misrouted": lambda: sealed(keys, B, C, 3.0, step=1),
        "wrong-sender": lambda: sealed(keys, C, A, 3.0, step=1),
        "missing": lambda: b"",
        "truncated": lambda: sealed(keys, B, A, 3.0, step=1)[:20],
    }[case]()
    # A second, good exchange in the same delivery still happens (metropolis-like weights).
    good = sealed(keys, C, A, 7.0, step=1)
    with caplog.at_level(logging.WARNING):
        got, refused = deliver(
            keys,
            [bytes(blob), good],
            senders=(B, C),
            weights=(0.25, 0.25),
            self_weight=0.5,
            step=1,
        )
    assert len(refused) == 1 and words in refused[0] and "\n" not in refused[0]
    assert any(words in r.getMessage() for r in caplog.records)
    # B's share stays A's own model: 0.5 * 1 + 0.25 * 1 + 0.25 * 7.
    assert_model(got, model(0.75 + 1.75))


def test_a_second_model_from_one_sender_in_one_step_is_refused(keys):
    blob = sealed(keys, B, A, 3.0)
    got, refused = deliver(keys, [blob, blob], senders=(B, B), weights=(0.25, 0.25))
    assert len(refused) == 1 and "at most one per sender" in refused[0]
    assert_model(got, model(0.5 + 0.75 + 0.25))


def test_a_freshly_trained_model_travels_as_float32_a_mixed_one_as_float64():
    trained = [np.float32(np.pi) * np.ones(3, dtype=np.float32)]
    assert compact([a.astype(np.float64) for a in trained])[0].dtype == np.float32
    mixed = [np.full(3, 0.1)]
    assert compact(mixed)[0].dtype == np.float64


@pytest.fixture
def identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", RUN), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _context(node):
    return Context(
        run_id=RUN,
        node_id=node,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={"strategy": "gossip"},
    )


def _step_message(dst, fields):
    return Message(
        content=RecordDict({SEALED: ConfigRecord(fields)}),
        message_type="train.gossip",
        dst_node_id=dst,
    )


def test_a_replayed_delivery_of_an_applied_step_is_refused_by_the_node(identity):
    """The relay delivers the same (round, step) twice: the node mixes it once."""
    ctx_a, ctx_b = _context(A), _context(B)
    state_a, state_b = SealedState(ctx_a, str(ctx_a.run_id)), SealedState(ctx_b, str(ctx_b.run_id))
    names = ["w", "b"]
    state_a.store(names, model(1.0))
    state_b.store(names, model(3.0))
    pa, pb = state_a.keys.public_bytes(), state_b.keys.public_bytes()
    reply = gossip_step(
        _step_message(B, {SERVER_ROUND: 1, SEAL_STEP: 0, SEAL_TO: [A], SEAL_KEYS: [pa]}), ctx_b
    )
    blob = bytes(reply.content[SEALED][BLOBS][0])
    apply = {
        SERVER_ROUND: 1,
        APPLY_STEP: 0,
        APPLY_SELF_WEIGHT: 0.5,
        APPLY_FROM: [B],
        APPLY_KEYS: [pb],
        APPLY_WEIGHTS: [0.5],
        APPLY_BLOBS: [blob],
    }
    first = gossip_step(_step_message(A, apply), ctx_a)
    assert list(first.content[SEALED][REFUSED]) == []
    assert_model(SealedState(ctx_a, str(ctx_a.run_id)).model[1], model(2.0))
    again = gossip_step(_step_message(A, apply), ctx_a)
    (line,) = again.content[SEALED][REFUSED]
    assert "already applied round 1 step 0" in line
    assert_model(SealedState(ctx_a, str(ctx_a.run_id)).model[1], model(2.0))  # not mixed twice
