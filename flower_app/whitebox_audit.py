"""White-box one-run audit of dp-mode=update: canary directions in the nodes' clipped updates.

The black-box audit (`flower_app/audit.py`) plants images and scores them by loss; under DP it
finds nothing (every bound 0 at ε = 8 and 2), so it cannot test an accountant. This audit
plants the canaries where the mechanism acts (Andrew et al., ICLR 2024; Steinke, Nasr &
Jagielski, NeurIPS 2023, with gradient canaries), and scores each by the projection of what
an observer receives onto its direction. Pure functions of their arguments; the canaries and
coins come from `audit-seed` alone (the auditor's randomness, never the DP noise's).

- **Canaries.** Canary i is c_i = s_i e_{k_i}: a random sign on a coordinate k_i of the
  model's flat float vector, the k_i distinct, so canaries are exactly orthogonal to each
  other. Each node owns `per_node` of them, each included by a fair coin (`draw_plan`).
- **Insertion.** A node adds C·c_i for each of its included canaries to its clipped update,
  before the noise, every round it trains: it releases model + clip(Δ) + C Σ_in c_i +
  N(0, σ²C²I) (`insert_canaries`; adding after the noise is the same release). One coin
  moves the release by exactly C c_i, norm C: the sensitivity of dp-mode=update's unit (a
  node's whole contribution), in every round, given everything before. So whatever ε the
  accountant gives that unit, the owner's local ε or the pairwise ε[u, v] of
  `flower_app/network_dp.py`, holds for each canary's coin over the whole run: the audit
  compares like with like.
- **Scores** (z-scores: N(0, 1) for an excluded canary, up to the data's own projection).
  The owner test pools every canary, each scored by the sum over rounds of its owner's
  increments (release minus the model it started from) along c_i: what anyone who sees
  every release can compute, and the whole transcript is local-ε DP for each canary
  (`owner_scores`). Observer v at distance d: every message v receives (its partners'
  models before each gossip step, `network_dp.view_map`) projected on c_i, v's own
  increments (which v knows) and the public initial model removed, then the likelihood-
  ratio filter Γ⁺g of the Gaussian view (`matched_filters`), standardised.
- **Tests and what each bounds** (`whitebox_report`). Theorem 3.1 needs one mechanism that
  is (ε, δ)-DP for every canary of the test. Owner: all canaries, against the largest local
  ε. Distance d: ONE observer v and the canaries of the owners exactly d hops from v,
  against max over those owners of ε[u, v]: pooling canaries scored by different observers
  would test their joint view, which the pairwise accountant does not bound.
- **Estimate** (Andrew et al.): μ̂ = mean z of included minus excluded canaries, and the ε
  of μ̂-GDP at δ. An estimate, not a bound: reported beside the bound, never instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
from scipy import optimize, special

from flower_app.audit import audit_scores, joint_confidence
from flower_app.network_dp import Schedule, view_map

_STREAM = 0x3B0C  # separates this audit's generator from every other use of `audit-seed`
_RCOND = 1e-10


@dataclass(frozen=True)
class CanaryPlan:
    """The auditor's canaries: an owner, a coordinate and a sign each, and its coin."""

    dim: int  # length of the model's flat float vector
    owner: np.ndarray  # node (partition id) whose update carries the canary if included
    index: np.ndarray  # coordinate k_i, all distinct
    sign: np.ndarray  # s_i = ±1
    included: np.ndarray  # the auditor's coins

    def of(self, node: int) -> np.ndarray:
        """Positions of the canaries `node` adds to its update (its included ones)."""
        return np.flatnonzero((self.owner == node) & self.included)


