import math

import numpy as np
import pytest
import torch
from opacus.accountants.analysis import rdp as rdp_analysis

from flower_app.data import to_tensors
from flower_app.model import build_model
from flower_app.privacy import (
    RDP_ORDERS,
    PrivacyLedger,
    epsilon,
    gaussian_eps_exact,
    plan_ledger,
    replace_one_epsilon,
)
from flower_app.rng import PrivacyRandomness
from flower_app.train import train_dp


def independent_rdp_eps(noise_multiplier, sample_rate, steps, delta):
    """ε straight from Opacus's RDP analysis functions, bypassing our wrapper."""
    curve = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=RDP_ORDERS
    )
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=curve, delta=delta)
    return float(eps)


@pytest.mark.parametrize("target", [8.0, 4.0, 2.0, 1.0])
def test_calibration_spends_close_to_but_never_above_the_target(target):
    ledger = plan_ledger(
        num_samples=3000,
        batch_size=64,
        total_epochs=20,
        target_eps=target,
        delta=1e-5,
        accountant="rdp",
    )
    total_steps = 20 * math.ceil(3000 / 64)
    final = ledger.after(total_steps).epsilon()
    assert final <= target
    assert final >= 0.9 * target
    assert final == pytest.approx(
        independent_rdp_eps(ledger.noise_multiplier, ledger.sample_rate, total_steps, 1e-5),
        rel=1e-9,
    )


def test_epsilon_grows_with_steps_and_is_zero_before_training():
    kw = dict(noise_multiplier=1.1, sample_rate=0.02, delta=1e-5)
    assert epsilon(steps=0, **kw) == 0.0
    values = [epsilon(steps=s, **kw) for s in (10, 100, 1000)]
    assert values == sorted(values) and values[0] > 0


def test_prv_accountant_is_tighter_or_equal_to_rdp():
    kw = dict(noise_multiplier=1.0, sample_rate=0.02, steps=500, delta=1e-5)
    assert epsilon(accountant="prv", **kw) <= epsilon(accountant="rdp", **kw) + 1e-6


def _tiny_data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    return to_tensors("fashion-mnist", x, y)


@pytest.mark.parametrize("mode", ["fast", "hooks", "ghost", "ew"])
def test_ledger_across_rounds_matches_an_independent_recount(mode):
    """Three rounds of real Opacus training, the ledger carried between them like context.state."""
    data = _tiny_data()
    rounds, target = 3, 2.0
    ledger = plan_ledger(
        num_samples=len(data),
        batch_size=32,
        total_epochs=rounds,
        target_eps=target,
        delta=1e-5,
        accountant="rdp",
    )
    model = build_model("cnn", seed=0)
    spent = []
    for _ in range(rounds):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        result = train_dp(
            model,
            data,
            ledger,
            epochs=1,
            batch_size=32,
            lr=0.1,
            momentum=0.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
        )
        assert result.steps == math.ceil(len(data) / 32)
        ledger = ledger.after(result.steps)
        spent.append(ledger.epsilon())
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert changed, "DP-SGD did not update the model"
    assert spent == sorted(spent), "cumulative ε must never decrease"
    assert max(spent) <= target
    assert spent[-1] >= 0.9 * target
    assert spent[-1] == pytest.approx(
        independent_rdp_eps(ledger.noise_multiplier, ledger.sample_rate, ledger.steps, 1e-5)
    )


def test_ledger_serialises_what_an_auditor_needs():
    ledger = PrivacyLedger(1.2, 0.02, 100, 1e-5, "rdp")
    d = ledger.to_dict()
    assert set(d) == {
        "noise_multiplier",
        "sample_rate",
        "steps",
        "delta",
        "accountant",
        "planned_steps",
        "dp_mode",
    }
    assert PrivacyLedger(**d).epsilon() == ledger.epsilon()


@pytest.mark.parametrize("mode", ["fast", "ew", "ghost"])
def test_fast_modes_take_empty_poisson_batches_as_noise_only_steps_like_hooks(mode):
    """Expected batch 1 on 100 examples: about a third of Poisson batches are empty.

    Every step, empty or not, must be counted and noised; with the same seed a fast mode
    must end exactly where hooks does.
    """
    data = _tiny_data(n=100)
    ends = {}
    for m in ("hooks", mode):
        ledger = plan_ledger(
            num_samples=100,
            batch_size=1,
            total_epochs=1,
            target_eps=8.0,
            delta=1e-5,
            accountant="rdp",
        )
        model = build_model("cnn", seed=0)
        result = train_dp(
            model,
            data,
            ledger,
            epochs=1,
            batch_size=1,
            lr=0.1,
            momentum=0.0,
            max_grad_norm=1.0,
            grad_sample_mode=m,
            randomness=PrivacyRandomness.replayable(0),
        )
        assert result.steps == 100
        ends[m] = torch.cat([v.flatten() for v in model.state_dict().values()])
    assert torch.allclose(ends[mode], ends["hooks"], atol=1e-4)


# --- replace-one adjacency (n is public) ---------------------------------------------------


def test_replace_one_without_subsampling_is_the_gaussian_at_twice_the_sensitivity():
    """q = 1: swapping one example moves the clipped sum by up to 2C, so k steps are
    μ-GDP with μ = 2√k/σ; Balle & Wang's exact curve (Opacus's GDP code) gives that ε."""
    for sigma, steps in ((2.0, 1), (4.0, 10), (8.0, 50)):
        got = replace_one_epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=1e-5)
        exact = gaussian_eps_exact(noise_multiplier=sigma / 2, steps=steps, delta=1e-5)
        assert exact - 1e-6 <= got <= exact + 0.05, (sigma, steps, got, exact)


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.1, 1 / 43, 860), (0.8, 1 / 13, 42)])
def test_replace_one_lies_between_add_remove_and_its_group_privacy_bound(sigma, q, steps):
    """ε_add/remove <= ε_replace(δ), and by group privacy over remove-then-add (Dwork & Roth
    2014, Thm 2.2 with δ) ε_replace((1 + e^ε)δ) <= 2ε, with ε from Opacus's RDP accountant."""
    delta = 1e-5
    add_remove = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    replace = replace_one_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    group_delta = (1 + math.exp(add_remove)) * delta
    loose = replace_one_epsilon(
        noise_multiplier=sigma, sample_rate=q, steps=steps, delta=group_delta
    )
    assert 0.8 * add_remove < replace and loose <= 2 * add_remove
    assert replace > add_remove  # the PLD add/remove value is below Opacus's RDP one
