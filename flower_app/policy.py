"""The node operator's privacy policy, from the SuperNode's `--node-config`, and its checks.

The server proposes a run (ε, δ, rounds, dp-mode, noise-seed, audit canaries); a node trains
only if the run fits the floor its operator set. Simulated nodes carry no policy keys and
accept what the run asks (still with secret noise unless the run sets `noise-seed`); a node
serving its own data (`data-dir`) must have a policy. Every check here is pure: it names the
limit and the value asked, so a refusal is one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from flower_app.config import RunConfig
from flower_app.network_calibration import NetworkPlan
from flower_app.privacy import PrivacyLedger, lifetime_epsilon

# What a SuperNode's --node-config may hold: the shard it trains (simulation sets the first
# two), where its data lives, its torch threads, and the operator's privacy policy.
NODE_KEYS = ("partition-id", "num-partitions", "data-dir", "torch-threads")
POLICY_KEYS = (
    "max-eps",
    "max-partner-eps",
    "lifetime-eps",
    "max-delta",
    "allow-seeded-noise",
    "allow-audit",
    "ledger-dir",
    "require-sealed-relay",
)
# The δ a node with a policy accepts unless its operator sets `max-delta`; its ε limits are
# (ε, max-delta) guarantees, so every ε the policy compares is computed at max-delta.
DEFAULT_MAX_DELTA = 1e-5
# Every node refuses δ > 1/(DELTA_SAFETY · n) of its n examples. δ ≥ 1/n allows a run that
# releases an example outright; δ ≪ 1/n is standard. 2 keeps the README's runs (δ=1e-5 on up
# to ~25,000 examples a node: 3 nodes sharing Fashion-MNIST) valid; the operator's max-delta
# is the stricter, absolute floor.
DELTA_SAFETY = 2


class PolicyError(ValueError):
    """A node config the node cannot run with: one line naming key, value, what is valid."""


@dataclass(frozen=True)
class NodePolicy:
    """The operator's limits; the defaults (no policy keys) accept every run."""

    max_eps: float = math.inf  # largest ε of one run, at max_delta
    # Largest ε of one run against the closer class: observers of the node's own releases
    # (its gossip partners, the server under FedAvg or an open relay) and, with
    # privacy-unit=network, every observer nearer than network-min-distance. None: max_eps,
    # so a run that trades the closer class's privacy for noise needs the operator's opt-in.
    max_partner_eps: float | None = None
    lifetime_eps: float = math.inf  # largest ε of all runs ever, composed, at max_delta
    max_delta: float = DEFAULT_MAX_DELTA  # largest δ of a run; consulted only with a policy
    allow_seeded_noise: bool = False  # consulted only when the node has a policy
    allow_audit: bool = False  # consulted only when the node has a policy
    ledger_dir: str = ""  # where the durable ledger lives ("" = the run's context only)
    # Train only where the server never receives this node's model: gossip, sealed relay.
    require_sealed_relay: bool = False
    has_policy: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePolicy:
        """Parse and check the node config; an unknown key is a typo, never ignored.

        Fails closed: a finite ε limit needs an absolute `ledger-dir` (without a durable
        ledger a restarted node forgets what it spent), and a node serving its own data
        (`data-dir`) needs a policy (`max-eps=inf` is the explicit opt-out).
        """
        if unknown := sorted(set(node_config) - set(NODE_KEYS) - set(POLICY_KEYS)):
            raise PolicyError(
                f"unknown node-config key(s): {', '.join(unknown)}; "
                f"valid keys: {', '.join(NODE_KEYS + POLICY_KEYS)}"
            )
        torch_threads(node_config)
        has_policy = any(k in node_config for k in POLICY_KEYS)
        out: dict[str, Any] = {"has_policy": has_policy, "allow_seeded_noise": not has_policy}
        for key, attr in (
            ("max-eps", "max_eps"),
            ("max-partner-eps", "max_partner_eps"),
            ("lifetime-eps", "lifetime_eps"),
        ):
            if key in node_config:
                out[attr] = _positive(key, node_config[key])
        if "max-delta" in node_config:
            out["max_delta"] = _delta("max-delta", node_config["max-delta"])
        for key in ("allow-seeded-noise", "allow-audit", "require-sealed-relay"):
            if key in node_config:
                out[key.replace("-", "_")] = _boolean(key, node_config[key])
        if "ledger-dir" in node_config:
            out["ledger_dir"] = _absolute("ledger-dir", node_config["ledger-dir"])
        policy = cls(**out)
        policy.check_fails_closed(str(node_config.get("data-dir", "")))
        return policy

    def check_fails_closed(self, own_data: str) -> None:
        """Refuse a policy that would bound nothing: limits without a ledger, own data without."""
        if own_data and not self.has_policy:
            raise PolicyError(
                f"data-dir={own_data!r}: a node serving its own data needs a privacy policy; "
                "set max-eps, lifetime-eps and ledger-dir (docs/deploy.md), or max-eps=inf to "
                "accept any run"
            )
        limits = (
            ("max-eps", self.max_eps),
            ("max-partner-eps", self.partner_limit),
            ("lifetime-eps", self.lifetime_eps),
        )
        for key, limit in limits:
            if math.isfinite(limit) and not self.ledger_dir:
                raise PolicyError(
                    f"{key}={limit:g} needs an absolute ledger-dir: without a durable ledger "
                    "a restarted node forgets what it spent and the limit bounds nothing"
                )

    @property
    def partner_limit(self) -> float:
        """The closer class's limit: `max-partner-eps`, else `max-eps` (no opt-in)."""
        return self.max_eps if self.max_partner_eps is None else self.max_partner_eps

    def describe(self) -> str:
        """The policy as node-config text, for logs."""
        if not self.has_policy:
            return "no policy (accepts the run's privacy)"
        return (
            f"max-eps={self.max_eps:g} max-partner-eps={self.partner_limit:g}"
            f"{'' if self.max_partner_eps is not None else ' (= max-eps)'} "
            f"lifetime-eps={self.lifetime_eps:g} "
            f"max-delta={self.max_delta:g} "
            f"allow-seeded-noise={str(self.allow_seeded_noise).lower()} "
            f"allow-audit={str(self.allow_audit).lower()} "
            f"require-sealed-relay={str(self.require_sealed_relay).lower()} "
            f"ledger-dir={self.ledger_dir or '(none)'}"
        )


