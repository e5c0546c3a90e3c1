"""privacy-unit=network: σ calibrated against the far observer class, checked on the accountant."""

import math

import networkx as nx
import numpy as np
import pytest

from flower_app.config import ConfigError, RunConfig
from flower_app.gossip import random_matching, schedule_rng
from flower_app.network_calibration import (
    SIGMA_GRID,
    calibrate_sigma,
    class_rho,
    gaussian_rdp_eps,
    network_plan,
    planned_schedule,
)
from flower_app.network_dp import (
    ORDERS,
    by_distance,
    draw_schedule,
    pairwise_rdp,
    pairwise_rho,
    rdp_to_eps,
)
from flower_app.privacy import epsilon, plan_update_ledger
from flower_app.topology import build_topology

NETWORK = dict(strategy="gossip", dp_mode="update", privacy_unit="network", eps=8.0)


def _eps_by_distance(schedule, graph, sigma, delta=1e-5):
    """The largest ε at each distance, from the accountant run at σ itself."""
    eps = rdp_to_eps(pairwise_rdp(schedule, sigma), ORDERS, delta)
    return {r["distance"]: r["eps_max"] for r in by_distance(eps, graph)}


def _far_eps(schedule, graph, sigma, d):
    return max(x for k, x in _eps_by_distance(schedule, graph, sigma).items() if k >= d)


@pytest.mark.parametrize("topology", ["ring", "torus"])
@pytest.mark.parametrize("mode", ["matching", "metropolis"])
def test_calibration_meets_its_target_on_the_accountants_own_numbers(topology, mode):
    cfg = RunConfig(**NETWORK, topology=topology, gossip_mode=mode)
    plan = network_plan(cfg, 20)
    graph, schedule = planned_schedule(cfg, 20)
    sigma = plan.noise_multiplier
    # The accountant run at σ itself (not the σ = 1 shortcut the calibration takes).
    assert _far_eps(schedule, graph, sigma, 2) <= 8.0
    assert _far_eps(schedule, graph, sigma, 2) == pytest.approx(plan.network_eps(), rel=1e-9)
    # ...and σ is the smallest: a slightly smaller σ misses the target.
    assert _far_eps(schedule, graph, sigma - 10 * SIGMA_GRID, 2) > 8.0
    # Closer observers get more, and the owner's own releases (local ε) the most.
    rows = _eps_by_distance(schedule, graph, sigma)
    assert rows[0] == pytest.approx(plan.local_eps())
    # (Metropolis on these graphs: a neighbour sees as much as the owner's own releases.)
    assert rows[0] >= rows[1] - 1e-9 and rows[1] > 8.0 >= max(v for k, v in rows.items() if k >= 2)
    first = plan.report()["eps_max_by_distance"][0]
    assert first == {"distance": 1, "eps_max": pytest.approx(rows[1])}


def test_the_gaussian_curve_is_opacus_own_for_full_batch_releases():
    """Independent: R releases at σ are RDP α R / (2σ²), as Opacus's compute_rdp says."""
    for sigma, rounds in [(2.86, 20), (1.0, 1), (0.7, 5)]:
        ours = gaussian_rdp_eps(rounds / sigma**2, 1e-5)
        theirs = epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=rounds, delta=1e-5)
        assert ours == pytest.approx(theirs, rel=1e-9)


def test_calibrate_sigma_is_the_smallest_sigma_on_its_grid_and_agrees_with_opacus():
    sigma = calibrate_sigma(20.0, target_eps=8.0, delta=1e-5)
    assert gaussian_rdp_eps(20.0 / sigma**2, 1e-5) <= 8.0
    assert gaussian_rdp_eps(20.0 / (sigma - SIGMA_GRID) ** 2, 1e-5) > 8.0
    assert round(sigma / SIGMA_GRID) * SIGMA_GRID == pytest.approx(sigma, abs=1e-12)
    # Opacus searches to ε within 0.01 below the target: never a smaller σ, and close.
    opacus = plan_update_ledger(
        target_eps=8.0, delta=1e-5, rounds=20, accounting="composed", accountant="rdp"
    ).noise_multiplier
    assert sigma <= opacus < sigma * 1.01


def test_rho_scales_as_one_over_sigma_squared_and_sensitivity_squared():
    """The shortcut calibration takes: the accountant at σ = 1, rescaled."""
    g = nx.cycle_graph(7)
    missing = [set(range(7)) - {3}, set(range(7)), set(range(7)) - {0, 5}]
    schedule = draw_schedule(g, "matching", rounds=3, rng=np.random.default_rng(4),
                             gossip_steps=2, active=missing)  # fmt: skip
    unit = pairwise_rho(schedule, 1.0)
    for sigma, s in [(0.5, 1.0), (3.0, 2.0)]:
        assert np.allclose(pairwise_rho(schedule, sigma, sensitivity=s), s**2 * unit / sigma**2)


