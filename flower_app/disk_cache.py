"""A small on-disk memo for pure functions whose results are JSON: atomic, best effort.

Used where a value is a pure function of its inputs but costs enough to matter once per
node per run (e.g. the calibrated noise multiplier). Callers must treat a hit as untrusted
input and check it: the file is only as trustworthy as the folder it lives in.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CACHE_ROOT = Path(
    os.environ.get("FLOWER_DP_GOSSIP_CACHE", Path.home() / ".cache" / "flower-dp-gossip")
)


def _path(kind: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return CACHE_ROOT / kind / f"{digest}.json"


def load(kind: str, key: dict[str, Any]) -> Any | None:
    """The value stored for `key`, or None (absent, unreadable or for another key)."""
    try:
        stored = json.loads(_path(kind, key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    return stored.get("value")


def store(kind: str, key: dict[str, Any], value: Any) -> None:
    """Write atomically, so concurrent workers never read half a file; best effort.

    A read-only home only costs the recomputation.
    """
    path = _path(kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"key": key, "value": value}, fh)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
