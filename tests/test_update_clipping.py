"""dp-mode=update's clip must hold whatever training produced, NaN and inf included.

The attack: a node's local training ends with one non-finite coordinate (a diverging step,
or data chosen to make one). Its norm is then NaN (or inf), `clip / norm` is no clip factor,
and a release that skipped or broke the clip would carry the raw update, or mark which
coordinates overflowed, un-noised. The mechanism's sensitivity must not depend on the data:
a non-finite update is released as the zero update (a point of the C-ball like any other).
"""

import math

import pytest
import torch

from flower_app.privacy import privatize_update
from flower_app.rng import PrivacyRandomness

START = {"w": torch.zeros(4, 5), "b": torch.zeros(5)}


def _end(bad: float) -> dict[str, torch.Tensor]:
    w = torch.zeros(4, 5)
    w[0, 0] = 1e6  # a huge finite move: an unclipped release would show it
    w[1, 1] = bad
    return {"w": w, "b": torch.full((5,), 3.0)}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_update_is_released_as_the_zero_update(bad):
    noise = PrivacyRandomness.replayable(0).noise
    out, norm = privatize_update(START, _end(bad), clip=1.0, noise_multiplier=0.0, noise=noise)
    assert not math.isfinite(norm)  # the node may log it; it never leaves in the release
    for k, v in out.items():
        assert torch.isfinite(v).all(), (k, v)
        torch.testing.assert_close(v, START[k], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_with_noise_a_non_finite_update_releases_what_a_zero_update_would(bad):
    def release(end):
        noise = PrivacyRandomness.replayable(3).noise  # the same draws for both
        return privatize_update(START, end, clip=1.0, noise_multiplier=1.3, noise=noise)[0]

    broken, zero = release(_end(bad)), release({k: v.clone() for k, v in START.items()})
    for k in START:
        torch.testing.assert_close(broken[k], zero[k], rtol=0, atol=0)
        assert float(broken[k].abs().max()) < 20  # noise of std 1.3, not 1e6


def test_a_finite_update_is_still_clipped_to_c():
    end = _end(0.0)
    out, norm = privatize_update(
        START, end, clip=1.0, noise_multiplier=0.0, noise=PrivacyRandomness.replayable(0).noise
    )
    moved = math.sqrt(sum(float(((out[k] - START[k]).double() ** 2).sum()) for k in START))
    assert norm > 1e5 and moved == pytest.approx(1.0, rel=1e-6)
