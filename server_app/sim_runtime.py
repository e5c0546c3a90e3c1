"""A faster message lookup for flwr 1.42's simulation runtime (the ServerApp's process).

The runtime asks its in-memory state every 0.1 s, node by node, for that node's next message
(`InMemoryLinkState.get_message_ins`), and each ask re-validates every stored message of
every node (expiry, federation membership: about 14 µs each here) before it compares the
destination. With n nodes and n messages of a gossip round in flight that is n² checks a
sweep: at 1,000 nodes the thread never slept and held the GIL against the ServerApp, the
ClientApp results and Ray (py-spy, docs/performance.md). `indexed_get_message_ins` is the
same lookup that validates only the messages addressed to the asking node, which are all it
can return: what it returns and what it marks delivered are Flower's (a test runs both on
the same state). Messages of other nodes are still validated when their node asks or when
the ServerApp pulls their replies. Applied only to the exact flwr version and source it was
written against; anything else keeps Flower's own and says so.
"""

from __future__ import annotations

import hashlib
import inspect
from importlib import metadata
from logging import INFO, WARNING
from typing import Any

from flwr.common.logger import log
from flwr.supercore.date import now

FLWR_VERSION = "1.42.0"
# sha256 of InMemoryLinkState.get_message_ins's source in flwr 1.42.0.
ORIGINAL_SHA256 = "6547c8dcbc62e12f5b2aa5c69f4de8c7c7072c10d6c0876512cf37197d941056"


def indexed_get_message_ins(
    self: Any, node_id: int, limit: int | None, *, run_id: int | None = None
) -> list[Any]:
    """Flower's get_message_ins, validating only the messages addressed to `node_id`."""
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found: list[Any] = []
    with self.lock:
        for msg_id, msg in list(self.message_ins_store.items()):
            if msg.metadata.dst_node_id != node_id:
                continue
            self._check_stored_messages({msg_id})
            if (
                (msg_ins := self.message_ins_store.get(msg_id))
                and (run_id is None or msg_ins.metadata.run_id == run_id)
                and msg_ins.metadata.delivered_at == ""
            ):
                found.append(msg_ins)
            if limit and len(found) == limit:
                break
    delivered_at = now().isoformat()
    for msg_ins in found:
        msg_ins.metadata.delivered_at = delivered_at
    return found


def source_sha256(fn: Any) -> str:
    """The sha256 of a function's source text."""
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def speed_up_message_lookup() -> bool:
    """Use the indexed lookup if flwr is the version it was checked against; True if so."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    current = InMemoryLinkState.get_message_ins
    if current is indexed_get_message_ins:
        return True
    version = metadata.version("flwr")
    if version != FLWR_VERSION or source_sha256(current) != ORIGINAL_SHA256:
        log(WARNING, "flwr %s: simulation keeps Flower's own message lookup", version)
        return False
    InMemoryLinkState.get_message_ins = indexed_get_message_ins  # type: ignore[method-assign]
    log(INFO, "Simulation: message lookup validates only the asking node's messages")
    return True
