"""Where a node's privacy-protecting randomness comes from.

DP noise and Poisson sampling protect the node's data only while nobody else can replay
them. Every such number is drawn from a ChaCha20 keystream (RFC 8439, the `cryptography`
package's OpenSSL implementation), never from PyTorch's or numpy's generators: PyTorch's CPU
generator is MT19937, which keeps only the low 32 bits of a seed and whose output is linear
in its state, so its noise is one of 2^32 streams whatever the seed.

By default each node draws a fresh 256-bit key from the OS (`secrets.token_bytes`) every
round, inside the node: the key is never logged, stored or sent, and nothing in the run
config or known to the server determines it. `noise-seed` replaces that key with one derived
from (noise-seed, partition id, round): the same generator, so simulations repeat bit for
bit, and no privacy at all against anyone who knows `noise-seed`.

Gaussians are made in float64 by Box-Muller from 53-bit uniforms, each the sum of four
draws halved, as Opacus's `secure_mode` does against floating-point attacks (Holohan &
Braghin 2021, arXiv:2107.10138, Sec. 5.1, n = 2).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from flower_app.config import RunConfig

KEY_BYTES = 32  # ChaCha20's key: 256 secret bits
_SAMPLING, _NOISE = 1, 2  # the two streams one key feeds (ChaCha20 nonces)
_SECURE_SUMMANDS = 4  # 2n Gaussians summed, n = 2 (Opacus's secure_mode)
_LOW_53 = (1 << 53) - 1


class KeyedStream:
    """Uniform and Gaussian numbers from the ChaCha20 keystream of (key, stream id)."""

    def __init__(self, key: bytes, stream: int) -> None:
        """Stream `stream` (a nonce) of the 32-byte `key`."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"a ChaCha20 key has {KEY_BYTES} bytes, got {len(key)}")
        # cryptography's 16-byte nonce: a 64-bit block counter (from 0), then the nonce.
        nonce = struct.pack("<QQ", 0, stream)
        self._cipher = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._zeros = b""  # the plaintext: the keystream is what encrypting zeros gives

    def words(self, count: int) -> np.ndarray:
        """The next `count` 64-bit words of the keystream."""
        return self._signed_words(count).numpy().view(np.uint64)

    def _signed_words(self, count: int) -> torch.Tensor:
        """`words` as int64, written straight into a fresh tensor's memory."""
        if count == 0:
            return torch.empty(0, dtype=torch.int64)
        if len(self._zeros) < 8 * count:
            self._zeros = bytes(8 * count)
        out = bytearray(8 * count)
        self._cipher.update_into(memoryview(self._zeros)[: len(out)], out)
        return torch.frombuffer(out, dtype=torch.int64)

    def uniform(self, count: int) -> torch.Tensor:
        """`count` float64 uniforms in (0, 1), 53 random bits each (never 0, never 1)."""
        bits = self._signed_words(count).bitwise_and_(_LOW_53)
        return bits.double().add_(0.5).mul_(2.0**-53)

    def standard_normal(self, count: int) -> torch.Tensor:
        """`count` float64 N(0, 1) draws, each the sum of four Box-Muller draws halved."""
        pairs = count * _SECURE_SUMMANDS // 2
        u = self.uniform(2 * pairs)
        radius = u[:pairs].log_().mul_(-2.0).sqrt_()
        angle = u[pairs:].mul_(2.0 * math.pi)
        cos = torch.cos(angle).mul_(radius).view(2, count).sum(0)
        sin = angle.sin_().mul_(radius).view(2, count).sum(0)
        return cos.add_(sin).mul_(0.5)

    def gaussian(self, std: float, like: torch.Tensor) -> torch.Tensor:
        """N(0, std²) noise, float64, in the shape of `like` (zeros when std is 0)."""
        if std == 0:
            return torch.zeros(like.shape, dtype=torch.float64)
        return self.standard_normal(like.numel()).view(like.shape).mul_(std)

    def gaussians(self, std: float, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """`gaussian` for each tensor of `like`, drawn in one go (one keystream call)."""
        sizes = [t.numel() for t in like]
        flat = self.gaussian(std, torch.empty(sum(sizes)))
        return [part.view(t.shape) for part, t in zip(flat.split(sizes), like, strict=True)]

    def bernoulli(self, count: int, rate: float) -> np.ndarray:
        """`count` independent coins, each True with probability `rate` (Poisson sampling)."""
        return (self.uniform(count) < rate).numpy()


@dataclass(frozen=True)
class PrivacyRandomness:
    """The two streams one DP round draws from, both fed by one round key."""

    sampling: KeyedStream  # which examples each Poisson batch holds
    noise: KeyedStream  # the Gaussian noise (DP-SGD's per step, or the update's)

    @classmethod
    def from_key(cls, key: bytes) -> PrivacyRandomness:
        """Both streams of `key`."""
        return cls(KeyedStream(key, _SAMPLING), KeyedStream(key, _NOISE))

    @classmethod
    def fresh(cls) -> PrivacyRandomness:
        """Streams of a new secret key from the OS, which leaves no trace."""
        return cls.from_key(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def replayable(
        cls, noise_seed: int, partition_id: int = 0, server_round: int = 0
    ) -> PrivacyRandomness:
        """Streams of the public key `noise-seed` implies: anyone can replay them."""
        return cls.from_key(seeded_key(noise_seed, partition_id, server_round))


def seeded_key(noise_seed: int, partition_id: int, server_round: int) -> bytes:
    """The public, replayable key of `noise-seed` (SHA-256 of a fixed-width encoding)."""
    return hashlib.sha256(
        b"flower-dp-gossip noise-seed" + struct.pack("<QQQ", noise_seed, partition_id, server_round)
    ).digest()


def privacy_randomness(cfg: RunConfig, partition_id: int, server_round: int) -> PrivacyRandomness:
    """Secret streams (a fresh OS key), or seeded ones when the run sets `noise-seed`."""
    if not cfg.seeded_noise:
        return PrivacyRandomness.fresh()
    return PrivacyRandomness.replayable(cfg.noise_seed, partition_id, server_round)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shuffle_generator(cfg: RunConfig, partition_id: int, server_round: int) -> torch.Generator:
    """The mini-batch order of non-private SGD (it protects nothing, so it follows `seed`)."""
    state = np.random.SeedSequence([cfg.seed, partition_id, server_round]).generate_state(1)
    return _generator(int(state[0]))
