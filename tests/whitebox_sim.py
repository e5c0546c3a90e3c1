"""An in-process gossip run of dp-mode=update with the white-box audit's canaries.

The real update-level mechanism (`flower_app.privacy.privatize_update`, noise from the
node's keyed stream), the project's mixing (`flower_app.gossip.apply_metropolis` applies
each step of a schedule drawn by `network_dp.draw_schedule`), the canaries inserted into
each clipped update, and every observer's view recorded as the audit scores it. The
"training" is a pull towards a node-specific target, clipped like any update.
`python -m tests.whitebox_sim` prints the table for a 20-node ring at ε = 8, 2 and ∞;
`python -m tests.whitebox_sim graphs` each distance's bound and accountant ε per graph.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch

from flower_app.gossip import apply_metropolis
from flower_app.network_dp import ORDERS, draw_schedule, pairwise_rdp, rdp_to_eps, view_map
from flower_app.privacy import plan_update_ledger, privatize_update
from flower_app.rng import PrivacyRandomness
from flower_app.topology import build_topology
from flower_app.whitebox_audit import (
    draw_plan,
    insert_canaries,
    observer_scores,
    owner_scores,
    project,
    whitebox_report,
)


@dataclass
class Views:
    """What the audit needs from a run: increments, received messages, the schedule."""

    increments: np.ndarray  # (rounds, nodes, canaries)
    received: dict[int, list[np.ndarray]]


def sigma_for(eps: float, rounds: int, delta: float) -> float:
    """The node's σ for dp-mode=update, as the node plans it (0 without DP)."""
    if math.isinf(eps):
        return 0.0
    return plan_update_ledger(
        target_eps=eps, delta=delta, rounds=rounds, accounting="composed", accountant="rdp"
    ).noise_multiplier


def _train(models, plan, targets, sigma, clip, r, noise_seed):
    """Every node's release this round; its increments along every canary."""
    out, inc = {}, []
    for w, start in models.items():
        end = start + 0.5 * (targets[w] - start)
        noise = PrivacyRandomness.replayable(noise_seed, w, r).noise
        private, _ = privatize_update(
            {"x": torch.from_numpy(start)},
            {"x": torch.from_numpy(end)},
            clip=clip,
            noise_multiplier=sigma,
            noise=noise,
        )
        out[w] = insert_canaries(private["x"].numpy(), plan, w, clip)
        inc.append(project(out[w] - start, plan))
    return out, np.array(inc)


def run(graph, plan, schedule, *, sigma, clip, observers, seed=0, noise_seed=1):
    """Train, insert, gossip: each observer's received messages in `view_map`'s order."""
    n, rng = graph.number_of_nodes(), np.random.default_rng(seed)
    x0 = rng.normal(0, 0.1, plan.dim)
    targets = {w: x0 + rng.normal(0, 3 * clip / math.sqrt(plan.dim), plan.dim) for w in range(n)}
    models = {w: x0.copy() for w in range(n)}
    views = Views(np.zeros((len(schedule.rounds), n, len(plan.owner))), {v: [] for v in observers})
    for r, rnd in enumerate(schedule.rounds):
        models, views.increments[r] = _train(models, plan, targets, sigma, clip, r, noise_seed)
        for step in rnd.steps:
            for v in observers:
                views.received[v] += [project(models[j], plan) for j in range(n)
                                      if j != v and step[v, j] != 0]  # fmt: skip
            weights = {(i, j): step[i, j] for i in range(n) for j in range(n) if step[i, j]}
            models = apply_metropolis(models, weights)
    return views, project(x0, plan)


def audit(
    graph, *, eps, rounds=20, per_node=500, observers=(0,), delta=1e-5, seed=0, mode="matching"
):
    """The white-box audit's rows for one in-process run on `graph` (`mode` gossip)."""
    n, clip = graph.number_of_nodes(), 1.0
    sigma = sigma_for(eps, rounds, delta)
    plan = draw_plan(n, per_node, n * per_node + 256, audit_seed=seed)
    schedule = draw_schedule(graph, mode, rounds=rounds, rng=np.random.default_rng(seed))
    views, initial = run(graph, plan, schedule, sigma=sigma, clip=clip, observers=observers)
    owner_inc = views.increments[:, plan.owner, np.arange(len(plan.owner))]
    trained = np.ones((rounds, n), dtype=bool)
    z_owner = owner_scores(plan, owner_inc, trained, sigma, clip)
    z_obs = {}
    for v in observers:
        recv = np.array(views.received[v]).reshape(view_map(schedule, v).shape[0], -1)
        own = views.increments[:, v, :]
        z_obs[v] = observer_scores(
            plan, schedule, sigma, v, received=recv, own=own, initial=initial, clip=clip
        )
    if sigma > 0:
        acc = np.asarray(rdp_to_eps(pairwise_rdp(schedule, sigma), ORDERS, delta))
    else:
        acc = np.full((n, n), np.inf)
    return whitebox_report(plan, graph, owner_z=z_owner, observer_z=z_obs, eps=acc, delta=delta)


def _table(rows) -> str:
    head = "| distance | canaries | correct/guesses | ε lower 95% | joint | μ̂ | ε est. | ε acc. |"
    out = [head, "|" + " --- |" * 8]
    for r in rows:
        out.append(
            f"| {r['distance']} | {r['canaries']} | {r['correct']}/{r['guesses']} | "
            f"{r['eps_lower']:.2f} | {r['eps_lower_joint']:.2f} | {r['mu_hat']:.2f} | "
            f"{r['eps_estimate']:.2f} | {r['eps_accountant']:.2f} |"
        )
    return "\n".join(out)


def _graphs() -> None:
    """Per graph and gossip mode: each distance's bound / the accountant's ε, at ε 8 and 2."""
    for topo in ("ring", "torus", "exponential"):
        graph = build_topology(topo, 20, seed=7)
        for mode in ("matching", "metropolis"):
            for e in (8.0, 2.0):
                rows = [r for r in audit(graph, eps=e, per_node=1000, mode=mode) if r["canaries"]]
                pairs = [f"{r['eps_lower']:.2f} / {r['eps_accountant']:.2f}" for r in rows]
                cells = " | ".join(pairs)
                sys.stdout.write(f"| {topo} | {mode} | {e:g} | {cells} |\n")


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the tests run: torch's thread pool only contends here
    if sys.argv[1:] == ["graphs"]:
        _graphs()
        sys.exit(0)
    for e in (8.0, 2.0, math.inf):
        rows = audit(nx.cycle_graph(20), eps=e, per_node=1000)
        sys.stdout.write(f"\nring of 20, matching, 20 rounds, eps={e}\n{_table(rows)}\n")
