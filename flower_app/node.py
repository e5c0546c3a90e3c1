"""One node's work in a round: its data shard, its privacy plan and policy, (DP-)SGD."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from flower_app.audit import Canaries, make_canaries
from flower_app.config import ConfigError, RunConfig
from flower_app.data import (
    BatchTensorDataset,
    cap,
    load_arrays,
    load_device_data,
    to_tensors,
    validation_split,
)
from flower_app.ledger import Decision, ledger_key
from flower_app.model import build_model
from flower_app.partition import partition_indices
from flower_app.policy import (
    NodePolicy,
    node_run_config,
    policy_lifetime_epsilon,
    refusal,
    resume_mismatch,
    round_steps,
)
from flower_app.privacy import (
    CalibrationError,
    PrivacyLedger,
    plan_ledger,
    plan_update_ledger,
    privatize_update,
)
from flower_app.rng import PrivacyRandomness, privacy_randomness, shuffle_generator
from flower_app.train import train_dp, train_plain

T = TypeVar("T")


@dataclass(frozen=True)
class NodeRound:
    """What a node sends back after local training."""

    state_dict: dict[str, torch.Tensor]
    num_examples: int
    # Mean loss over the round's batches: un-noised, so it never leaves a private node.
    train_loss: float
    ledger: PrivacyLedger | None  # None when eps=inf (no DP)
    round_steps: int = 0  # DP steps this round took
    lifetime_eps: float | None = None  # the node's composed ε over every run it trained in
    num_partitions: int = 0  # the node's node-config num-partitions (0: not reported)


@dataclass(frozen=True)
class Refused:
    """The node's policy refused this round: it trained nothing."""

    reason: str


class LedgerStore(Protocol):
    """Where a node keeps its ledgers: `FileLedger` (durable) or the run's context."""

    def reserve(self, key: str, decide: Callable[[dict[str, PrivacyLedger]], Decision[T]]) -> T:
        """One transaction: `decide` sees every entry; the ledger it returns is recorded."""
        ...


def shard_indices(
    labels: np.ndarray,
    partitioner: str,
    num_partitions: int,
    partition_id: int,
    *,
    seed: int,
    alpha: float,
    shards_per_node: int,
    samples_per_node: int,
    validation_samples: int = 0,
) -> np.ndarray:
    """Indices into the training set of the node's shard.

    The validation split is carved off first and the partitioner sees only the rest, so no
    shard holds a validation example.
    """
    train, _ = validation_split(len(labels), validation_samples)
    parts = partition_indices(
        labels[train],
        partitioner,
        num_partitions,
        seed=seed,
        alpha=alpha,
        shards_per_node=shards_per_node,
    )
    return train[cap(parts[partition_id], samples_per_node, seed + partition_id)]


@lru_cache(maxsize=32)
def node_data(
    dataset: str,
    data_dir: str,
    partitioner: str,
    num_partitions: int,
    partition_id: int,
    seed: int,
    alpha: float,
    shards_per_node: int,
    samples_per_node: int,
    normalize: str = "mean-std",
    audit_canaries: int = 0,
    audit_seed: int = 0,
    validation_samples: int = 0,
) -> BatchTensorDataset:
    """The node's training shard as tensors (cached: loaded once per worker process).

    In an audit run the node's included canaries are appended: extra examples, so they
    count in its n and its privacy plan like any other.
    """
    arrays = load_arrays(dataset, data_dir)
    idx = shard_indices(
        arrays.y_train,
        partitioner,
        num_partitions,
        partition_id,
        seed=seed,
        alpha=alpha,
        shards_per_node=shards_per_node,
        samples_per_node=samples_per_node,
        validation_samples=validation_samples,
    )
    x, y = arrays.x_train[idx], arrays.y_train[idx]
    x, y = _with_canaries(x, y, partition_id, num_partitions, audit_canaries, audit_seed)
    return to_tensors(dataset, x, y, normalize)


@lru_cache(maxsize=4)
def device_data(
    path: str,
    dataset: str,
    normalize: str,
    partition_id: int,
    num_partitions: int,
    audit_canaries: int = 0,
    audit_seed: int = 0,
) -> BatchTensorDataset:
    """A device's own training files, whole (node config `data-dir`), plus its canaries."""
    x, y = load_device_data(path)
    x, y = _with_canaries(x, y, partition_id, num_partitions, audit_canaries, audit_seed)
    return to_tensors(dataset, x, y, normalize)


