"""The reference tutorial's setup: shards, update-level DP, its ε maths, sampling, presets."""

import math
import random
from itertools import combinations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from flower_app.config import ConfigError, RunConfig
from flower_app.data import load_arrays
from flower_app.model import build_model
from flower_app.node import local_round
from flower_app.partition import label_histogram, partition_indices
from flower_app.privacy import (
    PRIVACY_UNITS,
    epsilon,
    gaussian_eps_exact,
    gaussian_sigma,
    plan_update_ledger,
    privatize_update,
)
from flower_app.rng import PrivacyRandomness
from sim.sweeps.presets import PRESETS, TUTORIAL_FIXED
from sim.sweeps.spec import expand
from strategies.fedavg import CentralFedAvg
from tests.mock_grid import mock_grid

DELTA = 1e-5


@pytest.fixture(scope="module")
def train_labels():
    return load_arrays("fashion-mnist").y_train


def test_shards_partition_is_the_tutorials_construction(train_labels):
    """Sort by label, cut 40 shards, deal 2 distinct shards to each of 20 clients."""
    parts = partition_indices(train_labels, "shards", 20, seed=7, shards_per_node=2)
    shards = np.sort(train_labels, kind="stable").reshape(40, -1)
    shard_hist = [np.bincount(s, minlength=10) for s in shards]
    unused = set(range(40))
    for part in parts:
        hist = label_histogram(train_labels, part)
        pair = next(
            (
                (a, b)
                for a, b in combinations(sorted(unused), 2)
                if np.array_equal(shard_hist[a] + shard_hist[b], hist)
            ),
            None,
        )
        assert pair is not None, f"{hist} is not the sum of two unused shards"
        unused -= set(pair)
    assert not unused  # every shard used exactly once
    # Every client holds 3000 examples, so FedAvg's example-weighted mean is the plain mean.
    assert {len(p) for p in parts} == {3000}
    together = np.concatenate(parts)
    assert len(np.unique(together)) == len(together) == len(train_labels)


def _model(shapes, value=0.0):
    return {k: torch.full(s, value, dtype=torch.float32) for k, s in shapes.items()}


SHAPES = {"w": (200, 300), "b": (300,)}


def NOISE():  # noqa: N802
    return PrivacyRandomness.replayable(0).noise


def test_update_is_clipped_to_c_and_a_small_update_is_kept():
    start = _model(SHAPES, 0.5)
    gen = torch.Generator().manual_seed(0)
    big = {k: v + torch.randn(v.shape, generator=gen) for k, v in start.items()}
    out, norm = privatize_update(start, big, clip=2.0, noise_multiplier=0.0, noise=NOISE())
    moved = torch.sqrt(sum(((out[k] - start[k]).double() ** 2).sum() for k in SHAPES))
    assert norm > 100 and float(moved) == pytest.approx(2.0, rel=1e-5)
    small = {k: v + 1e-4 for k, v in start.items()}
    out, norm = privatize_update(start, small, clip=2.0, noise_multiplier=0.0, noise=NOISE())
    assert norm < 2.0
    for k in SHAPES:
        torch.testing.assert_close(out[k], small[k])


def test_update_noise_has_std_sigma_times_c_and_is_centred():
    start, clip, sigma = _model(SHAPES), 2.0, 1.5
    end = {k: v + 0.01 for k, v in start.items()}  # norm ~2.5: clipped to C
    gen = PrivacyRandomness.replayable(7).noise
    draws = []
    for _ in range(20):
        out, _ = privatize_update(start, end, clip=clip, noise_multiplier=sigma, noise=gen)
        draws.append(torch.cat([out[k].double().ravel() for k in SHAPES]))
    draws = torch.stack(draws)
    clipped = torch.cat([(end[k] - start[k]).double().ravel() for k in SHAPES])
    clipped *= clip / float(clipped.norm())
    noise = draws - clipped
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.02)
    assert abs(float(noise.mean())) < 0.01
    # Averaged over draws, the noise cancels to the clipped update (unbiased).
    assert float((draws.mean(0) - clipped).std()) == pytest.approx(sigma * clip / 20**0.5, rel=0.05)


