"""Non-IID partitioning of a label array across nodes, with flwr-datasets partitioners.

The partitioners run over a tiny Hugging Face dataset of (index, label) rows, so each
node gets back indices into the in-memory arrays instead of a copy of the images.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flower_app.config import ConfigError
from flower_app.disk_cache import CACHE_ROOT

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

# Partitions are cached on disk: computing them (and importing Hugging Face datasets to do
# so) cost every simulation worker several seconds at the start of every run.
CACHE_DIR = CACHE_ROOT / "partitions"

PARTITIONERS = ("dirichlet", "iid", "shards")
# A node needs at least this many samples for DP-SGD's sampling rate to mean anything.
MIN_PARTITION_SIZE = 10


def make_partitioner(
    name: str, num_partitions: int, *, seed: int, alpha: float, shards_per_node: int
) -> Partitioner:
    """The flwr-datasets partitioner that `partitioner=<name>` stands for."""
    from flwr_datasets.partitioner import (  # slow import: only when not cached
        DirichletPartitioner,
        IidPartitioner,
        ShardPartitioner,
    )

    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=MIN_PARTITION_SIZE,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "shards":
        # The FedAvg paper's pathological split: sort by label, cut equal shards, deal
        # `shards_per_node` random shards to each node.
        return ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=shards_per_node,
            shuffle=True,
            seed=seed,
        )
    raise ConfigError(
        f"partitioner={name!r} is not valid; choose one of: {', '.join(PARTITIONERS)}"
    )


def partition_indices(
    labels: np.ndarray,
    name: str,
    num_partitions: int,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_node: int = 2,
) -> list[np.ndarray]:
    """Indices of each partition's samples; deterministic in `seed`, disjoint."""
    return list(
        _partition_indices_cached(
            labels.tobytes(), name, num_partitions, seed, alpha, shards_per_node
        )
    )


@lru_cache(maxsize=4)
def _partition_indices_cached(
    label_bytes: bytes,
    name: str,
    num_partitions: int,
    seed: int,
    alpha: float,
    shards_per_node: int,
) -> tuple[np.ndarray, ...]:
    args = f"{name}|{num_partitions}|{seed}|{alpha!r}|{shards_per_node}".encode()
    key = hashlib.sha256(label_bytes + args).hexdigest()[:24]
    path = CACHE_DIR / f"{key}.npz"
    try:
        with np.load(path) as stored:
            return tuple(stored[f"p{i}"] for i in range(num_partitions))
    except (OSError, KeyError, ValueError):
        pass  # not cached yet (or unreadable): compute
    labels = np.frombuffer(label_bytes, dtype=np.int64)
    parts = _compute_partitions(labels, name, num_partitions, seed, alpha, shards_per_node)
    _store(path, parts)
    return parts


def _store(path: Path, parts: tuple[np.ndarray, ...]) -> None:
    """Write atomically, so concurrent workers never read half a file; best effort."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    except OSError:
        return  # a read-only home only costs the recomputation
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **{f"p{i}": p for i, p in enumerate(parts)})
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def _compute_partitions(
    labels: np.ndarray,
    name: str,
    num_partitions: int,
    seed: int,
    alpha: float,
    shards_per_node: int,
) -> tuple[np.ndarray, ...]:
    import datasets  # slow import: only when not cached

    if num_partitions < 1:
        raise ConfigError(f"num-partitions={num_partitions} is not valid; expected >= 1")
    if len(labels) < num_partitions * MIN_PARTITION_SIZE:
        raise ConfigError(
            f"{len(labels)} samples cannot be split into {num_partitions} partitions of at "
            f"least {MIN_PARTITION_SIZE}; use fewer nodes"
        )
    table = datasets.Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels})
    if name == "iid":
        table = table.shuffle(seed=seed)
    partitioner = make_partitioner(
        name, num_partitions, seed=seed, alpha=alpha, shards_per_node=shards_per_node
    )
    partitioner.dataset = table
    try:
        parts = tuple(
            np.asarray(partitioner.load_partition(pid)["idx"], dtype=np.int64)
            for pid in range(num_partitions)
        )
    except ValueError as err:  # e.g. Dirichlet cannot meet the minimum size at tiny alpha
        raise ConfigError(f"partitioner={name} failed for {num_partitions} nodes: {err}") from None
    return parts


def label_histogram(labels: np.ndarray, indices: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """How many samples of each class a partition holds."""
    return np.bincount(labels[indices], minlength=num_classes)
