"""Pairwise network DP of a gossip run whose nodes use the update-level Gaussian mechanism.

What a run did (`Schedule`): in each round the nodes in `active` trained; each released its
model plus its clipped round update Δ (‖Δ‖ ≤ C) plus Gaussian noise N(0, σ²C²I)
(`dp-mode=update`); then `steps` mixing matrices were applied in order (`gossip-steps`
matchings, sequential edges or Metropolis steps among the active nodes). A node that did
not train keeps its model and is not mixed: its row and column of every step are those of
the identity. A step W maps the nodes' models x (one row per node) to W x. The schedule is
the server's draw (its own seed, who answered), assumed independent of data and noise; an
update may be any function of the model the node holds and of its data.

What observer v sees: at each step W, the model of every j ≠ v with W[v, j] ≠ 0, as it was
before the step (v's partners send v their models); v also knows everything it generated
itself (its own data, updates and noise), so v's own noise is never counted as hiding
anything. Every matrix of `rho[u, v]` is indexed (owner u, observer v); the diagonal is
the owner's own releases, i.e. local DP.

The unit is the README's for `dp-mode=update`: a node's whole dataset present vs absent,
so u's update moves by at most C (`sensitivity=1`); `sensitivity=2` gives the replacement
relation (2C) that the README reports as `eps_replace`.

Everything here is RDP of a Gaussian mechanism, α/2 · ρ, so each function returns ρ (the
squared sensitivity in units of the noise, "μ²" of μ-GDP) and `pairwise_rdp` the curve.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from flower_app.gossip import GOSSIP_MODES, metropolis_weights, random_edges, random_matching

# The same orders as flower_app.privacy.RDP_ORDERS (a test keeps them equal), without
# importing torch: Opacus's default alphas and a few large orders.
ORDERS = (
    [1 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(12, 64)]
    + [80.0, 96.0, 128.0, 192.0, 256.0, 512.0, 1024.0]
)
# Tolerances: a step's rows and columns sum to 1 within _STOCHASTIC_TOL; singular values
# below _RCOND times the largest are rounding noise; a shift whose part outside the noise's
# range exceeds _RANGE_TOL of its norm leaves the range (the two views are singular: ρ = ∞).
_STOCHASTIC_TOL = 1e-9
_RCOND = 1e-10
_RANGE_TOL = 1e-7

Pair = tuple[int, int]


@dataclass(frozen=True)
class GossipRound:
    """One round: the nodes that trained (and added noise), then the mixing steps in order."""

    active: frozenset[int]
    steps: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Schedule:
    """What a gossip run did, round by round, on nodes 0..num_nodes-1."""

    num_nodes: int
    rounds: tuple[GossipRound, ...]

    def __post_init__(self) -> None:
        """Refuse a step that is not doubly stochastic or that mixes an idle node."""
        n = self.num_nodes
        for r, rnd in enumerate(self.rounds):
            if bad := set(rnd.active) - set(range(n)):
                raise ValueError(f"round {r}: active nodes {sorted(bad)} are not in 0..{n - 1}")
            idle = sorted(set(range(n)) - set(rnd.active))
            for k, w in enumerate(rnd.steps):
                where = f"round {r} step {k}"
                if w.shape != (n, n) or not np.all(np.isfinite(w)) or np.any(w < 0):
                    raise ValueError(f"{where}: needs a finite non-negative {n}x{n} matrix")
                ones = np.ones(n)
                if not (
                    np.allclose(w.sum(0), ones, atol=_STOCHASTIC_TOL)
                    and np.allclose(w.sum(1), ones, atol=_STOCHASTIC_TOL)
                ):
                    raise ValueError(f"{where}: rows and columns must each sum to 1")
                eye = np.eye(n)
                if idle and not (
                    np.array_equal(w[idle], eye[idle]) and np.array_equal(w[:, idle], eye[:, idle])
                ):
                    raise ValueError(f"{where}: an idle node must keep its model (identity)")


# --- builders from the schedule primitives of flower_app.gossip ---------------------------


def pairs_matrix(n: int, pairs: Iterable[Pair]) -> np.ndarray:
    """One step in which disjoint pairs average at once (`matching` mode, `apply_pairs`).

    Raises:
        ValueError: A node is in two pairs, or a pair is a self-loop.
    """
    m = np.eye(n)
    seen: set[int] = set()
    for u, v in pairs:
        if u == v or u in seen or v in seen:
            raise ValueError(f"pairs must be disjoint edges; got ({u}, {v}) again or as a loop")
        seen |= {u, v}
        m[u, u] = m[v, v] = m[u, v] = m[v, u] = 0.5
    return m


def edge_matrices(n: int, pairs: Iterable[Pair]) -> list[np.ndarray]:
    """Steps of edges averaged one after another (`edges` mode): one matrix per edge."""
    return [pairs_matrix(n, [pair]) for pair in pairs]


def metropolis_matrix(n: int, weights: Mapping[Pair, float]) -> np.ndarray:
    """One Metropolis step from `flower_app.gossip.metropolis_weights`' sparse weights."""
    m = np.zeros((n, n))
    for (i, j), x in weights.items():
        m[i, j] = x
    return m