def draw_plan(num_nodes: int, per_node: int, dim: int, audit_seed: int) -> CanaryPlan:
    """`per_node` canaries per node on distinct coordinates, each in by a fair coin."""
    total = num_nodes * per_node
    if not 0 < total <= dim:
        raise ValueError(f"{total} canaries need 1..{dim} distinct coordinates of the model")
    rng = np.random.default_rng([audit_seed, _STREAM])
    index = rng.choice(dim, size=total, replace=False)
    sign = np.where(rng.random(total) < 0.5, -1.0, 1.0)
    included = rng.random(total) < 0.5
    return CanaryPlan(dim, np.repeat(np.arange(num_nodes), per_node), index, sign, included)


def insert_canaries(flat: np.ndarray, plan: CanaryPlan, node: int, clip: float) -> np.ndarray:
    """A copy of the flat vector `flat` plus C·c_i for every canary `node` includes."""
    out = np.array(flat, dtype=np.float64, copy=True)
    if out.shape != (plan.dim,):
        raise ValueError(f"the plan is for {plan.dim} coordinates, the model has {out.shape}")
    pos = plan.of(node)
    out[plan.index[pos]] += clip * plan.sign[pos]
    return out


def project(flat: np.ndarray, plan: CanaryPlan) -> np.ndarray:
    """⟨x, c_i⟩ for every canary i (last axis of `flat`: the model's coordinates)."""
    return np.asarray(flat, dtype=np.float64)[..., plan.index] * plan.sign


def owner_scores(
    plan: CanaryPlan,
    increments: np.ndarray,
    trained: np.ndarray,
    sigma: Sequence[float] | float,
    clip: float,
) -> np.ndarray:
    """Each canary's z from its owner's releases: Σ_r ⟨release − start, c_i⟩ / (σC√R_u).

    Args:
        plan: The canaries.
        increments: (rounds, canaries): the owner's increment in each round along c_i (0 in
            a round it did not train).
        trained: (rounds, nodes) bool: who trained when.
        sigma: Noise multiplier of every node, or one per node (0: no DP).
        clip: The clipping norm C.
    """
    n = trained.shape[1]
    var = np.broadcast_to(np.asarray(sigma, dtype=float), (n,)) ** 2
    spread = np.sqrt(np.maximum(var, 0) * trained.sum(axis=0))  # per node: σ√R_u
    spread = np.where(spread > 0, spread, np.sqrt(np.maximum(trained.sum(axis=0), 1)))
    return increments.sum(axis=0) / (clip * spread[plan.owner])


@dataclass(frozen=True)
class Filter:
    """Observer v's linear score for u's canaries: z = wᵀy / scale; mu its mean when in."""

    weights: np.ndarray
    scale: float
    mu: float  # √(gᵀΓ⁺g): the test's signal-to-noise ratio (∞ without noise)


def matched_filters(
    schedule: Schedule, sigma: Sequence[float] | float, v: int
) -> dict[int, Filter]:
    """For every owner u ≠ v whose canary reaches v's view: the likelihood-ratio filter.

    v's view is y = G ξ (`view_map`); a canary adds C·g_u with g_u the sum of u's columns
    over the rounds u trained, and the noise v does not know has covariance Γ = G D Gᵀ (v's
    own noise removed, as the accountant removes it). The best linear test is Γ⁺g_u; with
    no noise (σ = 0) it is g_u itself.
    """
    n, rounds = schedule.num_nodes, len(schedule.rounds)
    g_all = view_map(schedule, v)
    hidden = np.tile(np.broadcast_to(np.asarray(sigma, dtype=float), (n,)) ** 2, rounds)
    hidden[v::n] = 0.0
    gamma = (g_all * hidden) @ g_all.T
    noisy = gamma.size > 0 and float(np.max(np.abs(gamma))) > 0
    inv = np.linalg.pinv(gamma, rcond=_RCOND, hermitian=True) if noisy else None
    out = {}
    for u in set(range(n)) - {v}:
        cols = [r * n + u for r, rnd in enumerate(schedule.rounds) if u in rnd.active]
        g = g_all[:, cols].sum(axis=1)
        if not np.any(g):
            continue
        if inv is None:
            out[u] = Filter(g, float(np.linalg.norm(g)), math.inf)
            continue
        w = inv @ g
        snr = float(g @ w)
        if snr > 0:
            out[u] = Filter(w, math.sqrt(snr), math.sqrt(snr))
    return out


