"""Gossip: who talks to whom in a round, and how their models are averaged.

Models are `dict[int, np.ndarray]`: vertex (partition id) -> that node's model as one flat
float64 vector (the strategy flattens and unflattens). The maths only needs arrays of equal
shape, so any shape works. Nothing here modifies an array in place; functions return new
dicts, whose untouched entries may share arrays with the input.

Three modes (`GOSSIP_MODES`):
- `matching`: a random maximal matching; each matched pair averages, all at once.
- `edges`: k random edges (with replacement) average one after another (Boyd et al., 2006).
- `metropolis`: every node takes the Metropolis-weighted mean of its neighbourhood.

All three are symmetric and doubly stochastic, so they conserve the plain sum of the models
and repeated gossip without training converges to the plain mean.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import networkx as nx
import numpy as np

GOSSIP_MODES = ("matching", "edges", "metropolis")
# Random matchings averaged to estimate the expected matching matrix, and their seed.
MATCHING_SAMPLES = 200
MATCHING_SEED = 0

Models = Mapping[int, np.ndarray]
Pair = tuple[int, int]
# Salt of the gossip strategies' schedule generator: `schedule_rng` is theirs, so a node can
# redraw the schedule a run will use (privacy-unit=network) from the run's public seed.
_SCHEDULE_SALT = 0x6055


def schedule_rng(seed: int) -> np.random.Generator:
    """The generator a gossip run draws its matchings and edges from (public, from `seed`)."""
    return np.random.default_rng([seed, _SCHEDULE_SALT])


def _active_vertices(g: nx.Graph, active: Collection[int] | None) -> set[int]:
    if active is None:
        return set(g.nodes)
    active = set(active)
    if unknown := active - set(g.nodes):
        raise ValueError(f"active vertices {sorted(unknown)} are not in the graph")
    return active


def _active_edges(g: nx.Graph, active: Collection[int] | None) -> list[Pair]:
    """Sorted edges `(u, v)`, `u < v`, with both ends active: order-independent of `g`."""
    on = _active_vertices(g, active)
    return sorted((min(u, v), max(u, v)) for u, v in g.edges if u != v and u in on and v in on)


def random_matching(
    g: nx.Graph, rng: np.random.Generator, active: Collection[int] | None = None
) -> list[Pair]:
    """A random maximal matching among active vertices: disjoint pairs that can talk at once.

    Shuffles the active edges with `rng`, then greedily keeps each edge whose two ends are
    still free. Maximal (no edge between two free active vertices remains), not maximum.

    Args:
        g: Communication graph.
        rng: Source of randomness; the same state gives the same matching.
        active: Vertices that may gossip this round (default: all).

    Returns:
        Pairs `(u, v)` with `u < v`, each a graph edge, no vertex twice.
    """
    edges = _active_edges(g, active)
    free = _active_vertices(g, active)
    pairs = []
    for i in rng.permutation(len(edges)):
        u, v = edges[i]
        if u in free and v in free:
            pairs.append((u, v))
            free -= {u, v}
    return pairs


def random_edges(
    g: nx.Graph, k: int, rng: np.random.Generator, active: Collection[int] | None = None
) -> list[Pair]:
    """`k` edges drawn uniformly with replacement among active edges: randomized gossip.

    Args:
        g: Communication graph.
        k: Number of draws, >= 0; the same edge (or vertex) may come up more than once.
        rng: Source of randomness.
        active: Vertices that may gossip this round (default: all).

    Returns:
        Up to `k` graph edges `(u, v)` with `u < v` in draw order; empty if no active edge.

    Raises:
        ValueError: `k` is negative.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0; got {k}")
    edges = _active_edges(g, active)
    if not edges or k == 0:
        return []
    return [edges[i] for i in rng.integers(len(edges), size=k)]


def metropolis_weights(g: nx.Graph, active: Collection[int] | None = None) -> dict[Pair, float]:
    """Metropolis-Hastings mixing weights: symmetric and doubly stochastic, so no mass drifts.

    `w[i, j] = 1 / (1 + max(deg i, deg j))` on each edge, `w[i, i] = 1 - sum_j w[i, j]`, with
    degrees taken in the subgraph induced by the active vertices. Inactive vertices get
    `w[i, i] = 1` and nothing else: they keep their model and are not mixed.

    Args:
        g: Communication graph.
        active: Vertices that gossip this round (default: all).

    Returns:
        Sparse weights: both `(i, j)` and `(j, i)` for every active edge, and `(i, i)` for
        every vertex of `g`.
    """
    sub = g.subgraph(_active_vertices(g, active))
    w: dict[Pair, float] = {}
    for i, j in _active_edges(sub, None):
        w[i, j] = w[j, i] = 1.0 / (1 + max(sub.degree[i], sub.degree[j]))
    out = dict.fromkeys(((i, i) for i in g.nodes), 1.0)
    for (i, _), x in w.items():
        out[i, i] -= x
    return out | w


def pairwise_average(a: np.ndarray, b: np.ndarray, wa: float = 0.5) -> np.ndarray:
    """`wa * a + (1 - wa) * b`: what two nodes agree on after talking."""
    return wa * a + (1 - wa) * b


