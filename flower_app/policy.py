"""The node operator's privacy policy, from the SuperNode's `--node-config`, and its checks.

The server proposes a run (ε, δ, rounds, dp-mode, noise-seed); a node trains only if the
run fits the floor its operator set. Simulated nodes carry no policy keys and accept what
the run asks (still with secret noise unless the run sets `noise-seed`). Every check here is
pure: it names the limit and the value asked, so a refusal is one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flower_app.config import RunConfig
from flower_app.privacy import PrivacyLedger, lifetime_epsilon

# What a SuperNode's --node-config may hold: the shard it trains (simulation sets the first
# two), where its data lives, its torch threads, and the operator's privacy policy.
NODE_KEYS = ("partition-id", "num-partitions", "data-dir", "torch-threads")
POLICY_KEYS = ("max-eps", "lifetime-eps", "allow-seeded-noise", "ledger-dir")


class PolicyError(ValueError):
    """A node config the node cannot run with: one line naming key, value, what is valid."""


@dataclass(frozen=True)
class NodePolicy:
    """The operator's limits; the defaults (no policy keys) accept every run."""

    max_eps: float = math.inf  # largest ε of one run
    lifetime_eps: float = math.inf  # largest ε of all runs ever, composed
    allow_seeded_noise: bool = False  # consulted only when the node has a policy
    ledger_dir: str = ""  # where the durable ledger lives ("" = the run's context only)
    has_policy: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePolicy:
        """Parse and check the policy keys; an unknown key is a typo, never ignored."""
        if unknown := sorted(set(node_config) - set(NODE_KEYS) - set(POLICY_KEYS)):
            raise PolicyError(
                f"unknown node-config key(s): {', '.join(unknown)}; "
                f"valid keys: {', '.join(NODE_KEYS + POLICY_KEYS)}"
            )
        has_policy = any(k in node_config for k in POLICY_KEYS)
        out: dict[str, Any] = {"has_policy": has_policy, "allow_seeded_noise": not has_policy}
        for key, attr in (("max-eps", "max_eps"), ("lifetime-eps", "lifetime_eps")):
            if key in node_config:
                out[attr] = _positive(key, node_config[key])
        if "allow-seeded-noise" in node_config:
            out["allow_seeded_noise"] = _boolean(
                "allow-seeded-noise", node_config["allow-seeded-noise"]
            )
        if "ledger-dir" in node_config:
            value = str(node_config["ledger-dir"])
            if not value:
                raise PolicyError("ledger-dir='' is not valid; expected a folder path")
            out["ledger_dir"] = value
        return cls(**out)

    def describe(self) -> str:
        """The policy as node-config text, for logs."""
        if not self.has_policy:
            return "no policy (accepts the run's privacy)"
        return (
            f"max-eps={self.max_eps:g} lifetime-eps={self.lifetime_eps:g} "
            f"allow-seeded-noise={str(self.allow_seeded_noise).lower()} "
            f"ledger-dir={self.ledger_dir or '(none)'}"
        )


def _positive(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not number > 0:
        raise PolicyError(f"{key}={value!r} is not valid; expected a number > 0 (inf = no limit)")
    return number


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise PolicyError(f"{key}={value!r} is not valid; expected true or false")


def round_steps(cfg: RunConfig, ledger: PrivacyLedger) -> int:
    """DP steps one round takes: `local-steps`, each local epoch's steps, or one release."""
    if ledger.dp_mode == "update":
        return 1
    return cfg.local_steps or cfg.local_epochs * round(1 / ledger.sample_rate)


def refusal(
    policy: NodePolicy,
    cfg: RunConfig,
    *,
    num_samples: int,
    ledger: PrivacyLedger | None,
    other_runs: Sequence[PrivacyLedger],
    steps: int,
) -> str | None:
    """Why this node must not train this round (None: it may).

    `ledger` is the run's ledger before the round (None without DP), `other_runs` every
    other run in the node's durable ledger, `steps` what the round would take.
    """
    if cfg.seeded_noise and policy.has_policy and not policy.allow_seeded_noise:
        return (
            f"noise-seed={cfg.noise_seed} makes the DP noise replayable by anyone who knows "
            "it; this node's allow-seeded-noise=false"
        )
    if ledger is None:
        if math.isfinite(policy.max_eps):
            return f"eps=inf (no DP) exceeds this node's max-eps={policy.max_eps:g}"
        if math.isfinite(policy.lifetime_eps):
            return f"eps=inf (no DP) exceeds this node's lifetime-eps={policy.lifetime_eps:g}"
        return None
    if cfg.delta >= 1 / num_samples:
        return (
            f"delta={cfg.delta:g} is not valid for this node's {num_samples} examples: δ must "
            f"be below 1/n = {1 / num_samples:.3g} (a larger δ allows releasing an example)"
        )
    planned = ledger.strict_epsilon(ledger.planned_steps)
    if cfg.eps > policy.max_eps:
        return f"eps={cfg.eps:g} exceeds this node's max-eps={policy.max_eps:g}"
    if planned > policy.max_eps:
        return (
            f"this run would cost the node ε={planned:.4g} (δ={cfg.delta:g}, against the "
            f"server), over its max-eps={policy.max_eps:g}"
        )
    if ledger.steps + steps > ledger.planned_steps:
        return (
            f"this train message would take the node to {ledger.steps + steps} DP steps, past "
            f"the {ledger.planned_steps} its noise was calibrated for "
            f"(num-server-rounds={cfg.num_server_rounds}): no round beyond the plan"
        )
    if math.isfinite(policy.lifetime_eps):
        before = lifetime_epsilon(list(other_runs) + [ledger])
        after = lifetime_epsilon(list(other_runs) + [ledger.at_plan()])
        if after > policy.lifetime_eps:
            return (
                f"this run would bring the node's lifetime ε to {after:.4g}, over its "
                f"lifetime-eps={policy.lifetime_eps:g} (spent so far: {before:.4g})"
            )
    return None
