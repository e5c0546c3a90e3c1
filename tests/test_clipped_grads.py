"""The fast DP-SGD path equals Opacus (hooks + DPOptimizer clipping) and keeps Opacus in charge."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn

from flower_app import clipped_grads
from flower_app.data import to_tensors
from flower_app.model import MODELS, build_model
from flower_app.privacy import plan_ledger
from flower_app.rng import PrivacyRandomness
from flower_app.train import (
    GRADIENT_CHECK_FAILED,
    GradientCheckError,
    _take_clipped_sums,
    train_dp,
)


def _batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _opacus(model: nn.Module, x, y, clip: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Opacus's own clipped sum and per-example norms, on `model` itself."""
    wrapped = GradSampleModule(model, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(y),
    )
    nn.functional.cross_entropy(wrapped(x), y).backward()
    norms = torch.stack(
        [p.grad_sample.reshape(len(y), -1).norm(2, dim=1) for p in params], dim=1
    ).norm(2, dim=1)
    opt.clip_and_accumulate()
    sums = [p.summed_grad.detach().clone() for p in params]
    wrapped._close()
    return sums, norms


@pytest.mark.parametrize("name", sorted(MODELS))
def test_clipped_sum_and_norms_equal_opacus_on_every_model(name):
    model = build_model(name, seed=0)
    x, y = _batch(48)
    fast = clipped_grads.clipped_sum(model, x, y, max_grad_norm=1.0)
    # Clip at the median norm, so half the examples are clipped and half are not.
    clip = float(fast.norms.median())
    fast = clipped_grads.clipped_sum(model, x, y, max_grad_norm=clip)
    reference, norms = _opacus(model, x, y, clip)
    assert clipped_grads.supports(model)
    assert torch.allclose(fast.norms, norms, rtol=1e-5, atol=1e-6)
    ordered = [fast.sums[p] for p in model.parameters()]
    for got, want in zip(ordered, reference, strict=True):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y))
    assert float(fast.loss) == pytest.approx(loss, rel=1e-6)


def _odd_convs(bias: bool) -> nn.Module:
    """One-channel and three-channel convs (the two ways per-example weights are formed)."""
    torch.manual_seed(0)
    first = nn.Conv2d(1, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=bias)
    second = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=bias)
    features = nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), nn.Flatten())
    width = features(torch.zeros(1, 1, 28, 28)).shape[1]
    return nn.Sequential(features, nn.Linear(width, 10))


@pytest.mark.parametrize("bias", [True, False])
def test_convs_of_other_shapes_equal_opacus(bias):
    model = _odd_convs(bias)
    x, y = _batch(16)
    clip = float(clipped_grads.clipped_sum(model, x, y, max_grad_norm=1.0).norms.median())
    fast = clipped_grads.clipped_sum(model, x, y, max_grad_norm=clip)
    reference, norms = _opacus(model, x, y, clip)
    assert torch.allclose(fast.norms, norms, rtol=1e-5, atol=1e-6)
    for got, want in zip([fast.sums[p] for p in model.parameters()], reference, strict=True):
        assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))


def test_an_empty_batch_gives_zero_sums_for_every_parameter():
    model = build_model("cnn", seed=0)
    x, y = _batch(0)
    step = clipped_grads.clipped_sum(model, x, y, max_grad_norm=1.0)
    assert set(step.sums) == set(model.parameters())
    assert all(not s.any() and s.shape == p.shape for p, s in step.sums.items())


class _WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.LayerNorm(8), nn.Linear(8, 10))

    def forward(self, x):
        return self.net(x)


def test_layers_it_does_not_cover_are_not_claimed():
    assert not clipped_grads.supports(_WithLayerNorm())
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    assert not clipped_grads.supports(grouped)
    frozen = build_model("cnn", seed=0)
    frozen.features[0].weight.requires_grad_(False)
    assert not clipped_grads.supports(frozen)


def _data(n: int):
    rng = np.random.default_rng(0)
    return to_tensors(
        "fashion-mnist",
        rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n).astype(np.int64),
    )


def _train(model, data, mode, *, batch_size=32, key_seed=0, sigma=None):
    ledger = plan_ledger(
        num_samples=len(data),
        batch_size=batch_size,
        total_epochs=2,
        target_eps=4.0,
        delta=1e-5,
        accountant="rdp",
    )
    if sigma is not None:
        ledger = replace(ledger, noise_multiplier=sigma)
    result = train_dp(
        model,
        data,
        ledger,
        epochs=1,
        batch_size=batch_size,
        lr=0.1,
        momentum=0.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        randomness=PrivacyRandomness.replayable(key_seed),
    )
    return result, ledger


def test_a_model_it_does_not_cover_trains_with_opacus_hooks_and_is_still_clipped():
    data = _data(64)
    ends = {}
    for mode in ("fast", "hooks"):
        torch.manual_seed(0)
        model = _WithLayerNorm()
        _train(model, data, mode, sigma=0.0)
        ends[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(ends["fast"], ends["hooks"])


def test_a_mismatch_with_opacus_stops_before_any_step(monkeypatch):
    real = clipped_grads.clipped_sum

    def doubled(model, x, y, max_grad_norm, **kwargs):
        step = real(model, x, y, max_grad_norm, **kwargs)
        return clipped_grads.ClippedStep(
            step.loss, step.norms, {p: 2 * s for p, s in step.sums.items()}
        )

    monkeypatch.setattr(clipped_grads, "clipped_sum", doubled)
    model = build_model("cnn", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(GradientCheckError, match="differs from Opacus") as err:
        _train(model, _data(64), "fast")
    assert str(err.value) == GRADIENT_CHECK_FAILED  # nothing computed from the batch leaves
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_opacus_adds_the_calibrated_noise_and_counts_every_step():
    """One epoch with the noise on: the update minus the noise-free update is N(0, (lr σC/B)²)."""
    data = _data(256)
    quiet = build_model("cnn", seed=0)
    _train(quiet, data, "fast", sigma=0.0)
    noisy = build_model("cnn", seed=0)
    result, ledger = _train(noisy, data, "fast")
    assert result.steps == math.ceil(256 / 32)
    diff = torch.cat(
        [
            (a - b).detach().flatten()
            for a, b in zip(noisy.parameters(), quiet.parameters(), strict=True)
        ]
    )
    # Each step adds N(0, (σC)²) to the clipped sum and divides by the expected batch (32);
    # over `steps` SGD steps with lr 0.1 the noise adds up (the clipped terms differ a
    # little too, as the models drift apart).
    expected = 0.1 * ledger.noise_multiplier * 1.0 / 32 * math.sqrt(result.steps)
    assert float(diff.std()) == pytest.approx(expected, rel=0.1)


def test_the_optimizer_takes_the_clipped_sum_as_it_is_and_still_accumulates():
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))]
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
        expected_batch_size=4,
    )  # fmt: skip
    _take_clipped_sums(opt)
    sums = [torch.ones(3), torch.full((2, 2), 2.0)]
    for p, s in zip(params, sums, strict=True):
        p.grad = s
    opt.accumulate()
    assert all(p.summed_grad is s and p.grad is None for p, s in zip(params, sums, strict=True))
    for p in params:  # Opacus's gradient accumulation: a second sum before the step
        p.grad = torch.ones_like(p)
    opt.accumulate()
    assert torch.equal(params[0].summed_grad, torch.full((3,), 2.0))
    assert torch.equal(params[1].summed_grad, torch.full((2, 2), 3.0))