def draw_schedule(
    g: nx.Graph,
    mode: str,
    *,
    rounds: int,
    rng: np.random.Generator,
    gossip_steps: int = 1,
    edges_per_round: int = 10,
    active: Sequence[Collection[int]] | None = None,
) -> Schedule:
    """A schedule drawn as `strategies.gossip.Gossip` draws one: for planning and tests.

    Each round, `gossip_steps` times: a fresh random maximal matching (`matching`),
    `edges_per_round` random edges averaged in turn (`edges`), or one Metropolis step
    (`metropolis`), all among the round's active nodes (default: every node, every round).
    """
    if mode not in GOSSIP_MODES:
        raise ValueError(f"gossip mode {mode!r} is unknown; valid: {', '.join(GOSSIP_MODES)}")
    n = g.number_of_nodes()
    out = []
    for r in range(rounds):
        on = set(range(n)) if active is None else set(active[r])
        steps: list[np.ndarray] = []
        for _ in range(gossip_steps):
            if mode == "matching":
                steps.append(pairs_matrix(n, random_matching(g, rng, on)))
            elif mode == "edges":
                steps += edge_matrices(n, random_edges(g, edges_per_round, rng, on))
            else:
                steps.append(metropolis_matrix(n, metropolis_weights(g, on)))
        out.append(GossipRound(frozenset(on), tuple(steps)))
    return Schedule(n, tuple(out))


# --- the linear maps of a run --------------------------------------------------------------


def _variances(sigma: float | Sequence[float], n: int) -> np.ndarray:
    var = np.broadcast_to(np.asarray(sigma, dtype=float), (n,)) ** 2
    if np.any(np.isnan(var)) or np.any(np.asarray(sigma) < 0):
        raise ValueError(f"noise multipliers must be >= 0; got {sigma}")
    return np.array(var)


def _mask(schedule: Schedule, r: int) -> np.ndarray:
    """P_r as a column mask: only nodes that trained in round r add an update and noise."""
    p = np.zeros(schedule.num_nodes)
    p[list(schedule.rounds[r].active)] = 1.0
    return p


def _round_product(rnd: GossipRound, n: int) -> np.ndarray:
    """M_r: the whole round's mixing, the product of its steps in order."""
    m = np.eye(n)
    for w in rnd.steps:
        m = w @ m
    return m


def _carries(schedule: Schedule) -> list[list[np.ndarray]]:
    """carry[r][s - r] = M_{s-1} ... M_r: how the models after round r's training reach round s."""
    n, rounds = schedule.num_nodes, len(schedule.rounds)
    products = [_round_product(rnd, n) for rnd in schedule.rounds]
    out = []
    for r in range(rounds):
        row = [np.eye(n)]
        for s in range(r, rounds):
            row.append(products[s] @ row[-1])
        out.append(row)
    return out


