"""One node's round: its privacy plan, policy and ledger, then (DP-)SGD on its shard."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from flower_app.config import ConfigError, RunConfig
from flower_app.data import BatchTensorDataset
from flower_app.device import check_on, data_on, resolve_device
from flower_app.ledger import Decision, ledger_key
from flower_app.model import model_for
from flower_app.network_calibration import NetworkPlan, node_network_plan
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
from flower_app.shards import ShardSpec, load_shard
from flower_app.train import train_dp, train_plain
from flower_app.whitebox_audit import draw_plan, insert_canaries, project

log = logging.getLogger(__name__)

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
    device: str = "cpu"  # where it trained: run-config `device` resolved on this node
    # A white-box audit: the release minus the model trained from, along every canary.
    canary_increments: np.ndarray | None = None


@dataclass(frozen=True)
class Refused:
    """The node's policy refused this round: it trained nothing."""

    reason: str


class LedgerStore(Protocol):
    """Where a node keeps its ledgers: `FileLedger` (durable) or the run's context."""

    def reserve(self, key: str, decide: Callable[[dict[str, PrivacyLedger]], Decision[T]]) -> T:
        """One transaction: `decide` sees every entry; the ledger it returns is recorded."""
        ...


def plan(
    cfg: RunConfig, num_samples: int, *, network: NetworkPlan | None = None
) -> PrivacyLedger | None:
    """The node's empty ledger for this run, its noise calibrated for every planned step.

    With privacy-unit=network, σ is `network`'s (`network_plan`, which the node computes
    itself from the run config and its num-partitions). Raises `ConfigError` (one line) when
    no noise meets `eps` for this node's plan.
    """
    if not cfg.private:
        return None
    if (cfg.privacy_unit == "network") != (network is not None):
        raise ValueError("a privacy-unit=network plan needs its NetworkPlan, and only it")
    if network is not None:
        sigma, rounds = network.noise_multiplier, cfg.num_server_rounds
        return PrivacyLedger(sigma, 1.0, 0, cfg.delta, cfg.accountant, rounds, "update")
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
    """A round from nothing computed yet (tests, fl-bench): load the shard, plan, train.

    With DP and no ledger yet, plans one (`plan`); then `train_round`.
    """
    spec = ShardSpec.of(cfg, partition_id, num_partitions, own_data)
    data = load_shard(spec)
    if ledger is None:
        ledger = plan(cfg, len(data))
    return train_round(
        cfg, spec=spec, data=data, weights=weights, ledger=ledger, server_round=server_round
    )


def train_round(
    cfg: RunConfig,
    *,
    spec: ShardSpec,
    data: BatchTensorDataset,
    weights: dict[str, torch.Tensor],
    ledger: PrivacyLedger | None,
    server_round: int,
) -> NodeRound:
    """Train the received weights on the node's shard (`local-steps` steps or `local-epochs`).

    `data` is the shard `spec` names, `ledger` the run's ledger before this round (None: no
    DP). With dp-mode=update the node trains without DP, then clips and noises the round's
    update once (one ledger step); with accounting=per-round that σ is the tutorial's
    uncomposed one and the ledger shows what it really costs. The DP noise and Poisson
    batches come from `privacy_randomness`, on the CPU, whatever `device` resolves to here.
    """
    if ledger is None and cfg.private:
        raise RuntimeError("a private run reached training without a ledger: not training")
    pid = spec.partition_id
    device = resolve_device(cfg.device)  # this node's hardware; DeviceError: one line
    model = model_for(cfg).to(device)
    model.load_state_dict(weights, strict=True)
    check_on(model, device)
    data = data_on(device, data)  # once per round, not once per batch
    if ledger is None:
        loss = _round_plain(cfg, model, data, shuffle_generator(cfg, pid, server_round))
        inc = _whitebox(cfg, spec, weights, model)
        return NodeRound(
            _detached(model),
            len(data),
            loss,
            None,
            num_partitions=spec.num_partitions,
            device=str(device),
            canary_increments=inc,
        )
    rand = privacy_randomness(cfg, pid, server_round)
    if cfg.dp_mode == "update":
        shuffle = shuffle_generator(cfg, pid, server_round)
        loss, steps = _round_update(cfg, model, data, weights, ledger, shuffle, rand)
    else:
        loss, steps = _round_sample(cfg, model, data, ledger, rand)
    inc = _whitebox(cfg, spec, weights, model)
    return NodeRound(
        _detached(model),
        len(data),
        loss,
        ledger.after(steps),
        steps,
        num_partitions=spec.num_partitions,
        device=str(device),
        canary_increments=inc,
    )


