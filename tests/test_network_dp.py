import itertools
import math
import warnings

import networkx as nx
import numpy as np
import pytest
from opacus.accountants.analysis.rdp import get_privacy_spent
from scipy.stats import norm

from flower_app.gossip import (
    apply_metropolis,
    apply_pairs,
    metropolis_weights,
    random_edges,
    random_matching,
)
from flower_app.network_dp import (
    ORDERS,
    GossipRound,
    Schedule,
    by_distance,
    draw_schedule,
    edge_matrices,
    fixed_update_rho,
    metropolis_matrix,
    muffliato_rho,
    pairs_matrix,
    pairwise_rdp,
    pairwise_rho,
    rdp_to_eps,
)

# --- an oracle that shares no code with the accountant ---------------------------------------
# A plan is what a run did, in the terms of flower_app.gossip: per round the active nodes and
# the gossip steps, each ("matching", pairs), ("edges", pairs) or ("metropolis", weights).


def _plan(g, mode, *, rounds, steps, seed, missing=None):
    rng, n, out = np.random.default_rng(seed), g.number_of_nodes(), []
    for r in range(rounds):
        active = set(range(n)) - ((missing or {}).get(r, set()))
        todo = []
        for _ in range(steps):
            if mode == "matching":
                todo.append(("matching", random_matching(g, rng, active)))
            elif mode == "edges":
                todo.append(("edges", random_edges(g, 3, rng, active)))
            else:
                todo.append(("metropolis", metropolis_weights(g, active)))
        out.append((active, todo))
    return out


def _schedule(n, plan):
    rounds = []
    for active, todo in plan:
        steps = []
        for kind, what in todo:
            if kind == "matching":
                steps.append(pairs_matrix(n, what))
            elif kind == "edges":
                steps += edge_matrices(n, what)
            else:
                steps.append(metropolis_matrix(n, what))
        rounds.append(GossipRound(frozenset(active), tuple(steps)))
    return Schedule(n, tuple(rounds))


def _observed(n, plan, v):
    """Run the gossip of flower_app.gossip on a 1-dimensional model whose value is a linear
    form in one variable per (round, node) (that node's update plus noise), recording every
    model v receives. Returns the forms as rows."""
    rounds = len(plan)
    models = {w: np.zeros(rounds * n) for w in range(n)}
    seen = []
    for r, (active, todo) in enumerate(plan):
        for w in active:
            models[w] = models[w] + np.eye(rounds * n)[r * n + w]
        for kind, what in todo:
            if kind == "metropolis":
                seen += [models[j] for (i, j) in what if i == v and j != v]
                models.update(apply_metropolis({w: models[w] for w in active}, what))
                continue
            for a, b in what:
                if v in (a, b):
                    seen.append(models[b if v == a else a])
                if kind == "edges":
                    models = apply_pairs(models, [(a, b)], sequential=True)
            if kind == "matching":
                models = apply_pairs(models, what, sequential=False)
    return np.array(seen).reshape(-1, rounds * n)


def oracle_rho(n, plan, sigma, u, v):
    """Exact α-free divergence of v's view for fixed 1-d updates |d_r| <= 1 of u:
    max_d (G_u d)ᵀ Σ⁺ (G_u d), Σ = G D Gᵀ, v's own noise known (left out of D)."""
    g = _observed(n, plan, v)
    sig = np.broadcast_to(np.asarray(sigma, float), (n,))
    var = np.array(
        [sig[w] ** 2 if (w in active and w != v) else 0.0 for active, _ in plan for w in range(n)]
    )
    cols = [r * n + u for r, (active, _) in enumerate(plan) if u in active]
    if not cols or g.size == 0:
        return 0.0
    cov = g @ np.diag(var) @ g.T
    pinv = np.linalg.pinv(cov, rcond=1e-12, hermitian=True)
    shift = g[:, cols]
    if not np.allclose(cov @ pinv @ shift, shift, atol=1e-9):
        return math.inf
    q = shift.T @ pinv @ shift
    return max(
        float(np.array(s) @ q @ np.array(s)) for s in itertools.product((1, -1), repeat=len(cols))
    )


