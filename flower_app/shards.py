"""A node's training shard: what identifies it (`ShardSpec`), its indices, its tensors."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from flower_app.audit import Canaries, make_canaries
from flower_app.config import RunConfig
from flower_app.data import (
    BatchTensorDataset,
    cap,
    load_arrays,
    load_device_data,
    to_tensors,
    validation_split,
)
from flower_app.partition import partition_indices


@dataclass(frozen=True)
class ShardSpec:
    """Everything that decides which examples one node trains on, and how they are scaled.

    Frozen and hashable: one spec is one cached shard (`load_shard`). `own_data` is the
    device's node config `data-dir`: its files are then the whole shard, and the run's
    dataset folder, partitioner, caps and validation split do not apply (`of` leaves them
    empty; `partition_id` stays the node's identity, which picks its audit canaries).
    """

    dataset: str
    normalize: str
    partition_id: int
    num_partitions: int
    own_data: str
    data_dir: str
    partitioner: str
    seed: int
    alpha: float
    shards_per_node: int
    samples_per_node: int
    validation_samples: int
    audit_canaries: int
    audit_seed: int

    @classmethod
    def of(
        cls, cfg: RunConfig, partition_id: int, num_partitions: int, own_data: str = ""
    ) -> ShardSpec:
        """The shard of partition `partition_id` of `num_partitions` under the run config."""
        if not 0 <= partition_id < num_partitions:
            raise ValueError(
                f"partition-id={partition_id} is not valid for num-partitions={num_partitions}"
            )
        # A device's own files are its whole shard: how the run cuts the dataset is then no
        # part of what identifies (and caches) it.
        cut = not own_data
        return cls(
            dataset=cfg.dataset,
            normalize=cfg.normalize,
            partition_id=partition_id,
            num_partitions=num_partitions,
            own_data=own_data,
            data_dir=cfg.data_dir if cut else "",
            partitioner=cfg.partitioner if cut else "",
            seed=cfg.seed if cut else 0,
            alpha=cfg.alpha if cut else 0.0,
            shards_per_node=cfg.shards_per_node if cut else 0,
            samples_per_node=cfg.samples_per_node if cut else 0,
            validation_samples=cfg.validation_samples if cut else 0,
            # A white-box audit's canaries are in the update, not in the data.
            audit_canaries=0 if cfg.whitebox_audit else cfg.audit_canaries,
            audit_seed=cfg.audit_seed,
        )


def shard_indices(labels: np.ndarray, spec: ShardSpec) -> np.ndarray:
    """Indices into the training set (of `labels`) of the node's shard.

    The validation split is carved off first and the partitioner sees only the rest, so no
    shard holds a validation example.
    """
    train, _ = validation_split(len(labels), spec.validation_samples)
    parts = partition_indices(
        labels[train],
        spec.partitioner,
        spec.num_partitions,
        seed=spec.seed,
        alpha=spec.alpha,
        shards_per_node=spec.shards_per_node,
    )
    pid = spec.partition_id
    return train[cap(parts[pid], spec.samples_per_node, spec.seed + pid)]


@lru_cache(maxsize=32)
def load_shard(spec: ShardSpec) -> BatchTensorDataset:
    """The node's training data as tensors (cached: loaded once per worker process).

    Its own files (`own_data`), else its cut of the dataset. In an audit run the node's
    included canaries are appended: extra examples, so they count in its n and its privacy
    plan like any other.
    """
    if spec.own_data:
        x, y = load_device_data(spec.own_data)
    else:
        arrays = load_arrays(spec.dataset, spec.data_dir)
        idx = shard_indices(arrays.y_train, spec)
        x, y = arrays.x_train[idx], arrays.y_train[idx]
    x, y = _with_canaries(x, y, spec)
    return to_tensors(spec.dataset, x, y, spec.normalize)


def _with_canaries(x: np.ndarray, y: np.ndarray, spec: ShardSpec) -> tuple[np.ndarray, np.ndarray]:
    """The node's examples with its included audit canaries appended (none outside audits)."""
    if not spec.audit_canaries:
        return x, y
    canaries = make_canaries(spec.num_partitions, spec.audit_canaries, spec.audit_seed)
    mine = canaries.of(spec.partition_id)
    return np.concatenate([x, canaries.images[mine]]), np.concatenate([y, canaries.label[mine]])


def shard_for(
    cfg: RunConfig, partition_id: int, num_partitions: int, own_data: str = ""
) -> BatchTensorDataset:
    """The training data of partition `partition_id` under `cfg` (`ShardSpec.of`, then loaded)."""
    return load_shard(ShardSpec.of(cfg, partition_id, num_partitions, own_data))


def canary_set(cfg: RunConfig, num_partitions: int) -> tuple[Canaries, BatchTensorDataset]:
    """Every node's canaries (in or out) and their images as tensors, for scoring them."""
    canaries = make_canaries(num_partitions, cfg.audit_canaries, cfg.audit_seed)
    return canaries, to_tensors(cfg.dataset, canaries.images, canaries.label, cfg.normalize)