def _flat(state: dict[str, torch.Tensor], keys: list[str]) -> np.ndarray:
    return np.concatenate([state[k].detach().double().cpu().numpy().ravel() for k in keys])


def _whitebox(
    cfg: RunConfig, spec: ShardSpec, start: dict[str, torch.Tensor], model: torch.nn.Module
) -> np.ndarray | None:
    """A white-box audit: the node's included canaries added to its release, C each.

    Only in a run whose audit the node's policy allowed (`policy.refusal` ran before). Added
    after clipping and noise, the same release as before the noise
    (`flower_app/whitebox_audit.py`). Returns the release minus `start` along every canary.
    """
    if not cfg.whitebox_audit:
        return None
    end = model.state_dict()
    keys = [k for k, v in end.items() if torch.is_floating_point(v)]
    released = _flat(end, keys)
    plan = draw_plan(spec.num_partitions, cfg.audit_canaries, released.size, cfg.audit_seed)
    released = insert_canaries(released, plan, spec.partition_id, cfg.max_grad_norm)
    parts = np.split(released, np.cumsum([end[k].numel() for k in keys])[:-1])
    model.load_state_dict(
        {
            k: torch.from_numpy(p.reshape(end[k].shape)).to(end[k].dtype)
            for k, p in zip(keys, parts, strict=True)
        },  # fmt: skip
        strict=False,
    )
    return project(_flat(model.state_dict(), keys) - _flat(start, keys), plan)


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
    # On the CPU, as the noise is drawn: one float64 sum per round, the same on any device.
    private, norm = privatize_update(
        weights,
        _detached(model),
        clip=cfg.max_grad_norm,
        noise_multiplier=ledger.noise_multiplier,
        noise=rand.noise,
    )
    if not math.isfinite(norm):  # this node's log only: the release says nothing of it
        log.warning("local training diverged (update not finite): released noise alone")
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
    """The model's weights on the CPU: what the reply carries, whatever it trained on."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


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

    Each step takes what the one before computed: shard (`ShardSpec`, with a policy the
    run's `data-dir` ignored: `node_run_config`) → the run's plan for that shard (with
    privacy-unit=network, from the schedule the node redraws itself) → one ledger
    transaction (`store.reserve`) that resumes the run's entry or starts the plan, checks the
    node's policy, the plan and δ (`policy.refusal`) and writes the round's steps BEFORE
    training → `train_round`. A refused round trains nothing and spends nothing.
    """
    cfg = node_run_config(policy, cfg)
    resolve_device(cfg.device)  # a device this node lacks: refused before anything is spent
    spec = ShardSpec.of(cfg, partition_id, num_partitions, own_data)
    data = load_shard(spec)
    network = node_network_plan(cfg, num_partitions)
    planned = plan(cfg, len(data), network=network)
    key = ledger_key(run_id, partition_id)

    def decide(runs: dict[str, PrivacyLedger]) -> Decision[_Reserved]:
        ledger = runs.get(key) or planned
        steps = round_steps(cfg, ledger) if ledger is not None else 0
        others = [led for k, led in runs.items() if k != key]
        reason = resume_mismatch(runs.get(key), planned) or refusal(
            policy,
            cfg,
            num_samples=len(data),
            ledger=ledger,
            other_runs=others,
            steps=steps,
            network=network,
        )
        spend = ledger.after(steps) if ledger is not None and reason is None else None
        return spend, _Reserved(ledger, steps, others, reason)

    got = store.reserve(key, decide)
    if got.reason is not None:
        return Refused(got.reason)
    out = train_round(
        cfg, spec=spec, data=data, weights=weights, ledger=got.ledger, server_round=server_round
    )
    if got.ledger is None:
        return out
    if out.round_steps != got.steps:
        raise RuntimeError(
            f"the round took {out.round_steps} DP steps, {got.steps} were recorded: privacy "
            "accounting would be wrong"
        )
    return replace(out, lifetime_eps=policy_lifetime_epsilon(policy, [*got.others, out.ledger]))