def test_class_rho_splits_observers_by_distance():
    path = nx.path_graph(4)  # distances 1, 2, 3
    rho = np.array([[5, 4, 2, 1], [4, 5, 3, 2], [2, 3, 5, 4], [1, 2, 4, 5]], dtype=float)
    got = class_rho(rho, path, 2)
    assert (got.local, got.network) == (5.0, 2.0)
    assert got.by_distance == ((1, 4.0), (2, 2.0), (3, 1.0))
    assert class_rho(rho, path, 3).network == 1.0
    with pytest.raises(ValueError, match="network-min-distance=4 exceeds the graph's diameter 3"):
        class_rho(rho, path, 4)


def test_the_planned_schedule_is_the_strategys_draw():
    """The node redraws the schedule from the run's seed with the strategy's generator."""
    from strategies.gossip import Gossip

    cfg = RunConfig(**NETWORK, seed=13, num_server_rounds=3)
    graph, schedule = planned_schedule(cfg, 10)
    assert nx.utils.graphs_equal(graph, build_topology("ring", 10, seed=13))
    strategy = Gossip(graph, mode="matching", seed=13)
    for rnd in schedule.rounds:
        pairs = random_matching(graph, strategy.rng, set(range(10)))
        w = np.eye(10)
        for u, v in pairs:
            w[[u, u, v, v], [u, v, u, v]] = 0.5
        assert np.array_equal(rnd.steps[0], w)
    assert schedule_rng(13).random() == np.random.default_rng([13, 0x6055]).random()


@pytest.mark.parametrize(
    "changes, wrong",
    [
        ({"strategy": "fedavg"}, "strategy='fedavg'"),
        ({"gossip_relay": "open"}, "gossip-relay='open'"),
        ({"dp_mode": "sample"}, "dp-mode='sample'"),
        ({"accounting": "per-round", "eps": 1.0}, "accounting='per-round'"),
        ({"eps": math.inf}, "eps=inf"),
    ],
)
def test_network_unit_outside_sealed_update_gossip_is_one_line(changes, wrong):
    with pytest.raises(ConfigError) as err:
        RunConfig(**{**NETWORK, **changes})
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"privacy-unit='network' is not valid with {wrong}")
    assert "gossip-relay='sealed'" in text and "privacy-unit='local'" in text


def test_the_run_config_keys_parse_and_default_to_local():
    cfg = RunConfig.from_run_config(
        {
            "strategy": "gossip",
            "dp-mode": "update",
            "privacy-unit": "network",
            "network-min-distance": 3,
        }  # fmt: skip
    )
    assert (cfg.privacy_unit, cfg.network_min_distance) == ("network", 3)
    assert (RunConfig().privacy_unit, RunConfig().network_min_distance) == ("local", 2)
    with pytest.raises(ConfigError, match="privacy-unit='node' is not valid; choose one of"):
        RunConfig.from_run_config({"privacy-unit": "node"})
    with pytest.raises(ConfigError, match="network-min-distance=0 is not valid"):
        RunConfig.from_run_config({"network-min-distance": 0})


@pytest.mark.parametrize(
    "changes, nodes, match",
    [
        ({"topology": "complete"}, 6, "exceeds the graph's diameter 1"),
        ({"network_min_distance": 4}, 6, "exceeds the graph's diameter 3"),
        ({"num_server_rounds": 1}, 8, "no observer that far receives anything"),
        ({}, 101, "needs 2 to 100 gossip nodes"),
    ],
)
def test_a_network_plan_that_cannot_hold_is_refused_in_one_line(changes, nodes, match):
    with pytest.raises(ConfigError, match=match) as err:
        network_plan(RunConfig(**{**NETWORK, **changes}), nodes)
    assert "\n" not in str(err.value)


def test_the_dry_run_refuses_and_the_server_bounds_a_node_by_its_local_eps():
    from flower_app.preflight import preflight
    from strategies import privacy_bounds

    with pytest.raises(ConfigError, match="network-min-distance=2 exceeds the graph's diameter 1"):
        preflight(RunConfig(**NETWORK, topology="complete"), 6)
    cfg = RunConfig(**NETWORK)
    # A node whose reply was lost is counted at the most it can spend: its local ε, not eps.
    bound = privacy_bounds(cfg, 20).run_bound
    assert bound == pytest.approx(network_plan(cfg, 20).local_eps(), rel=1e-9) and bound > 11
