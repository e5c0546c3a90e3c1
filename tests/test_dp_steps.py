"""Every shard size trains exactly the steps its noise was calibrated for.

Opacus's own Poisson loader takes int(1/q) steps per epoch, one fewer than ⌈n/B⌉ for some n
(⌈n/B⌉ = 93, 99, 105, 117, ...), which crashed those nodes ("the node's data changed").
"""

import math

import numpy as np
import pytest
import torch

from flower_app.config import RunConfig
from flower_app.data import to_tensors
from flower_app.model import build_model
from flower_app.node import local_round
from flower_app.privacy import PrivacyLedger, epsilon, plan_ledger, privatize_update
from flower_app.rng import PrivacyRandomness
from flower_app.shards import shard_for
from flower_app.train import train_dp


def test_opacus_int_of_one_over_q_loses_a_step_for_these_sizes():
    """Why the loader is built with an explicit step count (the float truth behind it)."""
    short = [k for k in range(1, 200) if int(1 / (1 / k)) != k]
    assert {93, 99, 105, 117} <= set(short)


@pytest.mark.parametrize("n", [92, 93, 99, 105, 117])
def test_train_dp_takes_exactly_the_planned_steps(n):
    rng = np.random.default_rng(n)
    data = to_tensors(
        "fashion-mnist",
        rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, size=n).astype(np.int64),
    )
    ledger = plan_ledger(
        num_samples=n, batch_size=1, total_epochs=1, target_eps=8.0, delta=1e-5, accountant="rdp"
    )
    assert ledger.planned_steps == n
    result = train_dp(
        build_model("mlp", seed=0),
        data,
        ledger,
        epochs=1,
        batch_size=1,
        lr=0.1,
        momentum=0.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
        randomness=PrivacyRandomness.replayable(0),
    )
    assert result.steps == n


def test_the_nine_node_iid_run_trains():
    """60,000 / 9 = 6,666 examples, batch 64: 105 steps per epoch (Opacus alone takes 104)."""
    cfg = RunConfig(partitioner="iid", eps=8.0, num_server_rounds=2)
    data = shard_for(cfg, 0, 9)
    assert math.ceil(len(data) / 64) == 105
    out = local_round(
        cfg,
        partition_id=0,
        num_partitions=9,
        weights=build_model("cnn", seed=7).state_dict(),
        ledger=None,
        server_round=1,
    )
    assert out.round_steps == out.ledger.steps == 105 and out.ledger.planned_steps == 210


def test_update_mode_sensitivity_against_the_server_is_two_c():
    """Replacing a node's data can flip its clipped update: the two releases are 2C apart."""
    start = {"w": torch.zeros(4)}
    clip = 1.0
    ups = [
        privatize_update(
            start,
            {"w": torch.full((4,), sign * 5.0)},
            clip=clip,
            noise_multiplier=0.0,
            noise=PrivacyRandomness.replayable(0).noise,
        )[0]["w"]
        for sign in (1, -1)
    ]
    assert float((ups[0] - ups[1]).norm()) == pytest.approx(2 * clip)
    led = PrivacyLedger(3.0, 1.0, 5, 1e-5, "rdp", 5, "update")
    assert led.strict_epsilon() == pytest.approx(
        epsilon(noise_multiplier=1.5, sample_rate=1.0, steps=5, delta=1e-5)
    )
    assert led.strict_epsilon() > 2 * led.epsilon()
    sample = PrivacyLedger(3.0, 0.1, 5, 1e-5, "rdp", 5, "sample")
    assert sample.strict_epsilon() == sample.epsilon()  # DP-SGD: Opacus's add/remove unit
