"""Communication graphs for gossip learning; vertices are partition ids 0..n-1.

Every builder is deterministic in `seed` and returns a connected, canonical `nx.Graph`
(nodes 0..n-1 inserted in order, edges as sorted `(u, v)` with `u < v`), so two runs with
the same seed gossip over the same graph. Bad requests raise `TopologyError` with one line
naming the topology, the node count and what is valid.
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np

TOPOLOGIES = (
    "ring",
    "torus",
    "k-regular",
    "erdos-renyi",
    "small-world",
    "complete",
    "star",
    "exponential",
)
# Eigenvalues within this of 1 (in absolute value) count as 1: the gap is then 0.
_GAP_TOL = 1e-12


class TopologyError(ValueError):
    """Bad topology request: one line naming topology, node count and what is valid."""


def torus_shape(n: int) -> tuple[int, int] | None:
    """The most square `(rows, cols)` with `rows * cols == n` and both >= 3, or None.

    Both sides need >= 3 so that wrapping around adds new edges instead of doubling old ones.
    """
    best = None
    for rows in range(3, math.isqrt(n) + 1):
        if n % rows == 0 and n // rows >= 3:
            best = (rows, n // rows)
    return best


def _exponential_graph(n: int) -> nx.Graph:
    """Node i talks to i + 2^k (mod n) for every 2^k <= n - 1: log-diameter, sparse."""
    g = nx.empty_graph(n)
    for k in range((n - 1).bit_length()):
        g.add_edges_from((i, (i + 2**k) % n) for i in range(n))
    return g


def _torus_graph(n: int) -> nx.Graph:
    shape = torus_shape(n)
    if shape is None:
        raise TopologyError(
            f"topology=torus needs a node count that factors as rows x cols with both >= 3; "
            f"got {n} nodes"
        )
    rows, cols = shape
    grid = nx.grid_2d_graph(rows, cols, periodic=True)
    return nx.relabel_nodes(grid, {(i, j): i * cols + j for i, j in grid.nodes})


def _regular_graph(n: int, degree: int, seed: int) -> nx.Graph:
    if not 1 <= degree < n or (n * degree) % 2:
        raise TopologyError(
            f"topology=k-regular needs 1 <= degree < nodes and nodes*degree even; "
            f"got degree={degree} with {n} nodes"
        )
    return nx.random_regular_graph(degree, n, seed=seed)


def _small_world_graph(n: int, degree: int, edge_prob: float, seed: int) -> nx.Graph:
    if not 2 <= degree < n or degree % 2 or not 0 <= edge_prob <= 1:
        raise TopologyError(
            f"topology=small-world needs an even 2 <= degree < nodes (degree/2 ring neighbours "
            f"per side) and 0 <= edge-prob <= 1; got degree={degree}, edge-prob={edge_prob} "
            f"with {n} nodes"
        )
    try:
        return nx.connected_watts_strogatz_graph(n, degree, edge_prob, seed=seed)
    except nx.NetworkXError as e:
        raise TopologyError(
            f"topology=small-world with {n} nodes stayed disconnected after rewiring "
            f"(seed={seed}, degree={degree}, edge-prob={edge_prob}): {e}"
        ) from e


def _erdos_renyi_graph(n: int, edge_prob: float, seed: int) -> nx.Graph:
    if not 0 <= edge_prob <= 1:
        raise TopologyError(
            f"topology=erdos-renyi needs 0 <= edge-prob <= 1; got edge-prob={edge_prob} "
            f"with {n} nodes"
        )
    return nx.erdos_renyi_graph(n, edge_prob, seed=seed)


def _disconnected_hint(name: str, n: int) -> str:
    if name == "erdos-renyi":
        return f"try a larger edge-prob (connectivity threshold ln(n)/n = {math.log(n) / n:.3g})"
    if name == "k-regular":
        return "try a larger degree (>= 3) or another seed"
    return "try other parameters or another seed"


def build_topology(
    name: str, n: int, *, seed: int, degree: int = 4, edge_prob: float = 0.3
) -> nx.Graph:
    """The connected graph over partition ids 0..n-1 that `topology=<name>` stands for.

    Args:
        name: One of `TOPOLOGIES`.
        n: Number of vertices (nodes of the federation), >= 2 (>= 3 for ring, >= 9 for torus).
        seed: Seed of the random topologies (k-regular, erdos-renyi, small-world).
        degree: Degree of k-regular; ring neighbours (even) of small-world.
        edge_prob: Edge probability of erdos-renyi; rewiring probability of small-world.

    Returns:
        A canonical graph: nodes 0..n-1 in order, edges `(u, v)` with `u < v` in sorted
        order; `g.graph["name"]` is `name`. Star has hub 0; torus vertex `i * cols + j` is
        cell `(i, j)` of the most square rows x cols grid.

    Raises:
        TopologyError: Unknown name, too few nodes, impossible parameters, or a random
            graph that came out disconnected.
    """
    if name not in TOPOLOGIES:
        raise TopologyError(f"topology={name!r} is unknown; valid: {', '.join(TOPOLOGIES)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise TopologyError(f"topology={name} needs an integer node count >= 2; got {n!r} nodes")
    if name == "ring":
        if n < 3:
            raise TopologyError(f"topology=ring needs >= 3 nodes; got {n} nodes")
        g = nx.cycle_graph(n)
    elif name == "torus":
        g = _torus_graph(n)
    elif name == "k-regular":
        g = _regular_graph(n, degree, seed)
    elif name == "erdos-renyi":
        g = _erdos_renyi_graph(n, edge_prob, seed)
    elif name == "small-world":
        g = _small_world_graph(n, degree, edge_prob, seed)
    elif name == "complete":
        g = nx.complete_graph(n)
    elif name == "star":
        g = nx.star_graph(n - 1)
    else:
        g = _exponential_graph(n)
    if not nx.is_connected(g):
        raise TopologyError(
            f"topology={name} with {n} nodes is disconnected (seed={seed}, degree={degree}, "
            f"edge-prob={edge_prob}); {_disconnected_hint(name, n)}"
        )
    canonical = nx.Graph(name=name)
    canonical.add_nodes_from(range(n))
    canonical.add_edges_from(sorted((min(u, v), max(u, v)) for u, v in g.edges if u != v))
    return canonical


def graph_facts(g: nx.Graph, w: np.ndarray) -> dict[str, int | float]:
    """Size, diameter and how fast gossip with matrix `w` mixes on `g`, for logs and plots.

    Args:
        g: Connected graph over vertices 0..n-1.
        w: Symmetric n x n gossip matrix (e.g. from `gossip.gossip_matrix`), row i = vertex i.

    Returns:
        Plain Python numbers: `nodes`, `edges`, `diameter`, `spectral_gap` (1 minus the
        second largest absolute eigenvalue of `w`) and `mixing_time` (ceil(1 / gap), or
        `math.inf` when the gap is 0).

    Raises:
        ValueError: `w` is not a symmetric n x n matrix.
    """
    n = g.number_of_nodes()
    w = np.asarray(w, dtype=float)
    if w.shape != (n, n) or not np.allclose(w, w.T):
        raise ValueError(f"w must be a symmetric {n} x {n} matrix; got shape {w.shape}")
    slem = 0.0
    if n > 1:
        slem = float(np.sort(np.abs(np.linalg.eigvalsh(w)))[-2])
    gap = max(0.0, 1.0 - slem)
    if gap <= _GAP_TOL:
        gap, mixing = 0.0, math.inf
    else:
        # The tolerance keeps a numerically exact gap of 1 (complete graph) at 1 round, not 2.
        mixing = math.ceil(1.0 / gap - 1e-9)
    return {
        "nodes": int(n),
        "edges": int(g.number_of_edges()),
        "diameter": int(nx.diameter(g)) if n > 1 else 0,
        "spectral_gap": float(gap),
        "mixing_time": mixing,
    }
