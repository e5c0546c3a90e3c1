"""privacy-unit=network: the noise that gives ε against every observer d or more hops away.

Local DP (`privacy-unit=local`) calibrates σ so that an observer of a node's own noisy
releases gets at most ε. Under sealed gossip only a node's partners receive those; an
observer farther away receives them only averaged with other nodes' independent noise
(`network_dp.pairwise_rho`). `privacy-unit=network` calibrates σ so that every (owner u,
observer v) pair at graph distance ≥ `network-min-distance` gets at most ε by that pairwise
accountant; closer observers, and anyone holding the node's own releases, get the larger
local ε, which is computed and reported beside it, never hidden.

Which schedule: the exact one the run will draw, not a bound for every draw. The server draws
each matching or edge from `schedule_rng(seed)` as the rounds go; when every node answers
every round that is exactly the schedule `draw_schedule` makes from the same seed
(`planned_schedule`), a public function of the run config and the node count, fixed before
any data is touched (what the accountant assumes), which every node redraws itself. A bound
valid for any draw would save nothing: a draw that leaves a node unmatched every round hands
its own release, carried forward, to every observer it can still reach, so the worst draw
is local DP.

What it assumes (docs/privacy-audit.md): the server follows the drawn schedule (honest but
curious: it cannot read models under the sealed relay, but it picks who talks to whom), and
every node answers every round. A node that drops out changes the later draws; the run then
reports the ε of the schedule it did use (network_privacy.json), which may miss the target,
and says so. The closer class's ε that a node's policy checks is its local ε, which bounds
every observer whatever the schedule (post-processing of its own releases).

`pairwise_rho` is homogeneous: each term is a squared shift over a covariance ∝ σ², so
ρ(σ, s) = s² ρ(1, 1) / σ² for sensitivity s. The accountant therefore runs once, at σ = 1,
and σ comes from a bisection on one Gaussian RDP curve α ρ / (2σ²).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import networkx as nx
import numpy as np

from flower_app.config import ConfigError, RunConfig
from flower_app.gossip import schedule_rng
from flower_app.gossip_schedule import MAX_NODES
from flower_app.network_dp import ORDERS, Schedule, draw_schedule, pairwise_rho, rdp_to_eps
from flower_app.topology import TopologyError, build_topology

# σ is rounded up to this grid, so that every process (server, nodes, a restarted node
# resuming its ledger) finds the same value whatever the last bits of its linear algebra.
SIGMA_GRID = 1e-6
# The bisection gives up beyond this σ (no target this large a σ misses is reachable).
MAX_SIGMA = 2.0**40


@dataclass(frozen=True)
class UnitRho:
    """ρ at σ = 1 (sensitivity 1) of a schedule, by observer class: what calibration needs."""

    min_distance: int
    local: float  # the owner's own releases (the number of rounds it trains)
    network: float  # the largest over (owner, observer) pairs at distance >= min_distance
    by_distance: tuple[tuple[int, float], ...]  # (distance >= 1, largest ρ at it), ascending


def class_rho(rho: np.ndarray, graph: nx.Graph, min_distance: int) -> UnitRho:
    """The largest ρ[u, v] in each observer class of `graph` (ρ as `pairwise_rho` returns it).

    Raises:
        ValueError: No pair is `min_distance` or more hops apart (the class is empty).
    """
    dist = dict(nx.all_pairs_shortest_path_length(graph))
    n = rho.shape[0]
    largest: dict[int, float] = {}
    for u in range(n):
        for v in range(n):
            d = dist[u].get(v, math.inf)  # unreachable: the farthest class
            if u != v:
                key = int(d) if math.isfinite(d) else n
                largest[key] = max(largest.get(key, 0.0), float(rho[u, v]))
    far = [x for d, x in largest.items() if d >= min_distance]
    if not far:
        diameter = max(largest, default=0)
        raise ValueError(
            f"network-min-distance={min_distance} exceeds the graph's diameter {diameter}: "
            f"no observer is that far; valid: 1..{diameter}"
        )
    return UnitRho(
        min_distance=min_distance,
        local=float(np.max(np.diag(rho))),
        network=max(far),
        by_distance=tuple(sorted(largest.items())),
    )


def gaussian_rdp_eps(rho: float, delta: float, orders: Sequence[float] = ORDERS) -> float:
    """ε at δ of RDP α ρ / 2: a Gaussian mechanism of squared sensitivity-to-noise ratio ρ.

    The RDP of N(0, σ²) shifted by Δ is α Δ² / (2σ²) (Mironov 2017, Cor. 3), so ρ = Δ²/σ²;
    converted at δ as `network_dp.rdp_to_eps` does (Balle et al. 2020, Thm 21).
    """
    if rho == 0:
        return 0.0
    if not math.isfinite(rho):
        return math.inf
    return float(rdp_to_eps(np.asarray(orders, dtype=float) * rho / 2, orders, delta))


def calibrate_sigma(
    rho_unit: float, *, target_eps: float, delta: float, orders: Sequence[float] = ORDERS
) -> float:
    """Smallest σ on `SIGMA_GRID` with `gaussian_rdp_eps(rho_unit / σ², δ)` <= target.

    ε falls strictly as σ grows (each order's term α ρ / (2σ²) does, and so does their
    minimum), so bisection finds the boundary; σ is then rounded up to the grid and checked.

    Raises:
        ValueError: ρ is 0 or infinite (no σ is needed, or none suffices), or no σ up to
            `MAX_SIGMA` meets the target.
    """
    if not 0 < rho_unit < math.inf:
        raise ValueError(f"calibration needs 0 < ρ < inf; got ρ={rho_unit}")

    def meets(sigma: float) -> bool:
        return gaussian_rdp_eps(rho_unit / sigma**2, delta, orders) <= target_eps

    lo, hi = 0.0, 1.0
    while not meets(hi):
        lo, hi = hi, 2 * hi
        if hi > MAX_SIGMA:
            raise ValueError(
                f"eps={target_eps:g} cannot be met at δ={delta:g}: even σ={MAX_SIGMA:g} misses it"
            )
    while hi - lo > SIGMA_GRID / 8:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    sigma = math.ceil(hi / SIGMA_GRID) * SIGMA_GRID
    while not meets(sigma):  # rounding: never return a σ that misses
        sigma += SIGMA_GRID
    return sigma


# What the schedule depends on: the run config's fields that `planned_schedule` reads.
_SCHEDULE_FIELDS = (
    "topology",
    "seed",
    "degree",
    "edge_prob",
    "gossip_mode",
    "num_server_rounds",
    "gossip_steps",
    "gossip_edges",
)


def planned_schedule(cfg: RunConfig, num_nodes: int) -> tuple[nx.Graph, Schedule]:
    """The graph and the schedule a gossip run of `cfg` draws when every node answers.

    The same topology (`build_topology` from `seed`) and the same generator and calls
    (`schedule_rng(seed)`, `draw_schedule`) as `strategies.gossip.Gossip`.
    """
    return _draw(num_nodes, *(getattr(cfg, f) for f in _SCHEDULE_FIELDS))


def _draw(
    num_nodes: int, topology: str, seed: int, degree: int, edge_prob: float, mode: str,
    rounds: int, gossip_steps: int, gossip_edges: int,
) -> tuple[nx.Graph, Schedule]:  # fmt: skip
    try:
        graph = build_topology(topology, num_nodes, seed=seed, degree=degree, edge_prob=edge_prob)
    except TopologyError as err:
        raise ConfigError(str(err)) from None
    rng = schedule_rng(seed)
    schedule = draw_schedule(
        graph, mode, rounds=rounds, rng=rng, gossip_steps=gossip_steps, edges_per_round=gossip_edges
    )
    return graph, schedule


@dataclass(frozen=True)
class NetworkPlan:
    """σ of a privacy-unit=network run and the ε it gives each observer class."""

    noise_multiplier: float
    rho: UnitRho  # at σ = 1, sensitivity 1
    target_eps: float
    delta: float

    def eps(
        self, rho_unit: float, *, sigma: float | None = None, delta: float | None = None,
        sensitivity: float = 1.0,
    ) -> float:  # fmt: skip
        """ε of one class's ρ at σ (default: the plan's), δ and sensitivity (2: replacement)."""
        s = self.noise_multiplier if sigma is None else sigma
        if s <= 0:
            return math.inf
        return gaussian_rdp_eps(
            sensitivity**2 * rho_unit / s**2, self.delta if delta is None else delta
        )

    def network_eps(self, **kw: Any) -> float:
        """ε of the worst observer at distance >= min_distance (<= target at the plan's σ)."""
        return self.eps(self.rho.network, **kw)

    def local_eps(self, **kw: Any) -> float:
        """ε of an observer of the node's own releases: the closer class's worst (local DP)."""
        return self.eps(self.rho.local, **kw)

    def local_sigma(self) -> float:
        """The σ privacy-unit=local would take for the same target, on the same grid."""
        return calibrate_sigma(self.rho.local, target_eps=self.target_eps, delta=self.delta)

    def report(self) -> dict[str, Any]:
        """The plan as JSON: σ, the target, and every class's ε (closer ones never hidden)."""
        return {
            "privacy_unit": "network",
            "min_distance": self.rho.min_distance,
            "noise_multiplier": self.noise_multiplier,
            "local_noise_multiplier": self.local_sigma(),
            "target_eps": self.target_eps,
            "delta": self.delta,
            "schedule": "the one the server draws from seed when every node answers every "
            "round (flower_app/network_calibration.py planned_schedule)",
            "eps_network": self.network_eps(),
            "eps_local": self.local_eps(),
            "eps_max_by_distance": [
                {"distance": d, "eps_max": self.eps(x)} for d, x in self.rho.by_distance
            ],
        }


@lru_cache(maxsize=16)
def _unit_rho(num_nodes: int, min_distance: int, *schedule_key: Any) -> UnitRho:
    """`class_rho` of the planned schedule at σ = 1: the costly part, once per process."""
    graph, schedule = _draw(num_nodes, *schedule_key)
    try:
        return class_rho(pairwise_rho(schedule, 1.0), graph, min_distance)
    except ValueError as err:
        raise ConfigError(
            f"{err} ({graph.graph.get('name', 'graph')}, {num_nodes} nodes)"
        ) from None


def network_plan(cfg: RunConfig, num_nodes: int) -> NetworkPlan:
    """The σ every node of this privacy-unit=network run calibrates, and its classes' ε.

    Raises:
        ConfigError: One line: too many nodes to account, an empty or blind far class, or
            a target no σ meets.
    """
    if not 2 <= num_nodes <= MAX_NODES:
        raise ConfigError(
            f"privacy-unit='network' needs 2 to {MAX_NODES} gossip nodes (the pairwise "
            f"accountant's cost grows as n^4); this run has {num_nodes}"
        )
    key = (getattr(cfg, f) for f in _SCHEDULE_FIELDS)
    rho = _unit_rho(num_nodes, cfg.network_min_distance, *key)
    if rho.network == 0:
        raise ConfigError(
            f"network-min-distance={cfg.network_min_distance}: in the schedule this run draws "
            "no observer that far receives anything of another node's data, so the "
            "calibration would add no noise; use a smaller network-min-distance or more "
            "rounds, or privacy-unit='local'"
        )
    try:
        sigma = calibrate_sigma(rho.network, target_eps=cfg.eps, delta=cfg.delta)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return NetworkPlan(sigma, rho, cfg.eps, cfg.delta)


def node_network_plan(cfg: RunConfig, num_nodes: int) -> NetworkPlan | None:
    """The network plan of a private privacy-unit=network run (None for any other run)."""
    if cfg.privacy_unit != "network" or not cfg.private:
        return None
    return network_plan(cfg, num_nodes)