def _received(rnd: GossipRound, n: int, v: int) -> np.ndarray:
    """What v receives in a round, as rows mapping the nodes' post-training models to it."""
    rows, prefix = [], np.eye(n)
    for w in rnd.steps:
        senders = [j for j in range(n) if j != v and w[v, j] != 0]
        rows += [prefix[j] for j in senders]
        prefix = w @ prefix
    return np.array(rows).reshape(-1, n)


def _influential(n: int, received: list[np.ndarray], carry: list) -> list[np.ndarray]:
    """infl[r][w]: whether w's model after round r's training can reach v's view from r on.

    Backwards: what v receives in round r, or what round r's mixing hands to a node that is
    influential in round r + 1. Every matrix is non-negative, so the pattern is exact.
    """
    rounds = len(received)
    infl = [np.zeros(n, dtype=bool) for _ in range(rounds + 1)]
    for r in reversed(range(rounds)):
        m = carry[r][1]
        infl[r] = np.any(received[r] != 0, axis=0) | np.any(m[infl[r + 1]] != 0, axis=0)
    return infl


def _exposure(
    schedule: Schedule, r: int, received: list[np.ndarray], infl: list, carry: list
) -> np.ndarray:
    """Rows of round r's output, as a linear map of round r's updates-plus-noise ξ^r.

    What v receives in round r, and the part of round r in the model every influential node
    holds when it next trains (s > r): the history an adaptively chosen update may depend on.
    """
    p = _mask(schedule, r)
    rows = [received[r] * p]
    for s in range(r + 1, len(schedule.rounds)):
        trains = _mask(schedule, s).astype(bool) & infl[s]
        rows.append(carry[r][s - r][trains] * p)
    return np.vstack(rows)


def _noise_basis(h: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, s) of H diag(var)^(1/2)'s SVD: the range of the noise covariance H diag(var) Hᵀ."""
    if h.size == 0:
        return np.zeros((h.shape[0], 0)), np.zeros(0)
    u_mat, s, _ = np.linalg.svd(h * np.sqrt(var), full_matrices=False)
    keep = s > _RCOND * s.max() if s.size and s.max() > 0 else np.zeros(len(s), dtype=bool)
    return u_mat[:, keep], s[keep]


