"""A white-box audit run's audit.json (`audit-mode=whitebox`, flower_app/whitebox_audit.py).

Every node that trained reported, with its train reply, its release minus the model it
started from along every canary (`wire.CANARY_INCREMENTS`): m numbers, never a model. From
those, the schedule the run drew and the public initial model, the ServerApp scores every
canary for the owner test and for one observer drawn from `audit-seed` (`audit_observer`;
its view rebuilt by `views_from_increments`), and bounds ε per test beside the
accountant's ε of the same canaries (`network_privacy.eps_matrix`: pairwise for
dp-mode=update, local DP otherwise).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flower_app.config import RunConfig
from flower_app.whitebox_audit import (
    audit_observer,
    by_distance_bounds,
    draw_plan,
    observer_scores,
    owner_scores,
    project,
    views_from_increments,
    whitebox_report,
)
from flower_app.wire import NOISE_MULTIPLIER
from server_app.network_privacy import eps_matrix

METHOD = (
    "white-box update canaries (Andrew et al. 2024; Steinke, Nasr & Jagielski 2023, "
    "Theorem 3.1 with delta): C·c_i added to the owner's clipped update every round"
)


def _float_vector(record: Any) -> np.ndarray:
    """The model's floating-point arrays as one vector, in state_dict order (as nodes do)."""
    arrays = [a for a in record.to_numpy_ndarrays() if np.issubdtype(a.dtype, np.floating)]
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def _sigmas(strategy: Any, n: int) -> np.ndarray:
    """Each vertex's noise multiplier as it reported it (0: no DP, or never trained)."""
    reports = strategy.reports.metrics
    return np.array([float(reports.get(v, {}).get(NOISE_MULTIPLIER, 0.0)) for v in range(n)])


def _increments(strategy: Any, n: int, m: int) -> np.ndarray:
    """(rounds, nodes, canaries): what each vertex released along every canary, 0 if idle."""
    out = np.zeros((len(strategy.canary_increments), n, m))
    for r, got in enumerate(strategy.canary_increments):
        for v, inc in got.items():
            if np.shape(inc) != (m,):  # not this plan's canaries: the audit cannot use it
                raise ValueError(f"vertex {v} reported {np.shape(inc)} canary increments, not {m}")
            out[r, v] = inc
    return out


def whitebox_audit(cfg: RunConfig, strategy: Any) -> dict[str, Any]:
    """audit.json's content for a white-box audit of a gossip run."""
    head = {"audit": True, "mode": "whitebox", "method": METHOD, "strategy": cfg.strategy,
            "eps_target": cfg.eps, "delta": cfg.delta, "audit_seed": cfg.audit_seed,
            "canaries_per_node": cfg.audit_canaries}  # fmt: skip
    if strategy.schedule_log.gap:
        return head | {"unavailable": strategy.schedule_log.gap, "observers": []}
    schedule = strategy.schedule_log.schedule()
    n, clip = schedule.num_nodes, cfg.max_grad_norm
    plan = draw_plan(n, cfg.audit_canaries, _float_vector(strategy.initial).size, cfg.audit_seed)
    try:
        xi = _increments(strategy, n, len(plan.owner))
    except ValueError as err:
        return head | {"unavailable": str(err), "observers": []}
    initial = project(_float_vector(strategy.initial), plan)
    sigma = _sigmas(strategy, n)
    trained = np.array([[w in rnd.active for w in range(n)] for rnd in schedule.rounds])
    own = xi[:, plan.owner, np.arange(len(plan.owner))]
    v = audit_observer(n, cfg.audit_seed)
    observer_z = {
        v: observer_scores(
            plan, schedule, sigma, v, own=xi[:, v, :], initial=initial, clip=clip,
            received=views_from_increments(schedule, v, xi, initial),
        )
    }  # fmt: skip
    eps, how = eps_matrix(cfg, strategy)
    rows = whitebox_report(
        plan,
        strategy.graph,
        owner_z=owner_scores(plan, own, trained, sigma, clip),
        observer_z=observer_z,
        eps=eps,
        delta=cfg.delta,
    )
    return head | {"accountant": how, "observer_node": v, "observers": rows,
                   "by_distance": by_distance_bounds(rows)}  # fmt: skip
