import math

import networkx as nx
import numpy as np
import pytest

from flower_app.gossip import gossip_matrix
from flower_app.topology import (
    TOPOLOGIES,
    TopologyError,
    build_topology,
    graph_facts,
    torus_shape,
)


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_every_topology_is_connected_over_0_to_n_minus_1(name):
    g = build_topology(name, 20, seed=3)
    assert list(g.nodes) == list(range(20))
    assert nx.is_connected(g)
    assert nx.number_of_selfloops(g) == 0
    assert all(u < v for u, v in g.edges)
    assert g.graph["name"] == name


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_same_seed_same_graph(name):
    a = build_topology(name, 20, seed=11)
    b = build_topology(name, 20, seed=11)
    assert list(a.edges) == list(b.edges)


@pytest.mark.parametrize("name", ["k-regular", "erdos-renyi", "small-world"])
def test_random_topologies_depend_on_seed(name):
    graphs = {tuple(build_topology(name, 20, seed=s).edges) for s in range(4)}
    assert len(graphs) > 1


def test_shapes_of_the_fixed_topologies():
    assert all(d == 2 for _, d in build_topology("ring", 20, seed=0).degree)
    assert build_topology("complete", 20, seed=0).number_of_edges() == 190
    star = build_topology("star", 20, seed=0)
    assert star.degree[0] == 19
    assert all(star.degree[i] == 1 for i in range(1, 20))


def test_torus_is_4_by_5_with_wraparound():
    assert torus_shape(20) == (4, 5)
    g = build_topology("torus", 20, seed=0)
    assert all(d == 4 for _, d in g.degree)
    assert g.number_of_edges() == 40
    # vertex i*5 + j is cell (i, j): (0, 0) wraps to (3, 0) = 15 and (0, 4) = 4
    assert set(g[0]) == {1, 4, 5, 15}


def test_torus_factors_as_square_as_possible():
    assert torus_shape(9) == (3, 3)
    assert torus_shape(36) == (6, 6)
    assert torus_shape(7) is None
    assert torus_shape(8) is None  # 2 x 4 would double edges


def test_torus_fails_clearly_at_7_nodes():
    with pytest.raises(TopologyError, match=r"topology=torus .*rows x cols.*got 7 nodes"):
        build_topology("torus", 7, seed=0)


def test_k_regular_has_the_degree():
    g = build_topology("k-regular", 20, seed=5, degree=4)
    assert all(d == 4 for _, d in g.degree)


@pytest.mark.parametrize(("n", "degree"), [(20, 20), (7, 3), (20, 0)])
def test_k_regular_rejects_impossible_degrees(n, degree):
    with pytest.raises(TopologyError, match="topology=k-regular"):
        build_topology("k-regular", n, seed=0, degree=degree)


def test_small_world_rejects_odd_degree():
    with pytest.raises(TopologyError, match="topology=small-world .*even"):
        build_topology("small-world", 20, seed=0, degree=3)


def test_sparse_erdos_renyi_fails_as_disconnected():
    with pytest.raises(TopologyError, match=r"disconnected.*larger edge-prob"):
        build_topology("erdos-renyi", 20, seed=0, edge_prob=0.01)


def test_exponential_links_powers_of_two():
    g = build_topology("exponential", 20, seed=0)
    assert set(g[0]) == {1, 2, 4, 8, 16, 19, 18, 12}


def test_unknown_name_lists_valid_ones():
    with pytest.raises(TopologyError, match="ring, torus, k-regular"):
        build_topology("hypercube", 20, seed=0)


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_fewer_than_two_nodes_fails(name):
    with pytest.raises(TopologyError, match=f"topology={name}"):
        build_topology(name, 1, seed=0)


def test_ring_metropolis_spectral_gap_matches_closed_form():
    g = build_topology("ring", 20, seed=0)
    facts = graph_facts(g, gossip_matrix(g, "metropolis"))
    gap = 1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / 20))
    assert facts["spectral_gap"] == pytest.approx(gap, rel=1e-9)
    assert facts["mixing_time"] == math.ceil(1 / gap)
    assert facts == {
        "nodes": 20,
        "edges": 20,
        "diameter": 10,
        "spectral_gap": facts["spectral_gap"],
        "mixing_time": facts["mixing_time"],
    }
    assert all(type(v) in (int, float) for v in facts.values())


def test_complete_metropolis_mixes_in_one_round():
    g = build_topology("complete", 10, seed=0)
    facts = graph_facts(g, gossip_matrix(g, "metropolis"))
    assert facts["spectral_gap"] == pytest.approx(1.0)
    assert facts["mixing_time"] == 1
    assert facts["diameter"] == 1


def test_zero_gap_gives_infinite_mixing_time():
    g = build_topology("ring", 6, seed=0)
    facts = graph_facts(g, np.eye(6))
    assert facts["spectral_gap"] == 0.0
    assert facts["mixing_time"] == math.inf


def test_graph_facts_rejects_a_wrong_matrix():
    g = build_topology("ring", 6, seed=0)
    with pytest.raises(ValueError, match="symmetric 6 x 6"):
        graph_facts(g, np.eye(5))
