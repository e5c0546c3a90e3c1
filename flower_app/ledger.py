"""A node's durable privacy ledger: every run it trained in, in one file under `ledger-dir`.

The file survives SuperNode restarts, so a restarted node resumes its spend instead of
starting a fresh budget. A round's steps are written BEFORE it trains (write-ahead): a node
killed mid-round counts that round as spent, never the other way round. `reserve` is one
transaction: the check and the write happen under one exclusive lock (`flock` on
`ledger-dir/.lock`), so two runs at once cannot both pass the lifetime check. Writes are
atomic (temporary file, fsync, rename, fsync of the folder).

Entries are keyed by run id and partition id (`ledger_key`): flwr 1.42's `Context` names no
SuperLink or federation, so runs of two SuperLinks with the same id would share an entry.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from flower_app.privacy import PrivacyLedger
from flower_app.results import atomic_write_text

LEDGER_FILE = "privacy-ledger.json"
FORMAT = 1
T = TypeVar("T")
# What `reserve`'s decision returns: the entry to record under its key (None: nothing), and
# what `reserve` hands back to its caller.
Decision = tuple[PrivacyLedger | None, T]


class LedgerError(RuntimeError):
    """The ledger cannot be read or written: the node must not train."""


def ledger_key(run_id: str, partition_id: int) -> str:
    """The entry of one run of one partition (flwr 1.42 offers no SuperLink identity)."""
    return f"run-{run_id}/partition-{partition_id}"


class FileLedger:
    """All runs of one node (or of the SuperNodes sharing its folder), by `ledger_key`."""

    def __init__(self, folder: str | Path) -> None:
        """Use (and create) `folder`."""
        self.folder = Path(folder).expanduser()
        self.path = self.folder / LEDGER_FILE

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = open(self.folder / ".lock", "a")  # noqa: SIM115 (held for the block)
        except OSError as err:
            raise LedgerError(f"ledger-dir={str(self.folder)!r} is not usable: {err}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": FORMAT, "runs": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT or not isinstance(data.get("runs"), dict):
                raise ValueError("unknown format")
        except (OSError, ValueError, AttributeError) as err:
            # Never a fresh budget: an unreadable ledger stops the node until its operator acts.
            raise LedgerError(f"the privacy ledger {self.path} is unreadable ({err})") from None
        return data

    def _ledgers(self, data: Mapping[str, Any]) -> dict[str, PrivacyLedger]:
        return {key: _entry(self.path, key, entry) for key, entry in data["runs"].items()}

    def _write(self, data: dict[str, Any]) -> None:
        try:
            atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")
            folder = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself survives a power loss
            finally:
                os.close(folder)
        except OSError as err:
            raise LedgerError(f"the privacy ledger {self.path} cannot be written: {err}") from None

    def runs(self) -> dict[str, PrivacyLedger]:
        """Every entry's ledger, by key."""
        with self._locked():
            return self._ledgers(self._read())

    def get(self, key: str) -> PrivacyLedger | None:
        """The entry's ledger, or None before the node first trained in it."""
        return self.runs().get(key)

    def reserve(self, key: str, decide: Callable[[dict[str, PrivacyLedger]], Decision[T]]) -> T:
        """One transaction: `decide` sees every entry, and what it returns is recorded.

        `decide(entries)` returns (the ledger to record under `key`, or None; a result);
        both happen under the folder's lock, so no other run checks in between.
        """
        with self._locked():
            data = self._read()
            record, result = decide(self._ledgers(data))
            if record is not None:
                self._record(data, key, record)
                self._write(data)
        return result

    def put(self, key: str, ledger: PrivacyLedger) -> None:
        """Record the entry's ledger; its step count never goes down."""
        self.reserve(key, lambda _: (ledger, None))

    def _record(self, data: dict[str, Any], key: str, ledger: PrivacyLedger) -> None:
        old = data["runs"].get(key)
        if old is not None and int(old["steps"]) > ledger.steps:
            raise LedgerError(
                f"{key}: the ledger holds {old['steps']} steps, refusing to record {ledger.steps}"
            )
        data["runs"][key] = ledger.to_dict() | {"updated": datetime.now(UTC).isoformat()}


def _entry(path: Path, key: str, entry: Any) -> PrivacyLedger:
    """One entry, checked: a malformed one stops the node with one line, never a traceback."""
    try:
        led = PrivacyLedger.from_dict(entry)
        valid = (
            0 <= led.steps
            and 0 <= led.planned_steps
            and 0 <= led.noise_multiplier < math.inf
            and 0 < led.sample_rate <= 1
            and 0 < led.delta < 1
        )
        if not valid:
            raise ValueError("a value out of range")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LedgerError(
            f"the privacy ledger {path} has a malformed entry {key!r} ({type(err).__name__}: "
            f"{err}); the node trains nothing until its operator repairs it"
        ) from None
    return led
