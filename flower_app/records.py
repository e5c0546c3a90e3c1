"""Conversions between Flower records and plain Python (the only flwr user in the core).

The keys themselves live in `wire.py`; the ClientApp builds its replies in
`client_app/replies.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flwr.app import ConfigRecord, RecordDict

from flower_app.ledger import Decision
from flower_app.privacy import PrivacyLedger
from flower_app.wire import LEDGER

T = TypeVar("T")


class StateLedger:
    """A node's ledgers in `context.state` (no `ledger-dir`), one entry per `ledger_key`.

    It lasts as long as the SuperNode process: enough for simulation, where nodes have no
    policy; a node whose policy sets an ε limit must set `ledger-dir` (`FileLedger`). Flower
    shares `context.state` across a run series, so each run's entry keeps its own key.
    """

    def __init__(self, state: RecordDict) -> None:
        """Wrap the node's `context.state`."""
        self.state = state

    def runs(self) -> dict[str, PrivacyLedger]:
        """Every entry the node recorded in this state, by `ledger_key`."""
        prefix = f"{LEDGER}:"
        return {
            name.removeprefix(prefix): PrivacyLedger.from_dict(record)
            for name, record in self.state.items()
            if name.startswith(prefix)
        }

    def put(self, key: str, ledger: PrivacyLedger) -> None:
        """Record the entry's ledger for its next round."""
        self.state[f"{LEDGER}:{key}"] = ConfigRecord(ledger.to_dict())

    def reserve(self, key: str, decide: Callable[[dict[str, PrivacyLedger]], Decision[T]]) -> T:
        """`decide` on the entries and record what it returns (one process: no lock)."""
        record, result = decide(self.runs())
        if record is not None:
            self.put(key, record)
        return result
