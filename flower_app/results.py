"""The results contract: `<results-dir>/<run-name>/{config.json, rounds.csv, summary.json}`.

Every file is replaced atomically (write a temporary file, then rename), and `summary.json`
with `"status": "completed"` is written last, so a crashed run never looks complete.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

DISTRIBUTION = "flower-dp-gossip"
ROUND_COLUMNS = (
    "round",
    "strategy",
    "eps_target",
    "eps_spent",
    "eps_per_round_claimed",
    "accuracy",
    "loss",
    "train_loss",
    "node_acc_mean",
    "node_acc_min",
    "node_acc_max",
    "consensus_distance",
    "bytes_sent_per_node",
    "bytes_sent_cum_per_node",
    "nodes_trained",
    "nodes_failed",
    # gossip-relay=sealed: round trips of gossip exchanges, and exchanges a node refused.
    "gossip_exchanges",
    "exchanges_refused",
    "eval_s",
    "round_s",
    "wall_s",
)
SUMMARY = "summary.json"
ROUNDS = "rounds.csv"
CONFIG = "config.json"


def package_version() -> str:
    """This app's version, from the installed package's metadata (pyproject's `version`)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # a checkout that was never installed
        return "unknown (not installed)"


def project_root() -> Path | None:
    """The source folder of an editable install (PEP 610 direct_url.json), if any.

    The ServerApp may run from another working directory (Flower installs the app bundle
    under FLWR_HOME), but results belong next to the project the user launched.
    """
    try:
        raw = metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not raw:
        return None
    info = json.loads(raw)
    if not info.get("dir_info", {}).get("editable"):
        return None
    url = urlparse(info.get("url", ""))
    return Path(unquote(url.path)) if url.scheme == "file" else None


def resolve_results_dir(value: str) -> Path:
    """`results-dir` as an absolute path; relative paths and the default hang off the project."""
    base = project_root() or Path.cwd()
    if not value:
        return base / "results"
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def format_eps(eps: float) -> str:
    """ε for names and labels: 'inf' for no DP, else compact ('2', '0.5')."""
    return "inf" if math.isinf(eps) else f"{eps:g}"


def default_run_name(strategy: str, eps: float, seed: int, now: datetime | None = None) -> str:
    """`<strategy>-eps<ε>-seed<seed>-<UTC timestamp>`: sortable and unique per launch."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{strategy}-eps{format_eps(eps)}-seed{seed}-{stamp}"


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(data: Any) -> str:
    """JSON with inf written as the string "inf" (strict JSON has no infinity)."""
    return json.dumps(_finite(data), indent=2, default=_json_default) + "\n"


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, Mapping):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def write_json(path: Path, data: Any) -> None:
    """Atomically write `data` as JSON."""
    atomic_write_text(path, to_json(data))


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text with a header; missing cells are empty, extra keys are an error."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class FolderLocked(RuntimeError):
    """Another live process writes this folder: the message names it."""


class FolderLock:
    """One writer per results folder: an exclusive `flock` on a lock file naming its holder.

    The kernel drops the lock when its holder dies, however it dies, so a stale lock is
    simply taken over; the file's text (PID and command line) only names a live holder.
    """

    def __init__(self, path: Path, what: str) -> None:
        """`path`: the lock file; `what`: how the refusal names the folder."""
        self.path, self.what = Path(path), what
        self._fh: Any = None

    def acquire(self) -> FolderLock:
        """Take the lock or raise FolderLocked with the holder's PID and command."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise FolderLocked(
                f"{self.what} is being written by {holder}; wait for it to end or stop it"
            ) from None
        fh.seek(0)
        fh.truncate()
        command = Path(f"/proc/{os.getpid()}/cmdline").read_bytes().replace(b"\0", b" ")
        fh.write(f"PID {os.getpid()} ({command.decode(errors='replace').strip()})\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        """Give the lock up (closing the file drops it)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> FolderLock:
        """Acquire."""
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        """Release."""
        self.release()


class RunFiles:
    """The folder of one run; every write is atomic."""

    def __init__(
        self, folder: Path, columns: Sequence[str] = ROUND_COLUMNS, *, lock: bool = False
    ) -> None:
        """Claim `folder`; a folder holding a completed run is never overwritten.

        With `lock` (the ServerApp), the folder has one writer until `finish`/`discard`: a
        second run with the same run-name, say a leftover of a killed sweep, is refused.
        """
        self.folder = folder
        self.columns = list(columns)
        self.rows: list[dict[str, Any]] = []
        self.lock = FolderLock(folder.parent / f".{folder.name}.lock", f"run folder {folder}")
        if lock:
            self.lock.acquire()
        if is_completed(folder):
            self.lock.release()
            raise FileExistsError(
                f"{folder} already holds a completed run; choose another run-name"
            )

    def start(self, config: Mapping[str, Any]) -> None:
        """Clear what an interrupted run left and write the resolved config.

        Less `results-dir`: where the folder lives is where config.json is, and an absolute
        path of the machine that ran it would tie the folder to that machine.
        """
        if self.folder.exists():
            shutil.rmtree(self.folder)
        write_json(self.folder / CONFIG, {k: v for k, v in config.items() if k != "results-dir"})

    def add_round(self, row: Mapping[str, Any]) -> None:
        """Append one round and rewrite `rounds.csv` atomically.

        A key outside the columns is a bug (a diagnostic that would silently vanish).
        """
        if extra := sorted(set(row) - set(self.columns)):
            raise ValueError(f"round row has keys outside rounds.csv's columns: {extra}")
        self.rows.append({c: row.get(c, "") for c in self.columns})
        atomic_write_text(self.folder / ROUNDS, csv_text(self.rows, self.columns))

    def discard(self) -> None:
        """Remove the folder of a run that was refused before it trained anything."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.lock.release()

    def finish(self, summary: RunSummary | Mapping[str, Any]) -> None:
        """Write `summary.json` last: its presence with status completed marks the run done."""
        data = summary.to_dict() if isinstance(summary, RunSummary) else dict(summary)
        write_json(self.folder / SUMMARY, data)
        self.lock.release()


def _number(value: Any) -> Any:
    """A float field as read back: `to_json` wrote inf and nan as strings."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


# Fields that `to_json` may have written as the strings "inf" or "nan".
_FLOAT_FIELDS = (
    "final_accuracy",
    "final_node_accuracy",
    "final_loss",
    "initial_accuracy",
    "eps_target",
    "eps_spent",
    "wall_s",
)


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """`summary.json`: how a run ended, its final numbers, its privacy, its strategy.

    A failed run's summary holds only `status` ("failed") and `error`.
    """

    status: str  # completed | incomplete | failed
    run_name: str | None = None
    strategy: str | None = None
    rounds_completed: int = 0
    final_accuracy: float | None = None
    # What a node actually holds: the global model (FedAvg) or its own (gossip).
    final_node_accuracy: float | None = None
    # First round whose evaluated model had a non-finite loss (None: never).
    diverged_at_round: int | None = None
    final_loss: float | None = None
    initial_accuracy: float | None = None
    eps_target: float | None = None
    eps_spent: float = 0.0
    wall_s: float | None = None
    num_nodes: int | None = None
    privacy: dict[str, Any] = field(default_factory=dict)
    # From the strategy's `run_summary()`: how models were combined; gossip's graph.
    aggregation: str | None = None
    topology: dict[str, Any] | None = None
    # An audit run (canaries in the nodes' data): its settings and where audit.json is.
    audit: dict[str, Any] | None = None
    # Gossip: ε against each observer by graph distance, and the server's (network_privacy.json).
    network_privacy: dict[str, Any] | None = None
    # Run-config `device`, the server's resolved device and the nodes' (counted by device).
    devices: dict[str, Any] | None = None
    error: str | None = None  # failed runs only: "<ExceptionType>: <message>"

    @classmethod
    def failed(cls, err: BaseException) -> RunSummary:
        """The summary of a run stopped by `err`."""
        return cls(status="failed", error=f"{type(err).__name__}: {err}")

    @property
    def completed(self) -> bool:
        """Whether the run trained every round it was configured for."""
        return self.status == "completed"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: no `topology` without one, nothing but the error for a failure."""
        if self.error is not None:
            return {"status": self.status, "error": self.error}
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        del out["error"]
        for optional in ("topology", "audit", "network_privacy", "devices"):
            if out[optional] is None:
                del out[optional]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSummary:
        """Read a summary back; keys older files lack default, unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values |= {k: _number(values[k]) for k in _FLOAT_FIELDS if k in values}
        values.setdefault("status", "unknown")
        return cls(**values)

    @classmethod
    def read(cls, folder: Path) -> RunSummary | None:
        """The summary in `folder`, or None when it is missing or unreadable."""
        try:
            data = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return cls.from_dict(data) if isinstance(data, Mapping) else None


def is_completed(folder: Path) -> bool:
    """Whether `folder` holds a run whose summary says it completed (the one such check)."""
    summary = RunSummary.read(folder)
    return summary is not None and summary.completed