def observer_scores(
    plan: CanaryPlan,
    schedule: Schedule,
    sigma: Sequence[float] | float,
    v: int,
    *,
    received: np.ndarray,
    own: np.ndarray,
    initial: np.ndarray,
    clip: float,
) -> np.ndarray:
    """Every canary's z from what v receives (NaN: v's own, or not in v's view at all).

    Args:
        plan: The canaries.
        schedule: What the run did (the mixing steps v's view went through).
        sigma: Noise multiplier of every node, or one per node (0: no DP).
        v: The observer.
        received: (messages, canaries): each model v receives, in `view_map`'s row order,
            projected on every canary.
        own: (rounds, canaries): v's own increments along every canary (v knows them).
        initial: (canaries,): the public initial model along every canary.
        clip: The clipping norm C.
    """
    n, rounds = schedule.num_nodes, len(schedule.rounds)
    g_all = view_map(schedule, v)
    if received.shape != (g_all.shape[0], len(plan.owner)):
        raise ValueError(f"v={v} receives {g_all.shape[0]} models; got {received.shape}")
    mine = g_all[:, [r * n + v for r in range(rounds)]]
    y = (received - initial[None, :] - mine @ own) / clip
    z = np.full(len(plan.owner), np.nan)
    for u, f in matched_filters(schedule, sigma, v).items():
        pos = np.flatnonzero(plan.owner == u)
        z[pos] = f.weights @ y[:, pos] / f.scale
    return z


def views_from_increments(
    schedule: Schedule, v: int, increments: np.ndarray, initial: np.ndarray
) -> np.ndarray:
    """What v received along every canary, from every node's increments and the schedule.

    A model is the public initial one plus `view_map`'s image of the rounds' increments
    (mixing is doubly stochastic), so the auditor who holds every node's increments along the
    canaries can rebuild each observer's view without any node revealing a model. It is the
    view the schedule says v received: it takes the relay's mixing from the schedule log.

    Args:
        schedule: What the run did.
        v: The observer.
        increments: (rounds, nodes, canaries): each node's release minus its start along
            every canary (0 in a round it did not train).
        initial: (canaries,): the public initial model along every canary.
    """
    rounds, n, m = increments.shape
    if (rounds, n) != (len(schedule.rounds), schedule.num_nodes):
        raise ValueError(f"increments for {rounds} rounds x {n} nodes; the schedule differs")
    return initial[None, :] + view_map(schedule, v) @ increments.reshape(rounds * n, m)


def by_distance_bounds(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per distance: the largest bound over its tests beside the largest accountant ε.

    `eps_lower_joint_max` holds at CONFIDENCE together with every other row's (Bonferroni
    over all tests); `eps_lower_max`, the largest per-test 95% bound, does not.
    """
    out = []
    for d in sorted({int(r["distance"]) for r in rows}):
        at = [r for r in rows if r["distance"] == d and r["canaries"]]
        if at:
            out.append(
                {
                    "distance": d,
                    "tests": len(at),
                    "eps_lower_max": max(r["eps_lower"] for r in at),
                    "eps_lower_joint_max": max(r["eps_lower_joint"] for r in at),
                    "eps_accountant_max": max(r["eps_accountant"] for r in at),
                }
            )
    return out


def audit_observer(num_nodes: int, audit_seed: int) -> int:
    """The one node whose view a run's distance tests score, drawn from `audit-seed`.

    One observer, chosen before the run: every observer's tests together would need a
    Bonferroni correction over n × diameter tests, and at such levels Theorem 3.1's δ term
    (2mδ) leaves no bound at all (a 20-node ring at ε = 8: every joint bound 0).
    """
    return int(np.random.default_rng([audit_seed, _STREAM, 1]).integers(num_nodes))


def distance_groups(plan: CanaryPlan, graph: nx.Graph, v: int) -> dict[int, np.ndarray]:
    """Positions of the canaries whose owner is exactly d ≥ 1 hops from v, by d."""
    hops = nx.single_source_shortest_path_length(graph, v)
    dist = np.array([hops.get(int(u), -1) for u in plan.owner])
    return {d: np.flatnonzero(dist == d) for d in sorted(set(dist.tolist()) - {-1, 0})}


def gdp_eps(mu: float, delta: float) -> float:
    """ε at δ of μ-GDP (Dong, Roth & Su 2022, Cor. 2.13): the Gaussian fit's ε."""
    if not mu > 0:
        return 0.0
    if math.isinf(mu):
        return math.inf

    def excess(e: float) -> float:
        tail = math.exp(e + float(special.log_ndtr(-e / mu - mu / 2)))
        return float(special.ndtr(-e / mu + mu / 2)) - tail - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
        if hi > 1e3:
            return math.inf
    return float(optimize.brentq(excess, 0.0, hi, xtol=1e-9))


