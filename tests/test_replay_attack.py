"""The server (or any other node) tries to subtract a node's DP noise by replaying it.

Everything the attacker uses is public: the run config, the partition id, the round and the
model it sent. It runs the node's own code on surrogate data of the same size: if the node's
randomness were a function of public values, the surrogate round draws the very same noise,
which the attacker isolates (it knows the surrogate's noise-free update) and subtracts from
the victim's released model. A private node's noise must survive that: the recovered update
must be as far from the true noise-free update as the noise itself.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

from flower_app.config import RunConfig
from flower_app.data import to_tensors
from flower_app.model import build_model
from flower_app.node import local_round
from flower_app.privacy import PrivacyLedger
from flower_app.train import train_dp, train_plain

N = 64  # one Poisson batch of expected size N: sample rate 1, every example in it
PUBLIC = dict(num_server_rounds=1, local_epochs=1, batch_size=N, lr=0.5, max_grad_norm=1.0, eps=0.2)


def shard(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(N, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=N).astype(np.int64)
    return to_tensors("fashion-mnist", x, y)


def flat(state) -> torch.Tensor:
    return torch.cat([v.detach().double().flatten() for v in state.values()])


def released_update(cfg, data, weights, partition_id=3, server_round=1) -> torch.Tensor:
    """The node's round, as its reply releases it: trained minus sent weights."""
    with mock.patch("flower_app.node.load_shard", return_value=data):
        out = local_round(
            cfg,
            partition_id=partition_id,
            num_partitions=8,
            weights=weights,
            ledger=None,
            server_round=server_round,
        )
    return flat(out.state_dict) - flat(weights)


def noise_free_update(cfg, data, weights) -> torch.Tensor:
    """What the update would be without noise (the secret the DP noise hides)."""
    model = build_model(cfg.model)
    model.load_state_dict(weights)
    common = dict(epochs=1, batch_size=N, lr=cfg.lr, momentum=0.0)
    if cfg.dp_mode == "sample":
        no_noise = PrivacyLedger(0.0, 1.0, 0, cfg.delta, "rdp")
        train_dp(model, data, no_noise, max_grad_norm=cfg.max_grad_norm, **common,
                 grad_sample_mode="hooks")  # fmt: skip
        return flat(model.state_dict()) - flat(weights)
    train_plain(model, data, **common)
    delta = flat(model.state_dict()) - flat(weights)
    return delta * min(1.0, cfg.max_grad_norm / float(delta.norm()))


def replay_attack(cfg) -> tuple[float, float]:
    """(distance of the recovered update to the truth, norm of the node's noise)."""
    weights = build_model(cfg.model, seed=cfg.seed).state_dict()
    victim = shard(1)
    released = released_update(cfg, victim, weights)
    truth = noise_free_update(cfg, victim, weights)
    # The attacker: same public inputs, its own data, whose noise-free update it knows.
    surrogate = shard(2)
    replayed_noise = released_update(cfg, surrogate, weights) - noise_free_update(
        cfg, surrogate, weights
    )
    recovered = released - replayed_noise
    return float((recovered - truth).norm()), float((released - truth).norm())


@pytest.mark.parametrize("dp_mode", ["sample", "update"])
def test_replaying_the_public_seed_does_not_remove_the_noise(dp_mode):
    cfg = RunConfig(**PUBLIC, dp_mode=dp_mode)
    error, noise = replay_attack(cfg)
    print(f"{dp_mode}: recovered update off by {error:.3g}; noise norm {noise:.3g}")  # noqa: T201
    assert noise > 10 * cfg.lr * cfg.max_grad_norm / N, "the test needs noise well above signal"
    # Subtracting an independent draw adds noise rather than removing it (expected √2 ×).
    assert error > 0.9 * noise


@pytest.mark.parametrize("dp_mode", ["sample", "update"])
def test_seeded_noise_is_replayable_as_its_label_says(dp_mode):
    """The labelled opt-in: whoever knows noise-seed removes the noise (so the attack is real)."""
    cfg = RunConfig(**PUBLIC, dp_mode=dp_mode, noise_seed=11)
    error, noise = replay_attack(cfg)
    assert error < 1e-3 * noise


def test_two_rounds_with_the_same_public_inputs_draw_different_noise_and_batches():
    cfg = RunConfig(**{**PUBLIC, "batch_size": 8})  # sample rate 1/8: Poisson batches vary
    weights = build_model("cnn", seed=7).state_dict()
    first, second = (released_update(cfg, shard(1), weights) for _ in range(2))
    assert not torch.allclose(first, second)
    seeded = RunConfig(**{**PUBLIC, "batch_size": 8}, noise_seed=5)
    assert torch.equal(
        released_update(seeded, shard(1), weights), released_update(seeded, shard(1), weights)
    )
