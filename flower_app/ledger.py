"""A node's durable privacy ledger: every run it trained in, in one file under `ledger-dir`.

The file survives SuperNode restarts, so a restarted node resumes its spend instead of
starting a fresh budget. A round's steps are written BEFORE it trains (write-ahead): a node
killed mid-round counts that round as spent, never the other way round. Writes are atomic
(temporary file, fsync, rename) and serialised with an exclusive lock on the folder.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flower_app.privacy import PrivacyLedger
from flower_app.results import atomic_write_text

LEDGER_FILE = "privacy-ledger.json"
FORMAT = 1


class LedgerError(RuntimeError):
    """The ledger cannot be read or written: the node must not train."""


class FileLedger:
    """All runs of one node, keyed by Flower run id."""

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
            return data
        except (OSError, ValueError) as err:
            # Never a fresh budget: an unreadable ledger stops the node until its operator acts.
            raise LedgerError(f"the privacy ledger {self.path} is unreadable ({err})") from None

    def runs(self) -> dict[str, PrivacyLedger]:
        """Every run's ledger."""
        with self._locked():
            data = self._read()
        return {run: PrivacyLedger.from_dict(entry) for run, entry in data["runs"].items()}

    def get(self, run_id: str) -> PrivacyLedger | None:
        """The run's ledger, or None before the node first trained in it."""
        return self.runs().get(run_id)

    def put(self, run_id: str, ledger: PrivacyLedger) -> None:
        """Record the run's ledger; its step count never goes down."""
        with self._locked():
            data = self._read()
            old = data["runs"].get(run_id)
            if old is not None and int(old["steps"]) > ledger.steps:
                raise LedgerError(
                    f"run {run_id}: the ledger holds {old['steps']} steps, refusing to record "
                    f"{ledger.steps}"
                )
            data["runs"][run_id] = ledger.to_dict() | {"updated": datetime.now(UTC).isoformat()}
            atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")
