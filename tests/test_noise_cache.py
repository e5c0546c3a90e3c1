"""The calibrated σ is kept on disk, and a stored value is never trusted past the accountant."""

import json

import pytest

from flower_app import disk_cache, privacy
from flower_app.privacy import calibrate_noise, epsilon

ARGS = {"target_eps": 4.0, "delta": 1e-5, "sample_rate": 1 / 40, "steps": 400, "accountant": "rdp"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_cache, "CACHE_ROOT", tmp_path)
    return tmp_path


def _stored(root):
    (path,) = (root / "noise-multiplier").glob("*.json")
    return path


def test_the_second_calibration_reads_the_first_and_agrees(_cache, monkeypatch):
    first = calibrate_noise(**ARGS)
    assert json.loads(_stored(_cache).read_text())["value"] == first
    monkeypatch.setattr(privacy, "_search_noise", lambda key: pytest.fail("searched again"))
    assert calibrate_noise(**ARGS) == first


def test_a_stored_sigma_too_small_for_the_budget_is_recomputed(_cache):
    honest = calibrate_noise(**ARGS)
    path = _stored(_cache)
    doc = json.loads(path.read_text())
    doc["value"] = honest / 2  # a tampered or stale cache would halve the noise
    path.write_text(json.dumps(doc))
    assert calibrate_noise(**ARGS) == honest
    assert (
        epsilon(
            noise_multiplier=honest,
            **{k: ARGS[k] for k in ("sample_rate", "steps", "delta", "accountant")},
        )
        <= 4.0
    )


@pytest.mark.parametrize("junk", ["", "{", '{"key": {}, "value": 1.0}', '{"value": "x"}'])
def test_unreadable_or_foreign_entries_are_ignored(_cache, junk):
    honest = calibrate_noise(**ARGS)
    _stored(_cache).write_text(junk)
    assert calibrate_noise(**ARGS) == honest


def test_other_inputs_get_their_own_entry(_cache):
    a = calibrate_noise(**ARGS)
    b = calibrate_noise(**{**ARGS, "target_eps": 2.0})
    assert b > a
    assert len(list((_cache / "noise-multiplier").glob("*.json"))) == 2