def whitebox_report(
    plan: CanaryPlan,
    graph: nx.Graph,
    *,
    owner_z: np.ndarray,
    observer_z: Mapping[int, np.ndarray],
    eps: np.ndarray,
    delta: float,
) -> list[dict[str, Any]]:
    """One row per test: the owner test, then each observer's test at each distance.

    `eps[u, v]` is the accountant's ε (its diagonal: local ε). Each row's `eps_accountant`
    is the largest ε over the canaries it tests; `eps_lower` holds at CONFIDENCE for that
    row, `eps_lower_joint` for all rows together (Bonferroni).
    """
    tests = [("owner", None, 0, np.arange(len(plan.owner)), owner_z)]
    for v, z in sorted(observer_z.items()):
        for d, pos in distance_groups(plan, graph, v).items():
            tests.append((f"node-{v}", v, d, pos[~np.isnan(z[pos])], z))
    joint = joint_confidence(len(tests))
    rows = []
    for name, v, d, pos, z in tests:
        owners = np.unique(plan.owner[pos])
        acc = eps[owners, owners] if v is None else eps[owners, v]
        rows.append(_test_row(name, v, d, z[pos], plan.included[pos], acc, delta, joint))
    return rows


def _gaussian_fit(z_in: np.ndarray, z_out: np.ndarray) -> float:
    """μ̂: the gap of the means over the pooled standard deviation (Andrew et al.'s fit)."""
    if len(z_in) < 2 or len(z_out) < 2:
        return math.nan
    spread = math.sqrt((np.var(z_in, ddof=1) + np.var(z_out, ddof=1)) / 2)
    gap = float(np.mean(z_in) - np.mean(z_out))
    return gap / spread if spread > 0 else math.copysign(math.inf, gap)


def _test_row(
    name: str,
    v: int | None,
    d: int,
    z: np.ndarray,
    included: np.ndarray,
    acc: np.ndarray,
    delta: float,
    joint: float,
) -> dict[str, Any]:
    """A test's Theorem 3.1 bound (95% and joint), its accountant's ε and the Gaussian fit."""
    if len(z) == 0:
        best = {"guesses": 0, "correct": 0, "eps_lower": 0.0}
        together = best
        mu = math.nan
    else:
        best = audit_scores(z, included, delta)
        together = audit_scores(z, included, delta, joint)
        mu = _gaussian_fit(z[included], z[~included])
    return {
        "observer": name,
        "node": v,
        "distance": d,
        "canaries": len(z),
        "included": int(np.sum(included)),
        "guesses": best["guesses"],
        "correct": best["correct"],
        "eps_lower": best["eps_lower"],
        "eps_lower_joint": together["eps_lower"],
        "eps_accountant": float(np.max(acc)) if len(acc) else 0.0,
        "mu_hat": mu,
        "eps_estimate": gdp_eps(mu, delta) if np.isfinite(mu) else math.nan,
    }