def _with_canaries(
    x: np.ndarray,
    y: np.ndarray,
    partition_id: int,
    num_partitions: int,
    audit_canaries: int,
    audit_seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The node's examples with its included audit canaries appended (none outside audits)."""
    if not audit_canaries:
        return x, y
    canaries = make_canaries(num_partitions, audit_canaries, audit_seed)
    mine = canaries.of(partition_id)
    return np.concatenate([x, canaries.images[mine]]), np.concatenate([y, canaries.label[mine]])


def shard_for(
    cfg: RunConfig, partition_id: int, num_partitions: int, own_data: str = ""
) -> BatchTensorDataset:
    """The node's training data: its own files (`own_data`), else its cut of the dataset.

    `own_data` is the device's node config `data-dir`; the run's partitioner, caps and
    validation split then do not apply, and `partition_id` is only the node's identity.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id={partition_id} is not valid for num-partitions={num_partitions}"
        )
    if own_data:
        return device_data(
            own_data,
            cfg.dataset,
            cfg.normalize,
            partition_id,
            num_partitions,
            cfg.audit_canaries,
            cfg.audit_seed,
        )
    return node_data(
        cfg.dataset,
        cfg.data_dir,
        cfg.partitioner,
        num_partitions,
        partition_id,
        cfg.seed,
        cfg.alpha,
        cfg.shards_per_node,
        cfg.samples_per_node,
        cfg.normalize,
        cfg.audit_canaries,
        cfg.audit_seed,
        cfg.validation_samples,
    )


def canary_set(cfg: RunConfig, num_partitions: int) -> tuple[Canaries, BatchTensorDataset]:
    """Every node's canaries (in or out) and their images as tensors, for scoring them."""
    canaries = make_canaries(num_partitions, cfg.audit_canaries, cfg.audit_seed)
    return canaries, to_tensors(cfg.dataset, canaries.images, canaries.label, cfg.normalize)


def plan(cfg: RunConfig, num_samples: int) -> PrivacyLedger | None:
    """The node's empty ledger for this run, its noise calibrated for every planned step.

    Raises `ConfigError` (one line) when no noise meets `eps` for this node's plan.
    """
    if not cfg.private:
        return None
    try:
        if cfg.dp_mode == "update":
            return plan_update_ledger(
                target_eps=cfg.eps,
                delta=cfg.delta,
                rounds=cfg.num_server_rounds,
                accounting=cfg.accounting,
                accountant=cfg.accountant,
            )
        return plan_ledger(
            num_samples=num_samples,
            batch_size=cfg.batch_size,
            total_epochs=cfg.num_server_rounds * cfg.local_epochs,
            total_steps=cfg.num_server_rounds * cfg.local_steps,
            target_eps=cfg.eps,
            delta=cfg.delta,
            accountant=cfg.accountant,
        )
    except CalibrationError as err:
        raise ConfigError(str(err)) from None


def local_round(
    cfg: RunConfig,
    *,
    partition_id: int,
    num_partitions: int,
    weights: dict[str, torch.Tensor],
    ledger: PrivacyLedger | None,
    server_round: int,
    own_data: str = "",
) -> NodeRound:
    """Train the received weights on the node's shard (`local-steps` steps or `local-epochs`).

    With DP and no ledger yet, plans one (`plan`). With dp-mode=update the node trains
    without DP, then clips and noises the round's update once (one ledger step); with
    accounting=per-round that σ is the tutorial's uncomposed one and the ledger shows what
    it really costs. The DP noise and Poisson batches come from `privacy_randomness`.
    """
    data = shard_for(cfg, partition_id, num_partitions, own_data)
    if ledger is None:
        ledger = plan(cfg, len(data))
    model = build_model(cfg.model)
    model.load_state_dict(weights, strict=True)
    if ledger is None:
        loss = _round_plain(cfg, model, data, shuffle_generator(cfg, partition_id, server_round))
        return NodeRound(_detached(model), len(data), loss, None, num_partitions=num_partitions)
    rand = privacy_randomness(cfg, partition_id, server_round)
    if cfg.dp_mode == "update":
        shuffle = shuffle_generator(cfg, partition_id, server_round)
        loss, steps = _round_update(cfg, model, data, weights, ledger, shuffle, rand)
    else:
        loss, steps = _round_sample(cfg, model, data, ledger, rand)
    return NodeRound(
        _detached(model),
        len(data),
        loss,
        ledger.after(steps),
        steps,
        num_partitions=num_partitions,
    )


def _sgd(cfg: RunConfig) -> dict[str, Any]:
    """The SGD knobs every mode trains with."""
    return dict(
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
    )


def _round_plain(
    cfg: RunConfig, model: torch.nn.Module, data: BatchTensorDataset, shuffle: torch.Generator
) -> float:
    """No DP (eps=inf): plain SGD; the mean training loss."""
    return train_plain(model, data, generator=shuffle, **_sgd(cfg)).loss


def _round_update(
    cfg: RunConfig,
    model: torch.nn.Module,
    data: BatchTensorDataset,
    weights: dict[str, torch.Tensor],
    ledger: PrivacyLedger,
    shuffle: torch.Generator,
    rand: PrivacyRandomness,
) -> tuple[float, int]:
    """dp-mode=update: plain SGD, then the round's update clipped and noised once (1 step)."""
    loss = _round_plain(cfg, model, data, shuffle)
    private, _ = privatize_update(
        weights,
        model.state_dict(),
        clip=cfg.max_grad_norm,
        noise_multiplier=ledger.noise_multiplier,
        noise=rand.noise,
    )
    model.load_state_dict(private)
    return loss, 1


def _round_sample(
    cfg: RunConfig,
    model: torch.nn.Module,
    data: BatchTensorDataset,
    ledger: PrivacyLedger,
    rand: PrivacyRandomness,
) -> tuple[float, int]:
    """dp-mode=sample: Opacus DP-SGD; the loss and the DP steps it took."""
    result = train_dp(
        model,
        data,
        ledger,
        max_grad_norm=cfg.max_grad_norm,
        grad_sample_mode=cfg.opacus_mode,
        randomness=rand,
        **_sgd(cfg),
    )
    return result.loss, result.steps


def _detached(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class _Reserved:
    """What `serve_train`'s ledger transaction decided: the run's ledger before the round."""

    ledger: PrivacyLedger | None
    steps: int
    others: list[PrivacyLedger]
    reason: str | None


def serve_train(
    cfg: RunConfig,
    policy: NodePolicy,
    store: LedgerStore,
    *,
    run_id: str,
    partition_id: int,
    num_partitions: int,
    weights: dict[str, torch.Tensor],
    server_round: int,
    own_data: str = "",
) -> NodeRound | Refused:
    """One train message, as a node that guards its own privacy answers it.

    With a policy the run's `data-dir` is ignored (`node_run_config`). In one ledger
    transaction (`store.reserve`) it plans the run's ledger once (or resumes its entry), checks
    the node's policy, the plan and δ (`policy.refusal`) and writes the round's steps BEFORE
    training; then trains. A refused round trains nothing and spends nothing.
    """
    cfg = node_run_config(policy, cfg)
    data = shard_for(cfg, partition_id, num_partitions, own_data)
    key = ledger_key(run_id, partition_id)

    def decide(runs: dict[str, PrivacyLedger]) -> Decision[_Reserved]:
        planned = plan(cfg, len(data))
        ledger = runs.get(key) or planned
        steps = round_steps(cfg, ledger) if ledger is not None else 0
        others = [led for k, led in runs.items() if k != key]
        reason = resume_mismatch(runs.get(key), planned) or refusal(
            policy, cfg, num_samples=len(data), ledger=ledger, other_runs=others, steps=steps
        )
        spend = ledger.after(steps) if ledger is not None and reason is None else None
        return spend, _Reserved(ledger, steps, others, reason)

    got = store.reserve(key, decide)
    if got.reason is not None:
        return Refused(got.reason)
    out = local_round(
        cfg,
        partition_id=partition_id,
        num_partitions=num_partitions,
        weights=weights,
        ledger=got.ledger,
        server_round=server_round,
        own_data=own_data,
    )
    if got.ledger is None:
        return out
    if out.round_steps != got.steps:
        raise RuntimeError(
            f"the round took {out.round_steps} DP steps, {got.steps} were recorded: privacy "
            "accounting would be wrong"
        )
    return replace(out, lifetime_eps=policy_lifetime_epsilon(policy, [*got.others, out.ledger]))
