import math

import networkx as nx
import numpy as np
import pytest

from flower_app.gossip import (
    GOSSIP_MODES,
    apply_metropolis,
    apply_pairs,
    consensus_distance,
    gossip_matrix,
    mean_model,
    metropolis_weights,
    pairwise_average,
    random_edges,
    random_matching,
)
from flower_app.topology import TOPOLOGIES, build_topology, graph_facts

N, DIM = 20, 7


def _models(seed: int, n: int = N) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.normal(size=DIM) for i in range(n)}


def _total(models: dict[int, np.ndarray]) -> np.ndarray:
    return np.sum(list(models.values()), axis=0)


def _gossip_round(mode: str, g: nx.Graph, models, rng):
    if mode == "matching":
        return apply_pairs(models, random_matching(g, rng), sequential=False)
    if mode == "edges":
        return apply_pairs(models, random_edges(g, 10, rng), sequential=True)
    return apply_metropolis(models, metropolis_weights(g))


@pytest.fixture(scope="module")
def ring() -> nx.Graph:
    return build_topology("ring", N, seed=0)


# --- who talks ---


@pytest.mark.parametrize("name", ["ring", "torus", "erdos-renyi", "complete", "star"])
def test_matching_is_a_maximal_matching_of_graph_edges(name):
    g = build_topology(name, N, seed=1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        pairs = random_matching(g, rng)
        ends = [x for p in pairs for x in p]
        assert len(ends) == len(set(ends))
        assert all(g.has_edge(u, v) and u < v for u, v in pairs)
        free = set(g) - set(ends)
        assert not any(u in free and v in free for u, v in g.edges)


def test_matching_respects_active(ring):
    rng = np.random.default_rng(0)
    active = {0, 1, 2, 5, 6, 10}
    for _ in range(20):
        pairs = random_matching(ring, rng, active)
        ends = {x for p in pairs for x in p}
        assert ends <= active
        assert len(ends) == 2 * len(pairs)
        free = active - ends
        assert not any(u in free and v in free for u, v in ring.edges)


def test_matching_is_deterministic_in_rng_and_varies(ring):
    a = random_matching(ring, np.random.default_rng(4))
    b = random_matching(ring, np.random.default_rng(4))
    assert a == b
    assert len({tuple(random_matching(ring, np.random.default_rng(s))) for s in range(5)}) > 1


def test_matching_with_no_active_edge_is_empty(ring):
    assert random_matching(ring, np.random.default_rng(0), {0, 2, 4}) == []


def test_unknown_active_vertex_fails(ring):
    with pytest.raises(ValueError, match=r"\[99\]"):
        random_matching(ring, np.random.default_rng(0), {0, 99})


def test_random_edges_are_active_graph_edges(ring):
    rng = np.random.default_rng(0)
    active = set(range(10))
    edges = random_edges(ring, 500, rng, active)
    assert len(edges) == 500
    assert all(ring.has_edge(u, v) and u in active and v in active for u, v in edges)
    # with replacement and uniform: all 9 active edges show up, repeats happen
    assert set(edges) == {(i, i + 1) for i in range(9)}


def test_random_edges_empty_cases(ring):
    rng = np.random.default_rng(0)
    assert random_edges(ring, 5, rng, {0, 2}) == []
    assert random_edges(ring, 0, rng) == []
    with pytest.raises(ValueError, match="k must be >= 0"):
        random_edges(ring, -1, rng)


# --- how models mix ---


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_metropolis_weights_are_doubly_stochastic(name):
    g = build_topology(name, N, seed=2)
    w = gossip_matrix(g, "metropolis")
    assert np.allclose(w, w.T)
    assert np.allclose(w.sum(axis=0), 1) and np.allclose(w.sum(axis=1), 1)
    assert (w >= 0).all()


def test_ring_metropolis_is_one_third_everywhere(ring):
    w = metropolis_weights(ring)
    assert w[0, 0] == pytest.approx(1 / 3)
    assert w[0, 1] == w[1, 0] == w[0, 19] == pytest.approx(1 / 3)
    assert len(w) == N + 2 * N


def test_metropolis_with_active_uses_the_induced_subgraph(ring):
    active = {0, 1, 2, 7}
    w = metropolis_weights(ring, active)
    # path 0-1-2 inside the active set: degrees 1, 2, 1
    assert w[0, 1] == w[1, 2] == pytest.approx(1 / 3)
    assert w[0, 0] == w[2, 2] == pytest.approx(2 / 3)
    assert w[1, 1] == pytest.approx(1 / 3)
    assert w[7, 7] == 1.0  # active but isolated
    assert w[5, 5] == 1.0  # inactive
    assert not any(i != j and (i not in active or j not in active) for i, j in w)
    models = _models(0)
    out = apply_metropolis(models, w)
    for i in set(range(N)) - {0, 1, 2}:
        np.testing.assert_array_equal(out[i], models[i])
    np.testing.assert_allclose(_total(out), _total(models))


def test_pairwise_average():
    a, b = np.array([1.0, 2.0]), np.array([3.0, 6.0])
    np.testing.assert_allclose(pairwise_average(a, b), [2.0, 4.0])
    np.testing.assert_allclose(pairwise_average(a, b, 0.75), [1.5, 3.0])


@pytest.mark.parametrize("mode", GOSSIP_MODES)
@pytest.mark.parametrize("name", ["ring", "torus", "erdos-renyi", "star"])
def test_every_mode_conserves_the_plain_sum(mode, name):
    g = build_topology(name, N, seed=5)
    rng = np.random.default_rng(1)
    models = _models(2)
    total = _total(models)
    for _ in range(10):
        models = _gossip_round(mode, g, models, rng)
    np.testing.assert_allclose(_total(models), total, atol=1e-10)


def test_apply_pairs_returns_a_new_dict_and_leaves_inputs_alone():
    models = _models(0, 4)
    before = {i: x.copy() for i, x in models.items()}
    out = apply_pairs(models, [(0, 1)], sequential=False)
    assert out is not models
    for i in models:
        np.testing.assert_array_equal(models[i], before[i])
    np.testing.assert_allclose(out[0], (before[0] + before[1]) / 2)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[2], before[2])


