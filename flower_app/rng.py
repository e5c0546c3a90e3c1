"""Where a node's privacy-protecting randomness comes from.

DP noise and Poisson sampling protect the node's data only while nobody else can replay
them. By default each node seeds fresh generators from OS entropy (`secrets`) every round,
inside the node: the seeds are never logged, stored or sent, and nothing in the run config
or known to the server determines them. `noise-seed` replaces that with seeds derived from
(noise-seed, partition id, round): repeatable simulations, and no privacy at all against
anyone who knows `noise-seed`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch

from flower_app.config import RunConfig


@dataclass(frozen=True)
class PrivacyRandomness:
    """The two generators one DP round draws from."""

    sampling: torch.Generator  # which examples each Poisson batch holds
    noise: torch.Generator  # the Gaussian noise (DP-SGD's per step, or the update's)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def privacy_randomness(cfg: RunConfig, partition_id: int, server_round: int) -> PrivacyRandomness:
    """Secret generators (OS entropy), or seeded ones when the run sets `noise-seed`."""
    if not cfg.seeded_noise:
        return PrivacyRandomness(_generator(secrets.randbits(63)), _generator(secrets.randbits(63)))
    state = np.random.SeedSequence([cfg.noise_seed, partition_id, server_round]).generate_state(
        2, dtype=np.uint64
    )
    return PrivacyRandomness(_generator(int(state[0] >> 1)), _generator(int(state[1] >> 1)))


def shuffle_generator(cfg: RunConfig, partition_id: int, server_round: int) -> torch.Generator:
    """The mini-batch order of non-private SGD (it protects nothing, so it follows `seed`)."""
    state = np.random.SeedSequence([cfg.seed, partition_id, server_round]).generate_state(1)
    return _generator(int(state[0]))
