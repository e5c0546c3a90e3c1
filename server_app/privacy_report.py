"""How the ServerApp states a run's privacy: the log line and summary.json's `privacy`."""

from __future__ import annotations

from typing import Any

from flower_app.config import RunConfig, claims_per_round
from flower_app.network_calibration import NetworkPlan, node_network_plan
from flower_app.privacy import (
    PRIVACY_UNITS,
    TRUST_MODEL,
    gaussian_sigma,
    one_shot_true_eps,
    replace_one_epsilon,
)
from flower_app.results import format_eps
from flower_app.wire import NOISE_MULTIPLIER, SAMPLE_RATE, STEPS
from strategies.base import Diagnostics

MECHANISMS = {
    "sample": "Opacus DP-SGD (per-example clipping and Gaussian noise at every step)",
    "update": "clipped round update + Gaussian noise, once per round (client-level DP)",
}
# What a node's reply makes public about it (beyond its noisy model).
PUBLIC_PER_NODE = (
    "dataset size (num-examples), noise multiplier σ, sample rate q, DP step counts and the "
    "ε/δ they imply; no training loss or other un-noised statistic"
)
SECRET_NOISE = (
    "secret: a ChaCha20 keystream under a fresh 256-bit key from each node's OS, every "
    "round (not reproducible, not replayable by the server or other nodes)"
)
CAVEATS = (
    "Gaussians are float64 Box-Muller draws summed four at a time as in Opacus's "
    "secure_mode, then rounded to float32: floating-point attacks (Mironov 2012) are "
    "mitigated, not excluded by proof"
)


def noise_source(cfg: RunConfig) -> str:
    """Where the noise comes from, in words that say what a seed gives away."""
    if cfg.seeded_noise:
        return (
            f"SEEDED (noise-seed={cfg.noise_seed}): reproducible, and NOT private against "
            "anyone who knows noise-seed"
        )
    return SECRET_NOISE


def privacy_line(cfg: RunConfig, num_nodes: int = 0) -> str:
    """The run's privacy in one log line (an audit run says so first).

    With privacy-unit=network it ends with the plan every node computes for `num_nodes`:
    σ, the far class's ε and every closer class's (larger) ε.
    """
    audit = (
        f"AUDIT RUN ({cfg.audit_canaries} canaries per node, audit-seed={cfg.audit_seed}, "
        f"each in its owner's {'update' if cfg.whitebox_audit else 'data'} with probability "
        "1/2). "
        if cfg.audited
        else ""
    )
    network = node_network_plan(cfg, num_nodes)
    return audit + _privacy_line(cfg) + (f" {network_plan_text(network)}" if network else "")


def network_plan_text(network: NetworkPlan) -> str:
    """privacy-unit=network in one sentence: σ, the target class, and what closer ones get."""
    d = network.rho.min_distance
    closer = ", ".join(
        f"{network.eps(x):.2f} at distance {k}" for k, x in network.rho.by_distance if k < d
    )
    return (
        f"Privacy unit: network: σ={network.noise_multiplier:.4f} (local calibration would "
        f"need {network.local_sigma():.4f}) gives ε <= {format_eps(network.target_eps)} "
        f"(largest {network.network_eps():.2f}) to every observer {d} or more hops away, on "
        f"the schedule drawn from seed when every node answers; closer observers get more: "
        f"{closer + ', ' if closer else ''}{network.local_eps():.2f} to anyone holding a "
        f"node's own releases (its local ε, which its ledger and policy count)."
    )


def _privacy_line(cfg: RunConfig) -> str:
    if not cfg.private:
        return "Privacy: none (eps=inf): plain SGD, no clipping, no noise."
    unit = PRIVACY_UNITS[cfg.dp_mode]
    if claims_per_round(cfg):
        budget = (
            f"ε={format_eps(cfg.eps)} is a PER-ROUND label (σ = sqrt(2 ln(1.25/δ))/ε = "
            f"{gaussian_sigma(cfg.eps, cfg.delta):.4f}, δ={cfg.delta:g}, exact cost "
            f"{one_shot_true_eps(cfg.eps, cfg.delta):.3g} per round, never composed); "
            "eps_spent reports the true ε composed over the rounds each node trains (RDP)"
        )
    elif cfg.privacy_unit == "network":
        budget = (
            f"target ε={format_eps(cfg.eps)}, δ={cfg.delta:g} per node over the whole run "
            f"against every observer {cfg.network_min_distance} or more gossip hops away "
            f"({cfg.num_server_rounds} rounds, pairwise network accountant)"
        )
    else:
        budget = (
            f"target ε={format_eps(cfg.eps)}, δ={cfg.delta:g} per node over the whole run "
            f"({cfg.num_server_rounds} rounds × {local_work(cfg)}), "
            "RDP-calibrated noise"
        )
    return f"Privacy: {budget}; {unit}; {TRUST_MODEL}; noise {noise_source(cfg)}."