def test_sequential_pairs_see_earlier_results():
    models = {0: np.array([0.0]), 1: np.array([4.0]), 2: np.array([8.0])}
    out = apply_pairs(models, [(0, 1), (1, 2)], sequential=True)
    # (0,1) -> 2, 2; then (1,2) -> (2+8)/2 = 5
    assert [out[i][0] for i in range(3)] == [2.0, 5.0, 5.0]


def test_snapshot_pairs_must_be_disjoint():
    models = _models(0, 3)
    with pytest.raises(ValueError, match="disjoint"):
        apply_pairs(models, [(0, 1), (1, 2)], sequential=False)


def test_weighted_pairs_conserve_the_weighted_sum_not_the_plain_sum():
    models = {0: np.array([0.0]), 1: np.array([10.0])}
    weights = {0: 3.0, 1: 1.0}
    out = apply_pairs(models, [(0, 1)], sequential=False, weights=weights)
    assert out[0][0] == out[1][0] == pytest.approx(2.5)
    assert sum(weights[i] * out[i][0] for i in out) == pytest.approx(10.0)
    assert _total(out)[0] != pytest.approx(_total(models)[0])
    # zero weights fall back to the plain mean; negative ones are refused
    out = apply_pairs(models, [(0, 1)], sequential=False, weights={0: 0, 1: 0})
    assert out[0][0] == 5.0
    with pytest.raises(ValueError, match=">= 0"):
        apply_pairs(models, [(0, 1)], sequential=False, weights={0: -1, 1: 1})


def test_apply_metropolis_needs_a_row_for_every_model(ring):
    models = _models(0)
    models[99] = np.zeros(DIM)
    with pytest.raises(ValueError, match=r"\[99\]"):
        apply_metropolis(models, metropolis_weights(ring))


