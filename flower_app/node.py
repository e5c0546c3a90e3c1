"""One node's work in a round: its data shard, its ledger, a round of (DP-)SGD."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from flower_app.config import RunConfig
from flower_app.data import BatchTensorDataset, cap, load_arrays, to_tensors
from flower_app.model import build_model
from flower_app.partition import partition_indices
from flower_app.privacy import PrivacyLedger, plan_ledger, plan_update_ledger, privatize_update
from flower_app.train import train_dp, train_plain


@dataclass(frozen=True)
class NodeRound:
    """What a node sends back after local training."""

    state_dict: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    ledger: PrivacyLedger | None  # None when eps=inf (no DP)


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
) -> BatchTensorDataset:
    """The node's training shard as tensors (cached: loaded once per worker process)."""
    arrays = load_arrays(dataset, data_dir)
    parts = partition_indices(
        arrays.y_train,
        partitioner,
        num_partitions,
        seed=seed,
        alpha=alpha,
        shards_per_node=shards_per_node,
    )
    idx = cap(parts[partition_id], samples_per_node, seed + partition_id)
    return to_tensors(dataset, arrays.x_train[idx], arrays.y_train[idx], normalize)


def shard_for(cfg: RunConfig, partition_id: int, num_partitions: int) -> BatchTensorDataset:
    """`node_data` for the run config."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id={partition_id} is not valid for num-partitions={num_partitions}"
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
    )


def local_round(
    cfg: RunConfig,
    *,
    partition_id: int,
    num_partitions: int,
    weights: dict[str, torch.Tensor],
    ledger: PrivacyLedger | None,
    server_round: int,
) -> NodeRound:
    """Train the received weights on the node's shard for `local-epochs` epochs.

    With DP, the first round plans the node's ledger: noise calibrated for every epoch of
    the whole run, so the ε after the last round meets `eps`. With dp-mode=update the node
    trains without DP, then clips and noises the round's update once (one ledger step);
    with accounting=per-round that σ is the tutorial's uncomposed one and the ledger shows
    what it really costs.
    """
    data = shard_for(cfg, partition_id, num_partitions)
    model = build_model(cfg.model)
    model.load_state_dict(weights, strict=True)
    gen = torch.Generator().manual_seed(
        int(np.random.SeedSequence([cfg.seed, partition_id, server_round]).generate_state(1)[0])
    )
    torch.manual_seed(int(gen.initial_seed()))  # Opacus draws its noise from the global RNG
    common = dict(
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        generator=gen,
    )
    if not cfg.private:
        result = train_plain(model, data, **common)
    elif cfg.dp_mode == "update":
        if ledger is None:
            ledger = plan_update_ledger(
                target_eps=cfg.eps,
                delta=cfg.delta,
                rounds=cfg.num_server_rounds,
                accounting=cfg.accounting,
                accountant=cfg.accountant,
            )
        result = train_plain(model, data, **common)
        noise_gen = torch.Generator().manual_seed(
            int(
                np.random.SeedSequence([cfg.seed, partition_id, server_round, 1]).generate_state(1)[
                    0
                ]
            )
        )
        private, _ = privatize_update(
            weights,
            model.state_dict(),
            clip=cfg.max_grad_norm,
            noise_multiplier=ledger.noise_multiplier,
            generator=noise_gen,
        )
        model.load_state_dict(private)
        ledger = ledger.after(1)
    else:
        if ledger is None:
            ledger = plan_ledger(
                num_samples=len(data),
                batch_size=cfg.batch_size,
                total_epochs=cfg.num_server_rounds * cfg.local_epochs,
                target_eps=cfg.eps,
                delta=cfg.delta,
                accountant=cfg.accountant,
            )
        result = train_dp(
            model,
            data,
            ledger,
            max_grad_norm=cfg.max_grad_norm,
            grad_sample_mode=cfg.opacus_mode,
            **common,
        )
        ledger = ledger.after(result.steps)
    return NodeRound(
        state_dict={k: v.detach() for k, v in model.state_dict().items()},
        num_examples=len(data),
        train_loss=result.loss,
        ledger=ledger,
    )