def local_work(cfg: RunConfig) -> str:
    """What one round trains: `local-steps` steps or `local-epochs` epochs."""
    if cfg.local_steps:
        return f"{cfg.local_steps} local steps"
    return f"{cfg.local_epochs} local epoch" + ("s" if cfg.local_epochs != 1 else "")


def privacy_summary(
    cfg: RunConfig, strategy: Diagnostics, eps_spent: float, num_nodes: int = 0
) -> dict[str, Any]:
    """summary.json's `privacy`: enough to re-audit every node's ε from the file alone."""
    per_round, reports = claims_per_round(cfg), strategy.reports
    network = node_network_plan(cfg, num_nodes)
    nodes = with_replace_one(reports.privacy_by_node(), cfg) if cfg.private else {}
    return {
        "unit": PRIVACY_UNITS[cfg.dp_mode] if cfg.private else "none",
        "trust_model": TRUST_MODEL,
        "mechanism": MECHANISMS[cfg.dp_mode] if cfg.private else "none",
        "noise": noise_source(cfg) if cfg.private else "none",
        "noise_seed": cfg.noise_seed if cfg.seeded_noise else None,
        "public_per_node": PUBLIC_PER_NODE,
        "caveats": CAVEATS,
        "dp_mode": cfg.dp_mode,
        "accounting": cfg.accounting,
        # Whom eps protects: every observer (local), or those network-min-distance or more
        # hops away (network: the plan, with every closer class's larger ε).
        "privacy_unit": cfg.privacy_unit,
        "network_plan": network.report() if network else None,
        # accounting=per-round: `eps_target` is this uncomposed label, not a budget...
        "eps_per_round_claimed": cfg.eps if per_round else None,
        # ...and this is what one such round really costs (Balle & Wang's exact ε).
        "eps_per_round_true": one_shot_true_eps(cfg.eps, cfg.delta) if per_round else None,
        # The true ε: composed over the rounds each node trained (largest node), counting
        # nodes whose replies were lost as if they trained.
        "eps_composed": eps_spent,
        # dp-mode=update: against the server, which sees each node's own release, replacing
        # a node's data moves the clipped update by 2C; this is its ε (largest node).
        "eps_replace": (
            reports.eps_spent(strict=True) if cfg.private and cfg.dp_mode == "update" else None
        ),
        "delta": cfg.delta,
        "accountant": cfg.accountant,
        "max_grad_norm": cfg.max_grad_norm,
        # grad-sample-mode=auto resolved (every mode computes the same update).
        "opacus_grad_sample_mode": (
            cfg.opacus_mode if cfg.private and cfg.dp_mode == "sample" else None
        ),
        "nodes": nodes,
        # dp-mode=sample: each node publishes its n, so against an observer the relation
        # that holds is replace-one (same n, one example swapped); this is its ε (largest
        # node; `eps` and the node policies count add/remove, see the README).
        "eps_replace_one": max(
            (n["eps-replace-one"] for n in nodes.values() if "eps-replace-one" in n),
            default=None,
        ),
    }


def with_replace_one(nodes: dict[str, dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """Each node's report with its replace-one ε (dp-mode=sample; update mode has eps-strict)."""
    if cfg.dp_mode != "sample":
        return nodes
    out = {}
    for pid, node in nodes.items():
        out[pid] = dict(node)
        if {NOISE_MULTIPLIER, SAMPLE_RATE, STEPS} <= node.keys():
            out[pid]["eps-replace-one"] = replace_one_epsilon(
                noise_multiplier=float(node[NOISE_MULTIPLIER]),
                sample_rate=float(node[SAMPLE_RATE]),
                steps=int(node[STEPS]),
                delta=cfg.delta,
            )
    return out