# --- convergence without training ---


def test_metropolis_on_a_ring_converges_as_fast_as_the_spectral_gap_says(ring):
    w = metropolis_weights(ring)
    gap = graph_facts(ring, gossip_matrix(ring, "metropolis"))["spectral_gap"]
    models = _models(3)
    mean, d0 = mean_model(models), consensus_distance(models)
    for t in range(1, 301):
        models = apply_metropolis(models, w)
        assert consensus_distance(models) <= (1 - gap) ** (2 * t) * d0 * (1 + 1e-9) + 1e-15
    for x in models.values():
        np.testing.assert_allclose(x, mean, atol=1e-4)


def test_matching_on_a_ring_converges_to_the_mean(ring):
    rng = np.random.default_rng(0)
    models = _models(4)
    mean, d0 = mean_model(models), consensus_distance(models)
    for _ in range(1500):
        models = apply_pairs(models, random_matching(ring, rng), sequential=False)
    assert consensus_distance(models) < 1e-8 * d0
    for x in models.values():
        np.testing.assert_allclose(x, mean, atol=1e-4)


def test_edges_on_a_ring_converge_to_the_mean(ring):
    rng = np.random.default_rng(0)
    models = _models(5)
    mean = mean_model(models)
    for _ in range(1500):
        models = apply_pairs(models, random_edges(ring, 10, rng), sequential=True)
    for x in models.values():
        np.testing.assert_allclose(x, mean, atol=1e-4)


# --- expected matrices ---


@pytest.mark.parametrize("mode", GOSSIP_MODES)
@pytest.mark.parametrize("name", ["ring", "torus", "star", "exponential"])
def test_gossip_matrix_is_symmetric_doubly_stochastic_with_a_positive_gap(mode, name):
    g = build_topology(name, N, seed=0)
    w = gossip_matrix(g, mode)
    assert w.shape == (N, N)
    assert np.allclose(w, w.T)
    assert np.allclose(w.sum(axis=1), 1)
    assert 0 < graph_facts(g, w)["spectral_gap"] <= 1


def test_gossip_matrix_is_deterministic(ring):
    np.testing.assert_array_equal(gossip_matrix(ring, "matching"), gossip_matrix(ring, "matching"))


def test_edges_matrix_is_a_power_of_the_expected_edge_average(ring):
    one = gossip_matrix(ring, "edges", edges_per_round=1)
    lap = nx.laplacian_matrix(ring, nodelist=range(N)).toarray()
    np.testing.assert_allclose(one, np.eye(N) - lap / (2 * N))
    ten = gossip_matrix(ring, "edges", edges_per_round=10)
    np.testing.assert_allclose(ten, np.linalg.matrix_power(one, 10))
    gap1 = graph_facts(ring, one)["spectral_gap"]
    assert graph_facts(ring, ten)["spectral_gap"] == pytest.approx(1 - (1 - gap1) ** 10)


def test_gossip_matrix_rejects_bad_input(ring):
    with pytest.raises(ValueError, match="matching, edges, metropolis"):
        gossip_matrix(ring, "push-sum")
    with pytest.raises(ValueError, match="edges_per_round"):
        gossip_matrix(ring, "edges", edges_per_round=0)
    with pytest.raises(ValueError, match="0..n-1"):
        gossip_matrix(nx.relabel_nodes(ring, {0: 100}), "metropolis")


def test_mean_and_consensus_distance():
    models = {0: np.array([0.0, 0.0]), 1: np.array([2.0, 4.0])}
    np.testing.assert_allclose(mean_model(models), [1.0, 2.0])
    assert consensus_distance(models) == pytest.approx(5.0)
    assert consensus_distance({0: np.ones(3), 1: np.ones(3)}) == 0.0
    with pytest.raises(ValueError):
        mean_model({})
    assert math.isfinite(consensus_distance(_models(0)))
