"""The key behind a node's DP noise: 256 secret bits, every one of them used, never repeated.

The attacker here is the server in `dp-mode=update`: it knows the model it sent, the model
the node released, C and σ, so for the right noise key the release minus the regenerated
noise collapses to a vector of norm ≤ C, the node's clipped update. Before this design the
key was `secrets.randbits(63)` fed to PyTorch's MT19937, which keeps only the low 32 bits:
the unknown high bits changed nothing, and the whole key space was 2^32.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from flower_app.config import RunConfig
from flower_app.data import to_tensors
from flower_app.model import build_model
from flower_app.privacy import plan_ledger, privatize_update
from flower_app.rng import KEY_BYTES, KeyedStream, PrivacyRandomness, privacy_randomness
from flower_app.train import train_dp

SIGMA, CLIP, DIM = 3.0, 1.0, 256
HIDDEN_BITS = 20  # what the attacker does not know of the key
BUDGET = 2**12  # candidates it tries for them (a real one faces all 256 bits)
START = {"w": torch.zeros(DIM)}
END = {"w": torch.linspace(-1.0, 1.0, DIM)}  # norm ~9: clipped to C


def _clipped() -> torch.Tensor:
    delta = END["w"].double()
    return delta * CLIP / float(delta.norm())


def _release(noise: Callable[[float, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    class _Stream:
        gaussian = staticmethod(noise)

    out, _ = privatize_update(START, END, clip=CLIP, noise_multiplier=SIGMA, noise=_Stream())
    return out["w"].double()


def _keyed(key: bytes) -> Callable[[float, torch.Tensor], torch.Tensor]:
    return PrivacyRandomness.from_key(key).noise.gaussian


def _legacy(seed: int) -> Callable[[float, torch.Tensor], torch.Tensor]:
    """The old design: torch's MT19937 seeded with the (63-bit) key."""
    gen = torch.Generator().manual_seed(seed)
    return lambda std, like: torch.randn(like.shape, generator=gen, dtype=torch.float64) * std


def _brute_force(released: torch.Tensor, noise_of: Callable[[int], Callable]) -> list[int]:
    """The candidates whose regenerated noise leaves a clipped-update-sized residue."""
    hits = []
    for guess in range(BUDGET):
        residue = released - START["w"].double() - noise_of(guess)(SIGMA * CLIP, released)
        if float(residue.norm()) <= CLIP * (1 + 1e-6):
            hits.append(guess)
    return hits


def test_the_attack_recovers_the_update_from_the_old_generator():
    """MT19937 drops the seed's high bits: hiding the top 20 of 63 hides nothing."""
    secret = int.from_bytes(hashlib.sha256(b"legacy key").digest()[:8], "little") >> 1
    known = secret & ((1 << (63 - HIDDEN_BITS)) - 1)
    released = _release(_legacy(secret))
    hits = _brute_force(released, lambda g: _legacy(known | (g << (63 - HIDDEN_BITS))))
    assert hits, "the attack must work on the generator this design replaced"
    recovered = released - _legacy(known)(SIGMA * CLIP, released)
    assert float((recovered - _clipped()).norm()) < 1e-5


def test_the_attack_recovers_nothing_with_20_key_bits_unknown():
    """Same attacker, all public inputs and 236 of the 256 key bits: no candidate fits."""
    key = hashlib.sha256(b"a node's round key").digest()
    released = _release(_keyed(key))
    top = int.from_bytes(key, "big")
    mask = (1 << (256 - HIDDEN_BITS)) - 1

    def candidate(guess: int) -> Callable:
        return _keyed(((top & mask) | (guess << (256 - HIDDEN_BITS))).to_bytes(KEY_BYTES, "big"))

    assert top >> (256 - HIDDEN_BITS) >= BUDGET, "the true key must lie outside the budget"
    assert _brute_force(released, candidate) == []
    # With the whole key the same attack does recover the update: the key is the only secret.
    recovered = released - _keyed(key)(SIGMA * CLIP, released)
    assert float((recovered - _clipped()).norm()) < 1e-5  # the release is float32