def test_non_float_tensors_pass_through_unnoised():
    start = {"w": torch.zeros(3), "n": torch.tensor(4)}
    end = {"w": torch.ones(3), "n": torch.tensor(5)}
    out, _ = privatize_update(start, end, clip=1.0, noise_multiplier=1.0, noise=NOISE())
    assert int(out["n"]) == 5 and out["w"].dtype == torch.float32


def test_the_tutorials_per_round_sigma_composes_to_more_than_its_label():
    sigma = gaussian_sigma(1.0, DELTA)
    assert sigma == pytest.approx(math.sqrt(2 * math.log(1.25 / DELTA)))
    one = epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=DELTA)
    twenty = epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=20, delta=DELTA)
    assert one <= 1.0  # one release keeps the label (the RDP bound is even a bit tighter)
    assert twenty > 4.0  # 20 uncomposed "ε=1" rounds cost more than four times the label
    assert gaussian_sigma(math.inf, DELTA) == 0.0


@pytest.mark.parametrize("target", [1, 2, 4, 8])
def test_composed_calibration_spends_between_90_and_100_percent(target):
    ledger = plan_update_ledger(
        target_eps=target, delta=DELTA, rounds=20, accounting="composed", accountant="rdp"
    )
    assert ledger.sample_rate == 1.0 and ledger.steps == 0
    assert 0.9 * target <= ledger.after(20).epsilon() <= target
    per_round = plan_update_ledger(
        target_eps=target, delta=DELTA, rounds=20, accounting="per-round", accountant="rdp"
    )
    assert per_round.noise_multiplier == pytest.approx(gaussian_sigma(target, DELTA))
    assert per_round.noise_multiplier < ledger.noise_multiplier


def test_update_mode_node_spends_one_release_per_round_it_trains():
    cfg = RunConfig(
        model="mlp",
        partitioner="shards",
        samples_per_node=300,
        dp_mode="update",
        accounting="per-round",
        eps=2.0,
        max_grad_norm=2.0,
    )
    weights = build_model("mlp", seed=7).state_dict()
    ledger = None
    for server_round in (1, 3):  # not sampled in round 2: nothing spent there
        out = local_round(
            cfg,
            partition_id=4,
            num_partitions=20,
            weights=weights,
            ledger=ledger,
            server_round=server_round,
        )
        ledger = out.ledger
    assert ledger.steps == 2 and ledger.sample_rate == 1.0
    assert ledger.noise_multiplier == pytest.approx(gaussian_sigma(2.0, DELTA))
    assert ledger.epsilon() == pytest.approx(
        epsilon(noise_multiplier=ledger.noise_multiplier, sample_rate=1.0, steps=2, delta=DELTA)
    )
    assert "whole dataset" in PRIVACY_UNITS["update"]


def test_per_round_accounting_needs_update_mode_and_sampling_needs_fedavg():
    with pytest.raises(ConfigError, match="accounting='per-round' is not valid with dp-mode"):
        RunConfig.from_run_config({"accounting": "per-round"})
    with pytest.raises(ConfigError, match="fraction-train=0.5 is not valid with strategy"):
        RunConfig.from_run_config({"strategy": "gossip", "fraction-train": 0.5})
    with pytest.raises(ConfigError, match="fraction-train=0.0"):
        RunConfig.from_run_config({"fraction-train": 0.0})
    assert RunConfig.from_run_config({"dp-mode": "update", "accounting": "per-round"})


@pytest.fixture
def task_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.mark.parametrize("fraction, expected", [(0.5, 10), (1.0, 20), (0.25, 5)])
def test_fedavg_samples_fraction_train_of_the_nodes(task_identity, fraction, expected):
    def sample(strategy, grid, server_round=1):
        return [
            m.metadata.dst_node_id
            for m in strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        ]

    grid = mock_grid(range(100, 120))
    strategy = CentralFedAvg(num_nodes=20, fraction_train=fraction, seed=7)
    first = sample(strategy, grid)
    assert len(first) == len(set(first)) == expected
    assert set(first) <= set(range(100, 120))
    # Flower's heartbeat thread draws from the global `random` at moments that vary
    # between runs: the sample must not depend on it.
    random.seed(12345)
    random.random()
    assert sample(CentralFedAvg(num_nodes=20, fraction_train=fraction, seed=7), grid) == first
    # Flower's node ids are random in every run: the same seed samples the same partitions.
    other = list(range(900, 880, -1))
    moved = sample(CentralFedAvg(num_nodes=20, fraction_train=fraction, seed=7), mock_grid(other))
    assert [other[i - 100] for i in first] == moved
    if expected < 20:  # another round or another seed draws another sample
        assert sample(strategy, grid, server_round=2) != first
        assert sample(CentralFedAvg(num_nodes=20, fraction_train=fraction, seed=8), grid) != first


