"""The simulation's faster message lookup returns and marks exactly what Flower's does."""

import copy
import threading
from types import SimpleNamespace

import pytest
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

from server_app import sim_runtime
from server_app.sim_runtime import indexed_get_message_ins, source_sha256


class FakeState:
    """What get_message_ins touches: the store, the lock, and the validation (expiry)."""

    def __init__(self, messages):
        self.message_ins_store = messages
        self.lock = threading.RLock()
        self.checked = []

    def _check_stored_messages(self, message_ids, run_id=None):
        for msg_id in message_ids:
            self.checked.append(msg_id)
            msg = self.message_ins_store.get(msg_id)
            if msg is not None and msg.expired:
                del self.message_ins_store[msg_id]


def store():
    """Three rounds' worth of messages to 6 nodes, two runs, some delivered or expired."""
    out = {}
    for i in range(60):
        meta = SimpleNamespace(dst_node_id=i % 6, run_id=1 + (i % 7 == 0), delivered_at="")
        if i % 5 == 0:
            meta.delivered_at = "earlier"
        out[f"m{i}"] = SimpleNamespace(metadata=meta, expired=i % 11 == 0)
    return out


@pytest.mark.parametrize("limit", [1, 2, None])
@pytest.mark.parametrize("run_id", [None, 1])
def test_the_indexed_lookup_returns_and_marks_what_flowers_does(limit, run_id):
    messages = store()
    flower, ours = FakeState(copy.deepcopy(messages)), FakeState(copy.deepcopy(messages))
    for _sweep in range(3):
        for node in [*range(6), 99]:
            want = InMemoryLinkState.get_message_ins(flower, node, limit, run_id=run_id)
            got = indexed_get_message_ins(ours, node, limit, run_id=run_id)
            assert [id(m) for m in want] != [] or got == []
            assert [m.metadata.dst_node_id for m in got] == [m.metadata.dst_node_id for m in want]
            assert sorted(k for k, v in ours.message_ins_store.items() if v in got) == sorted(
                k for k, v in flower.message_ins_store.items() if v in want
            )
    # Every node asked: the same live messages remain, delivered the same (an expired one
    # may wait for its own node to ask before it is dropped; neither lookup returns it).
    live = {k for k, m in ours.message_ins_store.items() if not m.expired}
    assert live == flower.message_ins_store.keys()
    for k, m in flower.message_ins_store.items():
        assert (m.metadata.delivered_at == "") == (
            ours.message_ins_store[k].metadata.delivered_at == ""
        )
    # ...validating only the asking node's messages, not every node's each time.
    assert len(ours.checked) < len(flower.checked) / 3


def test_a_bad_limit_is_refused_as_flower_does():
    with pytest.raises(AssertionError):
        indexed_get_message_ins(FakeState({}), 1, 0)


def test_applied_only_to_the_flower_source_it_was_checked_against(monkeypatch):
    original = InMemoryLinkState.get_message_ins
    monkeypatch.setattr(InMemoryLinkState, "get_message_ins", original)
    assert source_sha256(original) == sim_runtime.ORIGINAL_SHA256
    monkeypatch.setattr(sim_runtime, "ORIGINAL_SHA256", "0" * 64)
    assert not sim_runtime.speed_up_message_lookup()
    assert InMemoryLinkState.get_message_ins is original
    monkeypatch.setattr(sim_runtime, "ORIGINAL_SHA256", source_sha256(original))
    assert sim_runtime.speed_up_message_lookup()
    assert InMemoryLinkState.get_message_ins is indexed_get_message_ins