def torch_threads(node_config: Mapping[str, Any]) -> int:
    """Node config `torch-threads` (default 1), checked: a positive integer."""
    value = node_config.get("torch-threads", 1)
    if isinstance(value, str) and value.strip().isdigit():
        number: Any = int(value)
    else:
        number = value
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise PolicyError(f"torch-threads={value!r} is not valid; expected an integer >= 1")
    return number


def _positive(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not number > 0:
        raise PolicyError(f"{key}={value!r} is not valid; expected a number > 0 (inf = no limit)")
    return number


def _delta(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not 0 < number < 1:
        raise PolicyError(
            f"{key}={value!r} is not valid; expected a number in (0, 1), "
            f"default {DEFAULT_MAX_DELTA:g}"
        )
    return number


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise PolicyError(f"{key}={value!r} is not valid; expected true or false")


def _absolute(key: str, value: Any) -> str:
    """An absolute folder path as written: a relative one (or ~) depends on the process."""
    text = str(value)
    if not text.startswith("/"):
        raise PolicyError(
            f"{key}={text!r} is not valid; expected an absolute folder path (a relative "
            "path or ~ depends on the ClientApp process's folder and user)"
        )
    return text


def node_run_config(policy: NodePolicy, cfg: RunConfig) -> RunConfig:
    """The run config as this node trains it: with a policy, the run's `data-dir` is ignored.

    The server must not point a device at other files: a node with a policy trains its own
    `data-dir` (node config) or its cut of the dataset from the dataset's default place.
    """
    return replace(cfg, data_dir="") if policy.has_policy and cfg.data_dir else cfg


def at_operator_delta(policy: NodePolicy, ledger: PrivacyLedger) -> PrivacyLedger:
    """The ledger whose ε the policy counts: at the operator's max-delta (with a policy)."""
    return replace(ledger, delta=policy.max_delta) if policy.has_policy else ledger


def policy_lifetime_epsilon(policy: NodePolicy, ledgers: Sequence[PrivacyLedger]) -> float:
    """The node's lifetime ε as its policy counts it (at max-delta with a policy)."""
    return lifetime_epsilon([at_operator_delta(policy, led) for led in ledgers])


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
    network: NetworkPlan | None = None,
) -> str | None:
    """Why this node must not train this round (None: it may).

    `ledger` is the run's ledger before the round (None without DP), `other_runs` every
    other entry in the node's durable ledger, `steps` what the round would take, `network`
    the node's own privacy-unit=network plan (None: privacy-unit=local). With a policy,
    every ε compared with a limit is computed at its max-delta.
    """
    if reason := _consent_refusal(policy, cfg):
        return reason
    if ledger is None:
        limits = (
            ("max-eps", policy.max_eps),
            ("max-partner-eps", policy.partner_limit),
            ("lifetime-eps", policy.lifetime_eps),
        )
        for key, limit in limits:
            if math.isfinite(limit):
                return f"eps=inf (no DP) exceeds this node's {key}={limit:g}"
        return None
    return (
        _delta_refusal(policy, cfg, num_samples)
        or _run_refusal(policy, cfg, ledger, steps)
        or _class_refusal(policy, ledger, network)
        or _lifetime_refusal(policy, ledger, other_runs)
    )


def _consent_refusal(policy: NodePolicy, cfg: RunConfig) -> str | None:
    """What a node with a policy does only with its operator's consent."""
    if not policy.has_policy:
        return None
    if policy.require_sealed_relay and (reason := _relay_refusal(cfg)):
        return f"{reason}; this node's require-sealed-relay=true"
    if cfg.seeded_noise and not policy.allow_seeded_noise:
        return (
            f"noise-seed={cfg.noise_seed} makes the DP noise replayable by anyone who knows "
            "it; this node's allow-seeded-noise=false"
        )
    if cfg.audit_canaries > 0 and not policy.allow_audit:
        what = (
            "vectors to the update this node releases"
            if cfg.whitebox_audit
            else "examples to this node's training data"
        )
        return (
            f"audit-canaries={cfg.audit_canaries} adds the auditor's {what} (a privacy "
            "audit); this node's allow-audit=false"
        )
    return None


def _relay_refusal(cfg: RunConfig) -> str | None:
    """How this run would hand the node's model to the server (None: it never does)."""
    if cfg.strategy != "gossip":
        return f"strategy={cfg.strategy} sends this node's model to the server"
    if not cfg.sealed_relay:
        return (
            f"gossip-relay={cfg.gossip_relay} lets the server read and average this node's "
            "model (only gossip-relay=sealed keeps it from the server)"
        )
    return None


def _delta_refusal(policy: NodePolicy, cfg: RunConfig, num_samples: int) -> str | None:
    """δ above the operator's max-delta, or not well below 1/n of the node's examples."""
    if policy.has_policy and cfg.delta > policy.max_delta:
        return f"delta={cfg.delta:g} exceeds this node's max-delta={policy.max_delta:g}"
    bound = 1 / (DELTA_SAFETY * num_samples)
    if cfg.delta > bound:
        return (
            f"delta={cfg.delta:g} is not valid for this node's {num_samples} examples: δ must "
            f"be at most 1/({DELTA_SAFETY}n) = {bound:.3g} (δ ≥ 1/n allows releasing an "
            "example outright; δ should stay well below 1/n)"
        )
    return None


def _run_refusal(
    policy: NodePolicy, cfg: RunConfig, ledger: PrivacyLedger, steps: int
) -> str | None:
    """This run's ε against max-eps, and no step beyond the plan."""
    if cfg.eps > policy.max_eps:
        return f"eps={cfg.eps:g} exceeds this node's max-eps={policy.max_eps:g}"
    if ledger.steps + steps > ledger.planned_steps:
        return (
            f"this train message would take the node to {ledger.steps + steps} DP steps, past "
            f"the {ledger.planned_steps} its noise was calibrated for "
            f"(num-server-rounds={cfg.num_server_rounds}): no round beyond the plan"
        )
    return None


def _class_refusal(
    policy: NodePolicy, ledger: PrivacyLedger, network: NetworkPlan | None
) -> str | None:
    """Each observer class's ε, computed here from the node's own σ, against its limit.

    The closer class (partners, anyone holding the node's own releases) gets the local ε,
    which bounds every observer whatever schedule the server follows; under
    privacy-unit=local so does everyone else. Under privacy-unit=network the far class gets
    the pairwise accountant's ε on the schedule the node redrew itself (`network`), at the
    replacement relation (2C) as `strict_epsilon` counts the local ε.
    """
    counted = at_operator_delta(policy, ledger)
    local = counted.strict_epsilon(ledger.planned_steps)
    if network is None and local > policy.max_eps:
        return (
            f"this run would cost the node ε={local:.4g} (against the server; at "
            f"δ={counted.delta:g}, this node's max-delta), over its max-eps={policy.max_eps:g}"
        )
    if local > policy.partner_limit:
        key = (
            f"max-partner-eps={policy.partner_limit:g}"
            if policy.max_partner_eps is not None
            else f"max-eps={policy.max_eps:g} (its partner limit: no max-partner-eps is set)"
        )
        who = (
            "its gossip partners, and every node nearer than network-min-distance"
            if network
            else "its gossip partners, or the server under FedAvg or an open relay"
        )
        return (
            f"this run would give observers of the node's own releases ({who}) "
            f"ε={local:.4g} at δ={counted.delta:g}, over its {key}"
        )
    if network is None:
        return None
    far = network.network_eps(
        sigma=ledger.noise_multiplier, delta=counted.delta, sensitivity=_sensitivity(ledger)
    )
    if far > policy.max_eps:
        return (
            f"this run would give observers {network.rho.min_distance} or more hops away "
            f"ε={far:.4g} at δ={counted.delta:g} (the node's own accounting of the schedule "
            f"drawn from seed), over its max-eps={policy.max_eps:g}"
        )
    return None


def _sensitivity(ledger: PrivacyLedger) -> float:
    """The replacement relation in units of C, as `PrivacyLedger.strict_noise_multiplier`."""
    return 2.0 if ledger.dp_mode == "update" else 1.0


def _lifetime_refusal(
    policy: NodePolicy, ledger: PrivacyLedger, other_runs: Sequence[PrivacyLedger]
) -> str | None:
    """Every run the node trained in, composed with this run's whole plan, against lifetime-eps."""
    if not math.isfinite(policy.lifetime_eps):
        return None
    before = policy_lifetime_epsilon(policy, [*other_runs, ledger])
    after = policy_lifetime_epsilon(policy, [*other_runs, ledger.at_plan()])
    if after > policy.lifetime_eps:
        return (
            f"this run would bring the node's lifetime ε to {after:.4g}, over its "
            f"lifetime-eps={policy.lifetime_eps:g} (spent so far: {before:.4g})"
        )
    return None


_PLAN_FIELDS = (
    "noise_multiplier",
    "sample_rate",
    "delta",
    "accountant",
    "planned_steps",
    "dp_mode",
)


def resume_mismatch(resumed: PrivacyLedger | None, planned: PrivacyLedger | None) -> str | None:
    """Why a ledger entry found for this run and partition is not this run's plan (None: it is).

    Flower shares `context.state` across a run series, and a ledger-dir outlives runs: an entry
    planned under another config (another ε, δ, batch size, rounds or mode) must not be
    resumed with this run's steps, or σ would not be the one this run's ε was calibrated for.
    """
    if resumed is None:
        return None
    if planned is None:
        return (
            "this node's ledger holds a DP plan for this run and the run asks for eps=inf: "
            "not resuming it"
        )
    differ = [
        f.replace("_", "-")
        for f in _PLAN_FIELDS
        if not _same(getattr(resumed, f), getattr(planned, f))
    ]
    if not differ:
        return None
    return (
        f"this node's ledger entry for this run was planned with another {', '.join(differ)} "
        "than this run's config implies: not resuming it"
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b