def apply_pairs(
    models: Models,
    pairs: Iterable[Pair],
    *,
    sequential: bool,
    weights: Mapping[int, float] | None = None,
) -> dict[int, np.ndarray]:
    """Each pair `(u, v)` replaces both models by their average.

    With `weights=None` the average is the plain mean, which conserves the plain sum of all
    models. With `weights` (e.g. sample counts) it is `(w_u x_u + w_v x_v) / (w_u + w_v)`:
    that conserves the weighted sum `sum_i w_i x_i` but NOT the plain sum, so repeated
    weighted gossip drifts towards data-rich nodes instead of the plain mean.

    Args:
        models: Vertex -> model.
        pairs: Vertex pairs that talk.
        sequential: True applies pairs one after another, later pairs seeing earlier
            results (`edges` mode); False applies all from the same snapshot (`matching`
            mode), which requires disjoint pairs.
        weights: Optional non-negative vertex weights; a pair whose weights are both 0 uses
            the plain mean.

    Returns:
        A new dict with the same keys.

    Raises:
        ValueError: `sequential=False` with a vertex in two pairs, or a negative weight.
        KeyError: A pair names a vertex missing from `models` (or from `weights`).
    """
    pairs = list(pairs)
    if not sequential:
        seen = [x for pair in pairs for x in pair]
        if len(seen) != len(set(seen)):
            raise ValueError("sequential=False needs disjoint pairs; a vertex is in two pairs")
    snapshot = dict(models)
    out = dict(models)
    for u, v in pairs:
        src = out if sequential else snapshot
        wa = 0.5
        if weights is not None:
            wu, wv = float(weights[u]), float(weights[v])
            if wu < 0 or wv < 0:
                raise ValueError(f"weights must be >= 0; got {wu} for {u}, {wv} for {v}")
            if wu + wv > 0:
                wa = wu / (wu + wv)
        out[u] = out[v] = pairwise_average(src[u], src[v], wa)
    return out


def apply_metropolis(models: Models, w: Mapping[Pair, float]) -> dict[int, np.ndarray]:
    """`x_i' = sum_j w[i, j] x_j` for every vertex i of `models`, all from the same snapshot.

    Args:
        models: Vertex -> model; must hold every vertex `w` mixes in.
        w: Sparse weights as returned by `metropolis_weights`.

    Returns:
        A new dict with the same keys.

    Raises:
        ValueError: A vertex of `models` has no row in `w`.
        KeyError: `w` mixes in a vertex missing from `models`.
    """
    rows: dict[int, list[tuple[int, float]]] = {}
    for (i, j), x in w.items():
        rows.setdefault(i, []).append((j, x))
    if missing := set(models) - rows.keys():
        raise ValueError(f"no Metropolis weights for vertices {sorted(missing)}")
    return {i: sum(x * models[j] for j, x in rows[i]) for i in models}


def _vertex_count(g: nx.Graph) -> int:
    n = g.number_of_nodes()
    if set(g.nodes) != set(range(n)):
        raise ValueError("gossip_matrix needs vertices 0..n-1")
    return n


def _pairs_matrix(n: int, pairs: Iterable[Pair]) -> np.ndarray:
    """Averaging matrix of disjoint pairs: a 1/2 block on each pair, 1 elsewhere on the diagonal."""
    m = np.eye(n)
    for u, v in pairs:
        m[u, u] = m[v, v] = m[u, v] = m[v, u] = 0.5
    return m


def gossip_matrix(g: nx.Graph, mode: str, *, edges_per_round: int = 10) -> np.ndarray:
    """The expected per-round gossip matrix W of `mode` on `g`, for the spectral gap.

    - `metropolis`: the Metropolis matrix itself (deterministic).
    - `matching`: mean of the averaging matrices of `MATCHING_SAMPLES` random maximal
      matchings drawn with seed `MATCHING_SEED` (a Monte-Carlo estimate of E[W]).
    - `edges`: `(E[W_e])^k` with `E[W_e] = I - L / (2|E|)` (L the Laplacian) and
      `k = edges_per_round`; a proxy, since E[product] of the k random averagings is not
      exactly the power of the expectation.

    Args:
        g: Graph over vertices 0..n-1; row/column i is vertex i.
        mode: One of `GOSSIP_MODES`.
        edges_per_round: Random edges per round in `edges` mode, >= 1.

    Returns:
        A symmetric, doubly stochastic n x n float64 matrix.

    Raises:
        ValueError: Unknown mode, vertices not 0..n-1, or `edges_per_round < 1`.
    """
    if mode not in GOSSIP_MODES:
        raise ValueError(f"gossip mode {mode!r} is unknown; valid: {', '.join(GOSSIP_MODES)}")
    n = _vertex_count(g)
    if mode == "metropolis":
        m = np.zeros((n, n))
        for (i, j), x in metropolis_weights(g).items():
            m[i, j] = x
        return m
    if mode == "matching":
        rng = np.random.default_rng(MATCHING_SEED)
        return (
            sum(
                (_pairs_matrix(n, random_matching(g, rng)) for _ in range(MATCHING_SAMPLES)),
                start=np.zeros((n, n)),
            )
            / MATCHING_SAMPLES
        )
    if edges_per_round < 1:
        raise ValueError(f"edges_per_round must be >= 1; got {edges_per_round}")
    num_edges = g.number_of_edges()
    if num_edges == 0:
        return np.eye(n)
    lap = nx.laplacian_matrix(g, nodelist=range(n)).toarray().astype(float)
    step = np.eye(n) - lap / (2 * num_edges)
    return np.linalg.matrix_power(step, edges_per_round)


def mean_model(models: Models) -> np.ndarray:
    """The plain mean of all models: what gossip converges to without training.

    Raises:
        ValueError: `models` is empty.
    """
    if not models:
        raise ValueError("mean_model needs at least one model")
    return np.mean(np.stack(list(models.values())), axis=0)


def consensus_distance(models: Models) -> float:
    """Mean over nodes of the squared L2 distance to the mean model: 0 at consensus.

    Raises:
        ValueError: `models` is empty.
    """
    mean = mean_model(models)
    return float(np.mean([np.sum((x - mean) ** 2) for x in models.values()]))