def test_the_key_has_256_bits_and_every_bit_changes_the_noise_and_the_batches():
    assert KEY_BYTES * 8 >= 128
    key = hashlib.sha256(b"base").digest()
    base = PrivacyRandomness.from_key(key)
    noise0, sample0 = base.noise.words(4), base.sampling.words(4)
    for bit in range(KEY_BYTES * 8):
        flipped = bytearray(key)
        flipped[bit // 8] ^= 1 << (bit % 8)
        other = PrivacyRandomness.from_key(bytes(flipped))
        assert not np.array_equal(other.noise.words(4), noise0), bit
        assert not np.array_equal(other.sampling.words(4), sample0), bit


def test_fresh_draws_never_repeat():
    """100,000 fresh round keys: with 2^32 streams about one pair would repeat."""
    draws = {PrivacyRandomness.fresh().noise.words(2).tobytes() for _ in range(100_000)}
    assert len(draws) == 100_000


def test_a_node_keys_each_round_from_the_os_unless_noise_seed_is_set():
    cfg = RunConfig(eps=2.0)
    keys = [bytes([i]) * KEY_BYTES for i in (1, 2)]
    with mock.patch("flower_app.rng.secrets.token_bytes", side_effect=keys) as drawn:
        first = privacy_randomness(cfg, 0, 1).noise.words(2)
        second = privacy_randomness(cfg, 0, 1).noise.words(2)
    assert [c.args for c in drawn.call_args_list] == [(KEY_BYTES,), (KEY_BYTES,)]
    assert np.array_equal(first, KeyedStream(keys[0], 2).words(2))
    assert not np.array_equal(first, second)
    seeded = RunConfig(eps=2.0, noise_seed=3)
    with mock.patch("flower_app.rng.secrets.token_bytes") as drawn:
        again = [privacy_randomness(seeded, 0, 1).noise.words(2) for _ in range(2)]
    drawn.assert_not_called()
    assert np.array_equal(*again)
    other_round = privacy_randomness(seeded, 0, 2).noise.words(2)
    assert not np.array_equal(again[0], other_round)


def test_torchs_global_generator_plays_no_part_in_the_noise():
    stream = lambda: PrivacyRandomness.replayable(9).noise  # noqa: E731
    like = torch.zeros(1000)
    torch.manual_seed(1)
    a = stream().gaussian(1.0, like)
    torch.manual_seed(2)
    assert torch.equal(a, stream().gaussian(1.0, like))


@pytest.mark.parametrize("std", [0.5, 4.0])
def test_keyed_gaussians_have_the_asked_spread(std):
    from scipy import stats

    draws = PrivacyRandomness.replayable(1).noise.gaussian(std, torch.zeros(200_000)).numpy()
    assert draws.dtype == np.float64
    assert stats.kstest(draws / std, "norm").pvalue > 1e-3
    coins = PrivacyRandomness.replayable(2).sampling.bernoulli(200_000, 0.1)
    assert abs(coins.mean() - 0.1) < 5 * (0.1 * 0.9 / 200_000) ** 0.5


def test_the_draws_are_the_chacha20_keystream_as_the_docstring_says():
    """Recomputed from cryptography's keystream with numpy: 53-bit uniforms (exactly), then
    Box-Muller, radii from the first half of a draw's uniforms and angles from the second,
    four summed and halved (numpy's log and cos differ from torch's in the last bits)."""
    key = bytes(range(KEY_BYTES))
    cipher = Cipher(algorithms.ChaCha20(key, struct.pack("<QQ", 0, 2)), mode=None).encryptor()
    words = np.frombuffer(cipher.update(bytes(8 * 46)), dtype=np.uint64)
    uniform = ((words & np.uint64(2**53 - 1)).astype(np.float64) + 0.5) * 2.0**-53
    stream = KeyedStream(key, 2)
    assert np.array_equal(stream.uniform(6).numpy(), uniform[:6])
    assert stream.uniform(0).numel() == 0
    u = uniform[6:46]  # 10 Gaussians: 20 pairs of uniforms, taken right after the 6 above
    r, angle = np.sqrt(-2.0 * np.log(u[:20])), 2.0 * math.pi * u[20:]
    z = ((r * np.cos(angle)).reshape(2, 10).sum(0) + (r * np.sin(angle)).reshape(2, 10).sum(0)) / 2
    np.testing.assert_allclose(stream.standard_normal(10).numpy(), z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["hooks", "fast"])
def test_opacus_adds_exactly_the_keyed_noise_in_every_mode(mode):
    """One DP-SGD step with σ > 0 minus the same step with σ = 0 is -lr · noise / B.

    The noise is regenerated from the key, so Opacus's optimizer took every coordinate of
    it from the keyed stream (and none from torch's generator).
    """
    rng = np.random.default_rng(0)
    n, lr, sigma = 64, 0.1, 2.0
    data = to_tensors("fashion-mnist", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, n).astype(np.int64))  # fmt: skip
    ledger = plan_ledger(num_samples=n, batch_size=n, total_epochs=1, target_eps=4.0,
                         delta=1e-5, accountant="rdp")  # fmt: skip
    ends = {}
    for s in (0.0, sigma):
        model = build_model("cnn", seed=0)
        train_dp(model, data, replace(ledger, noise_multiplier=s), epochs=1, batch_size=n,
                 lr=lr, momentum=0.0, max_grad_norm=1.0, grad_sample_mode=mode, steps=1,
                 randomness=PrivacyRandomness.replayable(4))  # fmt: skip
        ends[s] = [p.detach().double() for p in model.parameters()]
    params = list(build_model("cnn", seed=0).parameters())
    noise = PrivacyRandomness.replayable(4).noise.gaussians(sigma * 1.0, params)
    for noisy, quiet, z in zip(ends[sigma], ends[0.0], noise, strict=True):
        torch.testing.assert_close(noisy - quiet, -lr * z / n, atol=1e-5, rtol=1e-4)