def _whiten(h: np.ndarray, basis: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Γ^(+1/2) h for each column (Γ the noise covariance); a column leaving Γ's range is inf."""
    u_mat, s = basis
    norms = np.linalg.norm(h, axis=0)
    if not len(s):  # no noise at all: only a zero shift stays in range
        return np.where(norms > 0, math.inf, 0.0)[None, :]
    coef = (u_mat.T @ h) / s[:, None]
    outside = np.linalg.norm(h - u_mat @ (u_mat.T @ h), axis=0)
    coef[:, outside > _RANGE_TOL * norms] = math.inf
    return coef


def _rho_columns(h: np.ndarray, var: np.ndarray) -> np.ndarray:
    """ρ_u = h_uᵀ (H diag(var) Hᵀ)⁺ h_u for every column h_u of H; ∞ where h_u leaves the range.

    Gaussian views N(μ, Γ), N(μ + h_u d, Γ) with scalar shift d: their Rényi divergence of
    order α is α/2 · d² h_uᵀ Γ⁺ h_u on the range of Γ (Gil, Alajaji & Linder 2013, Table 2,
    multivariate normal with equal covariances), and ∞ if h_u d has a part outside it (the
    two are mutually singular).
    """
    if h.size == 0:
        return np.zeros(h.shape[1])
    return np.sum(_whiten(h, _noise_basis(h, var)) ** 2, axis=0)


def _local_rho(schedule: Schedule, var: np.ndarray) -> np.ndarray:
    """Each node's own releases: Σ_r 1/σ_u² over the rounds it trained (∞ if σ_u = 0)."""
    trained = np.array([[u in rnd.active for rnd in schedule.rounds] for u in range(len(var))])
    count = trained.sum(axis=1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count == 0, 0.0, count / var)


# --- the accountant ------------------------------------------------------------------------


def pairwise_rho(
    schedule: Schedule, sigma: float | Sequence[float], *, sensitivity: float = 1.0
) -> np.ndarray:
    """ρ[u, v]: u's data in all v receives over the run, valid for adaptively chosen updates.

    Round by round, composed: round r outputs O_r = (what v receives in round r, and round
    r's part of the model of every node that trains later and can reach v). Given O_1..O_r-1
    every model a round-r update depends on is known (the models nodes start round r with
    are sums of earlier outputs), so every node's update but u's is fixed, u's has norm
    ≤ sensitivity·C, and the round's fresh noise makes O_r Gaussian with covariance
    H diag(σ²) Hᵀ (v's own noise known, so left out): its RDP is α/2 · ρ_r with
    ρ_r = sensitivity² · h_uᵀ (H diag(σ²) Hᵀ)⁺ h_u (`_rho_columns`; isotropic noise makes
    the sup over ‖Δ_u‖ ≤ C the scalar case). RDP composes additively over adaptively
    chosen mechanisms (Mironov 2017, Prop. 1), and what v receives is a function of
    O_1..O_R (post-processing), so Σ_r ρ_r bounds it for any update rule.

    Why the carried models are in O_r: a node's next update is a function of the model it
    holds, which carries u's earlier updates under noise v never saw. With fixed updates
    the whole run is one Gaussian (`fixed_update_rho`, exact), but a bounded update can
    encode its model non-linearly and leak more than that (tests: a 3-node path where a
    sign update beats the fixed-update value). Revealing those models is what makes the
    per-round terms compose. Only nodes that can still reach v count, so what is far from v
    late in the run keeps its amplification; the price is that a round whose mixing is
    invertible (a Metropolis step on a ring of 8) hands v every release that can still reach
    it. For a single round nothing is carried: the value is the exact divergence of v's view.

    Args:
        schedule: What the run did.
        sigma: Noise multiplier σ (noise std σC) of every node, or one per node.
        sensitivity: u's update bound in units of C: 1 add/remove (the README's unit for
            dp-mode=update), 2 replacement (`eps_replace`).

    Returns:
        n x n array, [owner u, observer v]; the diagonal is local DP (the owner's releases).
    """
    n, var = schedule.num_nodes, _variances(sigma, schedule.num_nodes)
    carry = _carries(schedule)
    rho = np.zeros((n, n))
    for v in range(n):
        received = [_received(rnd, n, v) for rnd in schedule.rounds]
        infl = _influential(n, received, carry)
        hidden = var.copy()
        hidden[v] = 0.0  # v knows its own noise
        for r in range(len(schedule.rounds)):
            rho[:, v] += _rho_columns(_exposure(schedule, r, received, infl, carry), hidden)
    np.fill_diagonal(rho, _local_rho(schedule, var))
    return sensitivity**2 * rho


def pairwise_rdp(
    schedule: Schedule,
    sigma: float | Sequence[float],
    orders: Sequence[float] = ORDERS,
    *,
    sensitivity: float = 1.0,
) -> np.ndarray:
    """RDP curves [owner u, observer v, order]: α/2 · `pairwise_rho` (Mironov 2017, Cor. 3)."""
    rho = pairwise_rho(schedule, sigma, sensitivity=sensitivity)
    a = np.asarray(orders, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.where(rho[..., None] == 0, 0.0, rho[..., None] * a / 2)


# --- for comparison: fixed updates (a lower bound) and Muffliato's per-message sum --------


def _joint_rows(schedule: Schedule, v: int, carry: list) -> np.ndarray:
    """Everything v receives over the run as a map of all rounds' ξ, columns r * n + w."""
    n, rounds = schedule.num_nodes, len(schedule.rounds)
    blocks = []
    for s in range(rounds):
        recv = _received(schedule.rounds[s], n, v)
        row = np.zeros((len(recv), rounds * n))
        for r in range(s + 1):
            row[:, r * n : (r + 1) * n] = recv @ carry[r][s - r] * _mask(schedule, r)
        blocks.append(row)
    return np.vstack(blocks) if blocks else np.zeros((0, rounds * n))


def view_map(schedule: Schedule, v: int) -> np.ndarray:
    """Everything v receives over the run as a linear map of every round's ξ (updates + noise).

    Rows in the order v receives them (round, step, then sender ascending: the partners'
    models before each step), columns r * n + w (node w's ξ of round r); a model is the
    public initial one plus this map of ξ. The white-box audit scores v's view with it.
    """
    return _joint_rows(schedule, v, _carries(schedule))


def _box_max(q: np.ndarray, up_to: int) -> float:
    """The largest sᵀ Q s over s ∈ {±1}^k: exact by enumeration up to k = `up_to`.

    Beyond, a greedy ascent from the signs of Q's top eigenvector: still an attained value.
    """
    k = len(q)
    if k == 0:
        return 0.0
    if k <= up_to:
        signs = np.array([(1, *s) for s in itertools.product((1, -1), repeat=k - 1)])
        return float(np.max(np.einsum("ij,jk,ik->i", signs, q, signs)))
    s = np.where(np.linalg.eigh(q)[1][:, -1] >= 0, 1.0, -1.0)
    while True:
        gains = -4 * s * (q @ s) + 4 * np.diag(q)  # value change of flipping each sign
        i = int(np.argmax(gains))
        if gains[i] <= 1e-12:
            return float(s @ q @ s)
        s[i] = -s[i]


def fixed_update_rho(
    schedule: Schedule,
    sigma: float | Sequence[float],
    *,
    sensitivity: float = 1.0,
    up_to: int = 12,
) -> np.ndarray:
    """ρ[u, v] if every update were fixed in advance: the whole run is then one Gaussian.

    v's view is G ξ with ξ = updates + noise of every (round, node): Gaussian with
    covariance G D Gᵀ, and u's updates d_r (|d_r| ≤ sensitivity·C) shift its mean by
    Σ_r G_{r,u} d_r, so the divergence is α/2 · dᵀ Q d with Q = G_uᵀ (G D Gᵀ)⁺ G_u, at its
    largest over d (Gil et al. 2013). Exact for a one-dimensional model: the sup over the
    box, enumerated up to `up_to` rounds u trained, beyond that a greedy ascent (a value
    attained, so still below the sup); a model of more dimensions can only do worse. It is
    NOT a bound for training, whose updates depend on the noise (see `pairwise_rho`): it is
    a value any valid accountant must reach, i.e. a lower bound.

    Returns:
        n x n array, [owner u, observer v]; the diagonal is local DP.
    """
    n, var = schedule.num_nodes, _variances(sigma, schedule.num_nodes)
    carry = _carries(schedule)
    rho = np.zeros((n, n))
    for v in range(n):
        g = _joint_rows(schedule, v, carry)
        hidden = np.tile(var, len(schedule.rounds))
        hidden[v::n] = 0.0  # v knows its own noise
        basis = _noise_basis(g, hidden)
        for u in set(range(n)) - {v}:
            cols = [r * n + u for r, rnd in enumerate(schedule.rounds) if u in rnd.active]
            coef = _whiten(g[:, cols], basis)
            rho[u, v] = math.inf if np.any(np.isinf(coef)) else _box_max(coef.T @ coef, up_to)
    np.fill_diagonal(rho, _local_rho(schedule, var))
    return sensitivity**2 * rho


def muffliato_rho(
    schedule: Schedule, sigma: float | Sequence[float], *, sensitivity: float = 1.0
) -> np.ndarray:
    """ρ[u, v] by Muffliato's per-message sum, to compare only: it is not a bound here.

    Cyffers, Even, Bellet & Massoulié (NeurIPS 2022), the theorem for Gaussian noise
    followed by gossip with W: f(u, v) = α/(2σ²) Σ_t Σ_{w ∈ N(v)} (W^t)²_{wu} / ‖(W^t)_w‖²,
    i.e. each message w sends v counted as its own Gaussian mechanism (noise of its whole
    row), summed; the authors' code computes the same term per step (graphutils.contrib).
    Taken here over the messages v actually receives under the schedule's steps and, per
    round of injected noise, every later message (each round's noise its own run, composed).
    Messages share noise, so the sum can fall far below the exact divergence of the joint
    view (tests: ring of 8, three Metropolis steps, distance 3, where v can solve for u's
    release exactly): reported beside the accountant, never as a guarantee.
    """
    n, var = schedule.num_nodes, _variances(sigma, schedule.num_nodes)
    carry = _carries(schedule)
    rho = np.zeros((n, n))
    for v in range(n):
        g = _joint_rows(schedule, v, carry)
        for r in range(len(schedule.rounds)):
            c = g[:, r * n : (r + 1) * n]
            noise = c**2 @ var
            with np.errstate(divide="ignore", invalid="ignore"):
                terms = np.where(c == 0, 0.0, c**2 / noise[:, None])
            rho[:, v] += terms.sum(axis=0)
    np.fill_diagonal(rho, _local_rho(schedule, var))
    return sensitivity**2 * rho


# --- (ε, δ) and the table by distance ------------------------------------------------------


def rdp_to_eps(
    rdp_curve: np.ndarray | Sequence[float], orders: Sequence[float], delta: float
) -> float | np.ndarray:
    """ε at δ of RDP curves (last axis over `orders`): the conversion privacy.py uses.

    min_α rdp(α) + log((α - 1)/α) - (log δ + log α)/(α - 1) (Balle et al. 2020, Thm 21),
    as Opacus's `get_privacy_spent` computes it; a curve that is 0 at every order (the view
    does not depend on the data) is ε = 0, and ε is never below 0.
    """
    a = np.asarray(orders, dtype=float)
    rdp = np.asarray(rdp_curve, dtype=float)
    if rdp.shape[-1:] != a.shape or np.any(a <= 1) or not 0 < delta < 1:
        raise ValueError("rdp_to_eps needs orders > 1, one RDP value per order, 0 < delta < 1")
    eps = np.min(rdp - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a), axis=-1)
    out = np.where(np.all(rdp == 0, axis=-1), 0.0, np.maximum(eps, 0.0))
    return float(out) if out.ndim == 0 else out


def by_distance(eps_matrix: np.ndarray, graph: nx.Graph) -> list[dict[str, float | int | None]]:
    """ε of every ordered pair grouped by the pair's shortest-path distance in `graph`.

    Distance 0 is the diagonal (the owner's own releases: local DP); pairs that no path
    joins come last with distance None.

    Returns:
        One dict per distance, ascending: distance, pairs, eps_min, eps_mean, eps_max.
    """
    eps = np.asarray(eps_matrix, dtype=float)
    n = eps.shape[0]
    if eps.shape != (n, n) or set(graph.nodes) != set(range(n)):
        raise ValueError(f"by_distance needs an n x n matrix and a graph on 0..n-1 (n={n})")
    dist = dict(nx.all_pairs_shortest_path_length(graph))
    groups: dict[int | None, list[float]] = {}
    for u in range(n):
        for v in range(n):
            groups.setdefault(dist[u].get(v), []).append(float(eps[u, v]))
    keys = sorted(k for k in groups if k is not None) + ([None] if None in groups else [])
    return [
        {
            "distance": k,
            "pairs": len(groups[k]),
            "eps_min": min(groups[k]),
            "eps_mean": float(np.mean(groups[k])),
            "eps_max": max(groups[k]),
        }
        for k in keys
    ]
