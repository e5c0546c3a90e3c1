"""Opacus DP-SGD with its two random draws taken from a node's keyed ChaCha20 streams.

Opacus stays in charge of everything that makes DP-SGD private except where its random
numbers come from: its optimizer clips (or takes the fast path's clipped sum), scales and
steps, and its accountant counts every step. Only the Gaussian it adds (`add_noise`) and the
Poisson batches its sampler draws come from `flower_app.rng.KeyedStream` instead of a
`torch.Generator` (MT19937: 32-bit seeds, linear in its state).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from flower_app.rng import KeyedStream


class KeyedPoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson sampler (each example in each batch with probability q), keyed."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int, stream: KeyedStream):
        """`steps` batches over `num_samples` examples at rate `sample_rate`."""
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self.stream = stream

    def __iter__(self) -> Iterator[list[int]]:
        """One index list per step, as Opacus's `UniformWithReplacementSampler` yields."""
        for _ in range(self.steps):
            yield self.stream.bernoulli(self.num_samples, self.sample_rate).nonzero()[0].tolist()


def use_keyed_noise(optimizer: DPOptimizer, stream: KeyedStream) -> None:
    """Make `optimizer.add_noise` draw its Gaussian from `stream` (float64, then p's dtype).

    Mirrors Opacus 1.6's `DPOptimizer.add_noise` and `DPOptimizerFastGradientClipping.
    add_noise`: std = noise multiplier × max grad norm, added to each clipped sum. The noise
    is drawn on the CPU whatever the parameters' device (`noised` moves it there).
    """
    optimizer.generator = None  # nothing may draw privacy noise from torch's generator

    def add_noise() -> None:
        multiplier = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)
        std = multiplier * optimizer.max_grad_norm
        params = optimizer.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        # All parameters at once: one keystream call and one float64 addition per step,
        # the same numbers as drawing and adding tensor by tensor.
        summed = torch.cat([p.summed_grad.reshape(-1) for p in params])
        flat = noised(summed, stream.gaussian(std, summed))
        for p, grad in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad = grad.to(p.dtype).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise


def noised(summed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`summed` + `noise` in float64 on `summed`'s device, returned in `summed`'s dtype.

    `noise` must be the keyed stream's draw: float64 on the CPU. It is moved to the device
    only after it was drawn, so a GPU run adds the very numbers a CPU run adds for the same
    key (float64 addition rounds alike on both), and torch.cuda's generator draws nothing.
    """
    if noise.device.type != "cpu" or noise.dtype != torch.float64:
        raise RuntimeError(
            f"DP noise must come from the keyed stream (float64 on the CPU), got {noise.dtype} "
            f"on {noise.device}"
        )
    return (summed.double() + noise.to(summed.device)).to(summed.dtype)
