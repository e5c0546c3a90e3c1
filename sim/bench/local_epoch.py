"""One local epoch, timed: plain SGD against every Opacus mode, and its keyed randomness.

Each mode is also checked: against `hooks` with the noise off (the same clipped update),
and on a shard small enough that Poisson sampling draws empty batches.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from flower_app.config import GRAD_SAMPLE_MODES, RunConfig
from flower_app.data import to_tensors
from flower_app.model import build_model
from flower_app.privacy import plan_ledger
from flower_app.rng import PrivacyRandomness
from flower_app.shards import shard_for
from flower_app.train import train_dp, train_plain


def epoch_ratios(cfg: RunConfig, repeats: int) -> dict[str, dict[str, float]]:
    """Seconds of one local epoch per mode (min over repeats) and the ratio to plain SGD.

    Every mode is also run with the noise off from the same start and the same Poisson
    batches, and its result compared with `hooks`: a fast mode must compute the same
    clipped update.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each simulated node trains
    try:
        data = shard_for(cfg, 0, 20)
        common = {"epochs": 1, "batch_size": cfg.batch_size, "lr": cfg.lr, "momentum": 0.0}
        ledger = plan_ledger(
            num_samples=len(data),
            batch_size=cfg.batch_size,
            total_epochs=20,
            target_eps=8.0,
            delta=cfg.delta,
            accountant="rdp",
        )
        times: dict[str, list[float]] = {m: [] for m in ("plain", *GRAD_SAMPLE_MODES)}
        for _ in range(repeats):  # interleaved, so drifting load hits every mode alike
            for mode in times:
                model = build_model(cfg.model, seed=0)
                gen = torch.Generator().manual_seed(0)
                t0 = time.perf_counter()
                if mode == "plain":
                    train_plain(model, data, generator=gen, **common)
                else:
                    train_dp(
                        model,
                        data,
                        ledger,
                        max_grad_norm=cfg.max_grad_norm,
                        grad_sample_mode=mode,
                        randomness=PrivacyRandomness.replayable(0),
                        **common,
                    )
                times[mode].append(time.perf_counter() - t0)
        plain = min(times["plain"])
        reference = _noiseless_update(cfg, data, "hooks")
        out: dict[str, dict[str, Any]] = {"plain": {"s": plain, "ratio": 1.0}}
        for mode in GRAD_SAMPLE_MODES:
            diff = float(
                max(
                    (a - b).abs().max()
                    for a, b in zip(reference, _noiseless_update(cfg, data, mode), strict=True)
                )
            )
            out[mode] = {
                "s": min(times[mode]),
                "ratio": min(times[mode]) / plain,
                "diff": diff,
                "empty_batches_ok": _survives_empty_batches(cfg, mode),
            }
        return out
    finally:
        torch.set_num_threads(threads)


def keyed_randomness(cfg: RunConfig, repeats: int) -> dict[str, float]:
    """Seconds one DP epoch spends drawing its keyed randomness, and one DP epoch's seconds.

    The randomness is what `train_dp` draws per step (a Poisson mask over the shard and a
    Gaussian per parameter, from `flower_app.rng`), timed alone; the epoch is the default
    mode's whole DP epoch (randomness included). Min over repeats, one torch thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = shard_for(cfg, 0, 20)
        ledger = plan_ledger(num_samples=len(data), batch_size=cfg.batch_size, total_epochs=20,
                             target_eps=8.0, delta=cfg.delta, accountant="rdp")  # fmt: skip
        params = [p for p in build_model(cfg.model).parameters()]
        steps = round(1 / ledger.sample_rate)
        draw, epoch = [], []
        for _ in range(repeats):
            rand = PrivacyRandomness.fresh()
            t0 = time.perf_counter()
            for _ in range(steps):
                rand.sampling.bernoulli(len(data), ledger.sample_rate)
                rand.noise.gaussians(1.0, params)
            draw.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            train_dp(build_model(cfg.model, seed=0), data, ledger, epochs=1,
                     batch_size=cfg.batch_size, lr=cfg.lr, momentum=0.0,
                     max_grad_norm=cfg.max_grad_norm, grad_sample_mode=cfg.opacus_mode)  # fmt: skip
            epoch.append(time.perf_counter() - t0)
        return {"randomness_s": min(draw), "dp_epoch_s": min(epoch), "steps": steps,
                "share": min(draw) / min(epoch)}  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _survives_empty_batches(cfg: RunConfig, mode: str) -> bool:
    """Poisson sampling draws empty batches on small shards; a correct mode must train on."""
    rng = np.random.default_rng(0)
    data = to_tensors(
        "fashion-mnist",
        rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 100).astype(np.int64),
    )
    ledger = plan_ledger(
        num_samples=100,
        batch_size=1,
        total_epochs=1,
        target_eps=8.0,
        delta=cfg.delta,
        accountant="rdp",
    )  # expected batch of 1: about a third of the batches are empty
    try:
        train_dp(
            build_model(cfg.model, seed=0),
            data,
            ledger,
            epochs=1,
            batch_size=1,
            lr=cfg.lr,
            momentum=0.0,
            max_grad_norm=cfg.max_grad_norm,
            grad_sample_mode=mode,
            randomness=PrivacyRandomness.replayable(0),
        )
    except RuntimeError:
        return False
    return True


def fastest_correct(epoch: Mapping[str, Mapping[str, Any]]) -> str:
    """The fastest Opacus mode that matches hooks and survives empty batches."""
    ok = [m for m in GRAD_SAMPLE_MODES if epoch[m]["diff"] < 1e-4 and epoch[m]["empty_batches_ok"]]
    return min(ok, key=lambda m: epoch[m]["s"])


def _noiseless_update(cfg: RunConfig, data: Any, mode: str) -> list[torch.Tensor]:
    model = build_model(cfg.model, seed=0)
    ledger = replace(
        plan_ledger(
            num_samples=len(data),
            batch_size=cfg.batch_size,
            total_epochs=1,
            target_eps=8.0,
            delta=cfg.delta,
            accountant="rdp",
        ),
        noise_multiplier=0.0,
    )
    train_dp(
        model,
        data,
        ledger,
        epochs=1,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=0.0,
        max_grad_norm=cfg.max_grad_norm,
        grad_sample_mode=mode,
        randomness=PrivacyRandomness.replayable(1),
    )
    return [p.detach().clone() for p in model.parameters()]
