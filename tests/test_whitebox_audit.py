"""The white-box update-level audit: canaries, insertion, scores, and bounds against the accountant.

The in-process run (tests/whitebox_sim.py) uses the real dp-mode=update mechanism
(`privatize_update` with the node's keyed noise) and the project's gossip mixing on a ring.
"""

import math

import networkx as nx
import numpy as np
import pytest
import torch
from opacus.accountants.analysis.gdp import eps_from_mu

from flower_app.network_dp import draw_schedule, fixed_update_rho, pairwise_rho
from flower_app.privacy import privatize_update
from flower_app.rng import PrivacyRandomness
from flower_app.whitebox_audit import (
    audit_observer,
    distance_groups,
    draw_plan,
    gdp_eps,
    insert_canaries,
    matched_filters,
    observer_scores,
    owner_scores,
    project,
    views_from_increments,
)
from tests import whitebox_sim

RING = nx.cycle_graph(10)
ROUNDS = 10


def test_the_plan_comes_from_the_audit_seed_alone():
    a, b = draw_plan(5, 40, 1000, audit_seed=3), draw_plan(5, 40, 1000, audit_seed=3)
    c = draw_plan(5, 40, 1000, audit_seed=4)
    assert np.array_equal(a.index, b.index) and np.array_equal(a.included, b.included)
    assert not np.array_equal(a.index, c.index)
    assert len(set(a.index.tolist())) == 200  # distinct coordinates: orthogonal canaries
    assert set(a.sign.tolist()) == {-1.0, 1.0}
    assert 0.35 < a.included.mean() < 0.65
    assert np.array_equal(np.bincount(a.owner), [40] * 5)
    with pytest.raises(ValueError, match="distinct coordinates"):
        draw_plan(5, 40, 199, audit_seed=0)


def test_a_canary_moves_the_clipped_release_by_exactly_c():
    """Inserted after clipping: each included canary adds C·c_i, nothing else changes."""
    plan, clip = draw_plan(3, 20, 500, audit_seed=1), 0.7
    start = np.zeros(500)
    end = np.full(500, 1.0)  # norm ≈ 22: clipped to C
    private, _ = privatize_update(
        {"x": torch.from_numpy(start)}, {"x": torch.from_numpy(end)}, clip=clip,
        noise_multiplier=0.0, noise=PrivacyRandomness.replayable(0).noise,
    )  # fmt: skip
    clipped = private["x"].numpy()
    assert np.linalg.norm(clipped - start) == pytest.approx(clip)
    released = insert_canaries(clipped, plan, 1, clip)
    mine = plan.of(1)
    shift = released - clipped
    assert np.allclose(shift[plan.index[mine]], clip * plan.sign[mine])
    assert np.count_nonzero(shift) == len(mine)
    assert np.allclose(project(shift, plan)[mine], clip)
    assert np.array_equal(insert_canaries(clipped, plan, 7, clip), clipped)  # not an owner
    with pytest.raises(ValueError, match="coordinates"):
        insert_canaries(np.zeros(10), plan, 1, clip)


def test_the_owner_score_of_an_excluded_canary_is_standard_normal():
    plan, sigma = draw_plan(4, 500, 2000, audit_seed=2), 3.0
    rng = np.random.default_rng(0)
    inc = rng.normal(0, sigma, (ROUNDS, 2000)) + plan.included * 1.0
    z = owner_scores(plan, inc, np.ones((ROUNDS, 4), dtype=bool), sigma, clip=1.0)
    out, inn = z[~plan.included], z[plan.included]
    assert abs(out.mean()) < 0.1 and abs(out.std() - 1) < 0.1
    assert inn.mean() - out.mean() == pytest.approx(math.sqrt(ROUNDS) / sigma, abs=0.1)


def test_an_observers_best_test_never_exceeds_the_accountant():
    """The filter's SNR² is the fixed-update divergence of an all-ones canary: ≤ both bounds."""
    schedule = draw_schedule(RING, "matching", rounds=6, rng=np.random.default_rng(5))
    acc, fixed = pairwise_rho(schedule, 2.0), fixed_update_rho(schedule, 2.0)
    for v in (0, 3):
        for u, f in matched_filters(schedule, 2.0, v).items():
            assert f.mu**2 <= fixed[u, v] * (1 + 1e-6) + 1e-9
            assert f.mu**2 <= acc[u, v] * (1 + 1e-6) + 1e-9