GRAPHS = {
    "complete": nx.complete_graph(5),
    "ring": nx.cycle_graph(6),
    "path": nx.path_graph(5),
    "star": nx.star_graph(4),
}


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("mode", ["matching", "edges", "metropolis"])
@pytest.mark.parametrize(("rounds", "steps"), [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_accountant_never_falls_below_the_exact_oracle_and_meets_it_in_one_round(
    graph, mode, rounds, steps
):
    g = GRAPHS[graph]
    n = g.number_of_nodes()
    missing = {1: {1}} if rounds > 1 else None  # node 1 misses the middle round
    plan = _plan(g, mode, rounds=rounds, steps=steps, seed=rounds * 10 + steps, missing=missing)
    schedule = _schedule(n, plan)
    acc = pairwise_rho(schedule, 1.3)
    fixed = fixed_update_rho(schedule, 1.3)
    for u, v in itertools.permutations(range(n), 2):
        exact = oracle_rho(n, plan, 1.3, u, v)
        assert fixed[u, v] == pytest.approx(exact, rel=1e-7, abs=1e-9), (u, v)
        assert acc[u, v] >= exact - 1e-9 * (1 + exact), (u, v, acc[u, v], exact)
        if rounds == 1:  # nothing is carried to a later round: the exact view
            assert acc[u, v] == pytest.approx(exact, rel=1e-7, abs=1e-9), (u, v)


def test_accountant_bounds_the_oracle_with_a_different_noise_per_node():
    g = nx.cycle_graph(6)
    plan = _plan(g, "metropolis", rounds=3, steps=2, seed=0, missing={0: {4}})
    sigma = [0.8, 1.0, 1.6, 2.0, 0.5, 1.2]
    acc = pairwise_rho(_schedule(6, plan), sigma)
    for u, v in itertools.permutations(range(6), 2):
        assert acc[u, v] >= oracle_rho(6, plan, sigma, u, v) - 1e-9


def _renyi2_of_relayed_model(sigma, update):
    """v's view on the path u - w - v: w first averages with u, then trains, then sends v
    its model. D_2 between u's update 1 and absent (0), by numerical integration."""
    xs = np.linspace(-2, 3, 2001)
    ms = np.linspace(-3, 5, 801)

    def density(d):
        weight = norm.pdf(xs, d / 2, sigma / math.sqrt(2)) * (xs[1] - xs[0])
        sent = xs + update(xs)
        noise = np.exp(-((ms[:, None] - sent[None, :]) ** 2) / (2 * sigma**2))
        return noise @ weight / (sigma * math.sqrt(2 * math.pi))

    p, q = density(1.0), density(0.0)
    return math.log(np.sum(p**2 / q) * (ms[1] - ms[0]))


def test_updates_that_depend_on_the_model_beat_the_fixed_update_value_but_not_the_accountant():
    """Why `pairwise_rho` reveals carried models: w's update C·sign(model - C/4) leaks more
    of u's earlier update than any fixed update lets through, and the accountant bounds it."""
    sigma = 0.3
    schedule = Schedule(
        3,
        (
            GossipRound(frozenset({0, 1, 2}), (pairs_matrix(3, [(0, 1)]),)),
            GossipRound(frozenset({0, 1, 2}), (pairs_matrix(3, [(1, 2)]),)),
        ),
    )
    bound = pairwise_rdp(schedule, sigma, [2.0])[0, 2, 0]
    fixed = fixed_update_rho(schedule, sigma)[0, 2]  # α/2 · ρ at α = 2 is ρ
    assert fixed == pytest.approx(0.25 / (1.5 * sigma**2))
    assert bound == pytest.approx(0.25 / (0.5 * sigma**2))  # w's model (ξ_u + ξ_w) / 2
    assert _renyi2_of_relayed_model(sigma, lambda x: 0 * x) == pytest.approx(fixed, rel=1e-3)
    adaptive = _renyi2_of_relayed_model(sigma, lambda x: np.sign(x - 0.25))
    assert adaptive > 1.2 * fixed
    assert adaptive <= bound


def test_local_dp_on_the_diagonal_matches_the_apps_own_accountant():
    from flower_app.privacy import RDP_ORDERS, epsilon

    assert ORDERS == RDP_ORDERS
    g = nx.cycle_graph(6)
    plan = _plan(g, "metropolis", rounds=4, steps=1, seed=0, missing={2: {3}})
    rdp = pairwise_rdp(_schedule(6, plan), 2.0)
    eps = rdp_to_eps(rdp, ORDERS, 1e-5)
    for u in range(6):
        trained = 3 if u == 3 else 4
        assert rdp[u, u] == pytest.approx(np.asarray(ORDERS) * trained / (2 * 2.0**2))
        local = epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=trained, delta=1e-5)
        assert eps[u, u] == pytest.approx(local, rel=1e-9)
        assert np.all(eps[u] <= eps[u, u] + 1e-9)  # nobody learns more than the releases


def test_a_node_never_heard_from_has_eps_zero():
    g = nx.cycle_graph(5)
    g.add_node(5)  # isolated: trains, never talks
    plan = _plan(g, "metropolis", rounds=3, steps=2, seed=0, missing={r: {2} for r in range(3)})
    eps = rdp_to_eps(pairwise_rdp(_schedule(6, plan), 1.0), ORDERS, 1e-5)
    others = [w for w in range(6) if w != 5]
    assert np.all(eps[5, others] == 0.0) and np.all(eps[others, 5] == 0.0)
    assert eps[5, 5] > 0
    assert np.all(eps[2] == 0.0)  # node 2 never trained: nothing of its data is out
    assert np.all(eps[[0, 1, 3, 4]][:, [0, 1, 3, 4]] > 0)


@pytest.mark.parametrize("n", [7, 8])
def test_metropolis_on_a_ring_falls_with_distance_and_is_equal_at_equal_distance(n):
    g = nx.cycle_graph(n)
    schedule = draw_schedule(g, "metropolis", rounds=5, rng=np.random.default_rng(0))
    eps = rdp_to_eps(pairwise_rdp(schedule, 1.0), ORDERS, 1e-5)
    table = by_distance(eps, g)
    assert [row["distance"] for row in table] == list(range(n // 2 + 1))
    for row in table:
        assert row["eps_max"] - row["eps_min"] <= 1e-9 * row["eps_max"]
    means = [row["eps_mean"] for row in table]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(means))
    assert means[-1] < means[1]  # it does fall, not only stay level


def test_matching_on_a_ring_falls_with_distance():
    g = nx.cycle_graph(8)
    schedule = draw_schedule(g, "matching", rounds=5, rng=np.random.default_rng(0))
    table = by_distance(rdp_to_eps(pairwise_rdp(schedule, 1.0), ORDERS, 1e-5), g)
    means = [row["eps_mean"] for row in table]
    assert all(a >= b for a, b in itertools.pairwise(means)) and means[-1] < means[1]


def test_more_noise_gives_less_eps_and_replacement_costs_four_times_rho():
    g = nx.cycle_graph(6)
    schedule = draw_schedule(g, "matching", rounds=3, gossip_steps=2, rng=np.random.default_rng(1))
    low, high = pairwise_rho(schedule, 1.0), pairwise_rho(schedule, 2.0)
    assert np.allclose(high, low / 4)
    eps_low = rdp_to_eps(pairwise_rdp(schedule, 1.0), ORDERS, 1e-5)
    eps_high = rdp_to_eps(pairwise_rdp(schedule, 2.0), ORDERS, 1e-5)
    assert np.all(eps_high[low > 0] < eps_low[low > 0])
    assert np.allclose(pairwise_rho(schedule, 1.0, sensitivity=2.0), 4 * low)


def test_muffliato_per_message_sum_is_not_a_bound_on_the_joint_view():
    g = nx.cycle_graph(8)
    one = draw_schedule(g, "matching", rounds=1, rng=np.random.default_rng(0))
    assert np.allclose(muffliato_rho(one, 1.0), pairwise_rho(one, 1.0))  # one message each
    plan = _plan(g, "metropolis", rounds=1, steps=3, seed=0)
    muff = muffliato_rho(_schedule(8, plan), 1.0)
    exact = oracle_rho(8, plan, 1.0, 0, 3)
    assert muff[0, 3] < 0.5 * exact  # distance 3 after 3 steps: v reconstructs u's release
    assert exact == pytest.approx(1.0)


def test_by_distance_groups_ordered_pairs_by_shortest_path():
    g = nx.path_graph(3)
    g.add_node(3)
    eps = np.arange(16, dtype=float).reshape(4, 4)
    table = by_distance(eps, g)
    assert table == [
        {"distance": 0, "pairs": 4, "eps_min": 0.0, "eps_mean": 7.5, "eps_max": 15.0},
        {"distance": 1, "pairs": 4, "eps_min": 1.0, "eps_mean": 5.0, "eps_max": 9.0},
        {"distance": 2, "pairs": 2, "eps_min": 2.0, "eps_mean": 5.0, "eps_max": 8.0},
        {"distance": None, "pairs": 6, "eps_min": 3.0, "eps_mean": 10.0, "eps_max": 14.0},
    ]
    with pytest.raises(ValueError):
        by_distance(eps[:3, :3], g)


@pytest.mark.parametrize("rho", [0.01, 0.3, 2.0, 40.0])
def test_rdp_to_eps_matches_opacus(rho):
    curve = np.asarray(ORDERS) * rho / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, _ = get_privacy_spent(orders=ORDERS, rdp=curve, delta=1e-5)
    assert rdp_to_eps(curve, ORDERS, 1e-5) == pytest.approx(expected, rel=1e-12)
    stacked = rdp_to_eps(np.stack([curve, 0 * curve, np.inf + curve]), ORDERS, 1e-5)
    assert stacked[0] == pytest.approx(expected) and stacked[1] == 0.0 and stacked[2] == math.inf


def test_builders_step_exactly_as_the_gossip_functions_do():
    rng = np.random.default_rng(3)
    g = nx.cycle_graph(6)
    models = {w: rng.normal(size=4) for w in range(6)}
    x = np.stack([models[w] for w in range(6)])
    pairs = random_matching(g, rng)
    got = apply_pairs(models, pairs, sequential=False)
    assert np.allclose(pairs_matrix(6, pairs) @ x, np.stack([got[w] for w in range(6)]))
    edges = random_edges(g, 5, rng)
    got = apply_pairs(models, edges, sequential=True)
    y = x
    for w in edge_matrices(6, edges):
        y = w @ y
    assert np.allclose(y, np.stack([got[w] for w in range(6)]))
    weights = metropolis_weights(g, {0, 1, 2, 4})
    got = apply_metropolis({w: models[w] for w in (0, 1, 2, 4)}, weights)
    mixed = metropolis_matrix(6, weights) @ x
    assert np.allclose(mixed[[0, 1, 2, 4]], np.stack([got[w] for w in (0, 1, 2, 4)]))
    assert np.allclose(mixed[[3, 5]], x[[3, 5]])


def test_draw_schedule_draws_what_the_strategy_draws_and_schedules_are_checked():
    g = nx.cycle_graph(6)
    missing = {0: {2}, 1: set()}
    plan = _plan(g, "edges", rounds=2, steps=2, seed=5, missing=missing)
    drawn = draw_schedule(
        g,
        "edges",
        rounds=2,
        gossip_steps=2,
        edges_per_round=3,
        rng=np.random.default_rng(5),
        active=[set(range(6)) - missing[r] for r in range(2)],
    )
    expected = _schedule(6, plan)
    assert [r.active for r in drawn.rounds] == [r.active for r in expected.rounds]
    for a, b in zip(drawn.rounds, expected.rounds, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a.steps, b.steps, strict=True))
    with pytest.raises(ValueError, match="sum to 1"):
        Schedule(3, (GossipRound(frozenset({0, 1, 2}), (np.full((3, 3), 0.5),)),))
    with pytest.raises(ValueError, match="idle node"):
        Schedule(3, (GossipRound(frozenset({0, 1}), (pairs_matrix(3, [(1, 2)]),)),))
    with pytest.raises(ValueError, match="disjoint"):
        pairs_matrix(4, [(0, 1), (1, 2)])
