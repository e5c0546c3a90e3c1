"""A gossip run's privacy against each observer: network_privacy.json and its one line.

Local DP (every ε the run reports elsewhere) bounds what an observer who sees a node's own
noisy model learns. Under gossip a node further away sees that model only averaged with
other nodes' independent noise. For `dp-mode=update` (one Gaussian release per round) the
pairwise accountant (flower_app/network_dp.py `pairwise_rdp`, valid under adaptive
composition) gives ε for every (owner, observer) pair from the schedule the run actually
drew. For DP-SGD no published pairwise bound applies, so every observer gets the owner's
local ε, and the file says so. The server: with an open relay it sees every noisy model
(local ε); with a sealed relay it sees no model, only each node's accuracy counts on public
test images, which are post-processing of the node's noisy model: bounded by local ε (far
below it in practice, not computed), never 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flower_app.config import RunConfig
from flower_app.network_calibration import node_network_plan
from flower_app.network_dp import ORDERS, by_distance, pairwise_rdp, rdp_to_eps
from flower_app.results import write_json
from flower_app.wire import NOISE_MULTIPLIER

NETWORK_PRIVACY = "network_privacy.json"
PAIRWISE = (
    "pairwise network DP of the schedule this run drew (flower_app/network_dp.py "
    "pairwise_rho: RDP of what the observer receives, composed over rounds with the models "
    "carried forward, valid for adaptively chosen updates; Mironov 2017 Prop. 1), converted "
    "at δ as Opacus does (Balle et al. 2020, Thm 21)"
)
LOCAL_ONLY = {
    "sample": "local DP for every observer: no published pairwise bound applies to DP-SGD "
    "(many noisy steps per round), so none is claimed",
}


def server_view(cfg: RunConfig, local_max: float) -> dict[str, Any]:
    """What the server sees and the ε that bounds it (never 0)."""
    if cfg.sealed_relay:
        return {
            "sees": "no model: who talks to whom, message sizes and timing, and each node's "
            "accuracy counts on public test images",
            "eps_bound": local_max,
            "relation": "at most the local ε (post-processing of each node's noisy model); "
            "far below it in practice, not computed",
        }
    return {"sees": "every node's noisy model (open relay)", "eps_bound": local_max,
            "relation": "equal to the local ε"}  # fmt: skip


def _sigmas(strategy: Any, n: int) -> list[float]:
    """Each vertex's noise multiplier (a vertex that never trained added no noise: any σ)."""
    reports = strategy.reports.metrics
    known = [float(m[NOISE_MULTIPLIER]) for m in reports.values() if NOISE_MULTIPLIER in m]
    return [
        float(reports[v][NOISE_MULTIPLIER])
        if v in reports and NOISE_MULTIPLIER in reports[v]
        else max(known, default=1.0)
        for v in range(n)
    ]


def eps_matrix(cfg: RunConfig, strategy: Any) -> tuple[np.ndarray, str]:
    """ε[owner u, observer v] at the run's δ, and how it was computed."""
    n, reports = strategy.graph.number_of_nodes(), strategy.reports
    local = np.array([reports.node_eps(v) if v in reports.metrics else 0.0
                      for v in range(n)])  # fmt: skip
    if not cfg.private:
        return np.full((n, n), np.inf), "no DP (eps=inf): nothing bounds any observer"
    log = strategy.schedule_log
    why = LOCAL_ONLY.get(cfg.dp_mode) or (log.gap and f"local DP for every observer: {log.gap}")
    if why:
        return np.repeat(local[:, None], n, axis=1), why
    rdp = pairwise_rdp(log.schedule(), _sigmas(strategy, n))
    eps = np.asarray(rdp_to_eps(rdp, ORDERS, cfg.delta))
    # Whatever v sees is post-processing of u's own releases and of what does not depend on
    # u's data, so the ledger's local ε (which also counts rounds whose replies were lost)
    # bounds every observer.
    eps = np.minimum(eps, local[:, None])
    np.fill_diagonal(eps, local)
    return eps, PAIRWISE


def calibration(cfg: RunConfig, eps: np.ndarray, graph: Any, method: str) -> dict[str, Any] | None:
    """privacy-unit=network: the plan, and whether the run's own schedule met its target.

    The plan is for the schedule drawn when every node answers; a node that dropped out
    changes the draws (or, sealed, breaks the log: local ε for everyone), so the realized
    worst ε of the far class is recomputed here and may miss the target: said, not hidden.
    """
    network = node_network_plan(cfg, graph.number_of_nodes())
    if network is None:
        return None
    d = network.rho.min_distance
    far = [row["eps_max"] for row in by_distance(eps, graph)
           if row["distance"] is None or row["distance"] >= d]  # fmt: skip
    realized = max(far, default=0.0)
    return {
        **network.report(),
        "eps_network_realized": realized,
        "target_met": realized <= cfg.eps * (1 + 1e-9),
        "realized_method": method,
    }


def network_privacy(cfg: RunConfig, strategy: Any) -> dict[str, Any]:
    """network_privacy.json of a private gossip run."""
    eps, method = eps_matrix(cfg, strategy)
    local_max = float(np.max(np.diag(eps)))
    return {
        "privacy_unit": cfg.privacy_unit,
        "calibration": calibration(cfg, eps, strategy.graph, method),
        "relay": cfg.gossip_relay,
        "dp_mode": cfg.dp_mode,
        "unit": "add/remove one node's whole data (the README's unit for dp-mode=update)"
        if cfg.dp_mode == "update"
        else "add/remove one training example of one node",
        "delta": cfg.delta,
        "method": method,
        "server": server_view(cfg, local_max),
        "by_distance": by_distance(eps, strategy.graph),
        "eps": [[float(x) for x in row] for row in eps],  # [owner][observer]
    }


def network_line(doc: dict[str, Any]) -> str:
    """One sentence: ε to direct partners, the worst ε farther away, the server.

    Farther away is network-min-distance with privacy-unit=network (then with its target,
    met or missed), else 2.
    """
    rows = {d["distance"]: d for d in doc["by_distance"] if d["distance"] is not None}
    partners = rows.get(1, rows.get(0))
    plan = doc.get("calibration")
    k = plan["min_distance"] if plan else 2
    far = [d["eps_max"] for dist, d in rows.items() if dist >= k]
    server = "no models (sealed relay)" if doc["relay"] == "sealed" else "every noisy model"
    far_text = f", <= {_eps(max(far))} at distance >= {k}" if far else ""
    if plan:
        met = "met" if plan["target_met"] else "MISSED (the schedule changed: a node dropped)"
        far_text += f" (target {_eps(plan['target_eps'])}: {met})"
    partner_eps = _eps(partners["eps_max"]) if partners else "?"
    return f"Network privacy: ε {partner_eps} to direct partners{far_text}; server: {server}"


def _eps(x: float) -> str:
    return "inf" if np.isinf(x) else f"{x:.2f}"


def write_network_privacy(folder: Any, doc: dict[str, Any]) -> dict[str, Any]:
    """Write the file; summary.json's `network_privacy` (the file's name and headline)."""
    write_json(folder / NETWORK_PRIVACY, doc)
    return {"file": NETWORK_PRIVACY, "method": doc["method"], "server": doc["server"],
            "by_distance": doc["by_distance"], "calibration": doc["calibration"]}  # fmt: skip