def test_observer_scores_refuse_a_view_of_the_wrong_length():
    schedule = draw_schedule(RING, "matching", rounds=2, rng=np.random.default_rng(0))
    plan = draw_plan(10, 2, 20, audit_seed=0)
    with pytest.raises(ValueError, match="receives"):
        observer_scores(plan, schedule, 1.0, 0, received=np.zeros((99, 20)),
                        own=np.zeros((2, 20)), initial=np.zeros(20), clip=1.0)  # fmt: skip


def test_canaries_are_grouped_by_their_owners_distance_from_the_observer():
    plan = draw_plan(10, 3, 30, audit_seed=0)
    groups = distance_groups(plan, RING, 0)
    assert sorted(groups) == [1, 2, 3, 4, 5]
    assert sorted(set(plan.owner[groups[1]].tolist())) == [1, 9]
    assert sorted(set(plan.owner[groups[5]].tolist())) == [5]


@pytest.mark.parametrize("mu", [0.3, 1.0, 1.566, 3.0])
def test_gdp_eps_is_opacus_s(mu):
    """The Gaussian fit's ε is the exact μ-GDP curve's, as Opacus inverts it."""
    assert gdp_eps(mu, 1e-5) == pytest.approx(eps_from_mu(mu=mu, delta=1e-5), abs=1e-6)
    assert gdp_eps(0.0, 1e-5) == 0.0 and gdp_eps(math.inf, 1e-5) == math.inf


@pytest.fixture(scope="module")
def audits():
    """One in-process ring run per ε: 10 nodes, 10 rounds, 400 canaries a node."""
    return {
        e: whitebox_sim.audit(RING, eps=e, rounds=ROUNDS, per_node=400)
        for e in (8.0, 2.0, math.inf)
    }


@pytest.mark.parametrize("eps,floor", [(8.0, 1.5), (2.0, 0.3)])
def test_under_dp_the_owners_bound_is_clearly_above_zero(audits, eps, floor):
    owner = audits[eps][0]
    assert owner["observer"] == "owner" and owner["canaries"] == 4000
    assert owner["eps_lower"] > floor
    sigma = whitebox_sim.sigma_for(eps, ROUNDS, 1e-5)
    assert owner["mu_hat"] == pytest.approx(math.sqrt(ROUNDS) / sigma, abs=0.12)


@pytest.mark.parametrize("eps", [8.0, 2.0])
def test_no_bound_crosses_the_accountant_at_any_distance(audits, eps):
    rows = audits[eps]
    assert [r["distance"] for r in rows] == [0, 1, 2, 3, 4, 5]
    for r in rows:
        assert r["eps_lower"] <= r["eps_accountant"], r
    assert rows[1]["eps_lower"] > 0  # a direct partner sees the canaries too


def test_without_dp_every_bound_is_large(audits):
    for r in audits[math.inf]:
        assert r["eps_lower"] > 3, r
        assert r["eps_accountant"] == math.inf


def test_views_rebuilt_from_increments_are_what_the_observers_received():
    """The ServerApp's rebuilt view equals the messages recorded in the in-process run."""
    plan = draw_plan(10, 20, 400, audit_seed=1)
    schedule = draw_schedule(RING, "matching", rounds=5, rng=np.random.default_rng(2))
    views, initial = whitebox_sim.run(RING, plan, schedule, sigma=1.0, clip=1.0, observers=(0, 3))
    for v in (0, 3):
        rebuilt = views_from_increments(schedule, v, views.increments, initial)
        assert np.allclose(rebuilt, np.array(views.received[v]), atol=1e-10)
    with pytest.raises(ValueError, match="schedule differs"):
        views_from_increments(schedule, 0, views.increments[:4], initial)


def test_the_audit_observer_comes_from_the_audit_seed():
    assert audit_observer(20, 0) == audit_observer(20, 0)
    assert len({audit_observer(20, s) for s in range(40)}) > 5
    assert all(0 <= audit_observer(7, s) < 7 for s in range(20))