def _cells(name):
    return {c.id: c for c in expand(PRESETS[name].spec)}


@pytest.mark.parametrize(
    "name, dp_mode, accounting",
    [
        ("tutorial", "update", "per-round"),
        ("tutorial-honest", "update", "composed"),
        ("tutorial-dpsgd", "sample", "composed"),
    ],
)
def test_tutorial_presets_expand_to_the_tutorials_grid(name, dp_mode, accounting):
    spec = PRESETS[name].spec
    cells = _cells(name)
    assert spec.nodes == 20
    assert sorted(cells) == sorted(
        f"{s}-eps{e}-seed7" for s in ("fedavg", "gossip") for e in ("inf", "8", "4", "2", "1")
    )
    for cell in cells.values():
        p = cell.params
        assert p["dp-mode"] == dp_mode and p["accounting"] == accounting
        assert (p["model"], p["partitioner"], p["shards-per-node"]) == ("mlp", "shards", 2)
        assert (p["lr"], p["momentum"], p["batch-size"], p["local-epochs"]) == (0.06, 0.9, 64, 1)
        assert (p["max-grad-norm"], p["delta"], p["num-server-rounds"]) == (2.0, 1e-5, 20)
        assert (p["dataset"], p["normalize"], p["node-eval-samples"]) == (
            "fashion-mnist",
            "none",
            0,
        )
        if p["strategy"] == "fedavg":
            assert p["fraction-train"] == 0.5 and "topology" not in p
        else:
            assert "fraction-train" not in p
            assert (p["topology"], p["gossip-mode"], p["gossip-edges"]) == ("ring", "edges", 10)


def test_tutorial_mixing_runs_chosen_mode_topology_pairs():
    cells = _cells("tutorial-mixing")
    gossip = {c.id for c in cells.values() if c.params["strategy"] == "gossip"}
    pairs = [("edges", "ring"), ("matching", "ring"), ("matching", "torus")]
    pairs += [("matching", "exponential"), ("metropolis", "ring")]
    assert gossip == {
        f"gossip-eps{e}-seed7-gossip-mode-{m}-topology-{t}" for e in ("inf", "2") for m, t in pairs
    }
    assert {c for c in cells if c.startswith("fedavg")} == {
        "fedavg-epsinf-seed7",
        "fedavg-eps2-seed7",
    }
    assert all(c.params["accounting"] == "composed" for c in cells.values())
    assert all(c.params["dp-mode"] == "sample" for c in cells.values())
    assert set(TUTORIAL_FIXED) - set(PRESETS["tutorial-mixing"].spec.fixed) == {
        "gossip:topology",
        "gossip:gossip-mode",
    }


def test_exact_gaussian_epsilon_matches_known_values_and_bounds_rdp_from_below():
    # Balle & Wang (2018): σ ≈ 3.73 is the analytic Gaussian mechanism's σ for ε=1, δ=1e-5.
    assert gaussian_eps_exact(noise_multiplier=3.73, steps=1, delta=DELTA) == pytest.approx(
        1.0, abs=0.01
    )
    sigma = gaussian_sigma(1.0, DELTA)
    exact = gaussian_eps_exact(noise_multiplier=sigma, steps=20, delta=DELTA)
    assert exact == pytest.approx(
        gaussian_eps_exact(noise_multiplier=sigma / 20**0.5, steps=1, delta=DELTA)
    )
    assert 1.0 < exact < epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=20, delta=DELTA)
    assert gaussian_eps_exact(noise_multiplier=sigma, steps=0, delta=DELTA) == 0.0
