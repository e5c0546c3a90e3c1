"""Every run-config key of the app: its default, its type and what values are valid.

Flower passes the run config as a kebab-case dict whose values were parsed as TOML, so
`eps=2` arrives as an int and `eps=inf` as a float. `RunConfig.from_run_config` is the single
gate: it rejects unknown keys, casts each value to the field's type and validates it, raising
`ConfigError` with one line naming the key, the bad value and what is valid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

from flower_app.gossip import GOSSIP_MODES
from flower_app.topology import TOPOLOGIES

# Imports nothing heavier than networkx: a strategy reads the run config without torch or
# Opacus, and the checks that need Opacus's accountants import `privacy` when they run.

# `sample`: Opacus DP-SGD (per-example clipping and noise at every step; sample-level DP).
# `update`: plain local SGD, then the round's model update is clipped and noised once
# (client-level DP: the unit is a node's whole dataset).
DP_MODES = ("sample", "update")
# How σ of dp-mode=update is chosen: `composed` meets `eps` over ALL rounds (RDP);
# `per-round` is the classic one-shot Gaussian calibration for `eps`, never composed.
ACCOUNTINGS = ("composed", "per-round")
# Run-config `privacy-unit`: which observers `eps` bounds (see RunConfig.privacy_unit).
PRIVACY_UNIT_CHOICES = ("local", "network")
# Per-sample-gradient modes: `fast` (flower_app/clipped_grads.py, checked against `hooks` on
# the first step of every local training) and Opacus's own; each gives the same clipped
# update (fl-bench checks). Opacus's DPOptimizer clips, noises and counts the steps in all.
GRAD_SAMPLE_MODES = ("fast", "hooks", "ghost", "functorch", "ew")
# grad-sample-mode=auto: the fastest correct mode for each model in fl-bench's one-epoch
# timings (docs/performance.md has them).
# A model of one's own starts on `fast`, which falls back to Opacus hooks (and says so once)
# when it does not cover a layer.
FASTEST_GRAD_SAMPLE_MODE = {"cnn": "fast", "mlp": "fast"}
# Seeds travel as Flower's int64 run-config values (torch takes < 2^64, numpy any size).
MAX_SEED = 2**63 - 1
# A finite eps above this is no privacy at all, and the noise search's bisection to within
# 0.01 of eps=1e300 never ends.
MAX_EPS = 1000.0
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string"}
# Run-config `model`: a built-in name, or a callable returning an nn.Module named by import
# path ("package.module:build") or by an absolute file path ("/path/nets.py:build").
BUILTIN_MODELS = ("cnn", "mlp")
_MODULE_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_FILE_SPEC = re.compile(r"/[^:]*\.py:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
MODEL_HELP = (
    f"{', '.join(BUILTIN_MODELS)}, 'package.module:callable' (importable where the "
    "ServerApp and ClientApps run) or '/absolute/path/file.py:callable'"
)
# Run-config `dataset`: a built-in one, or a run's own .npz file (flower_app/data.py).
BUILTIN_DATASETS = ("fashion-mnist", "mnist")
FILE_DATASET_PREFIX = "npz:"
DATASET_HELP = (
    f"{', '.join(BUILTIN_DATASETS)}, or 'npz:/absolute/path/data.npz' (arrays x_train, "
    "y_train, x_test, y_test)"
)


def is_builtin_model(name: str) -> bool:
    """Whether `model` names one of the app's own models (else an import path)."""
    return name in BUILTIN_MODELS


def _model_spec(name: str) -> bool:
    """A built-in name, or the syntax of an import or file path (imported when a run checks)."""
    return (
        is_builtin_model(name)
        or _MODULE_SPEC.fullmatch(name) is not None
        or _FILE_SPEC.fullmatch(name) is not None
    )


def is_file_dataset(name: str) -> bool:
    """Whether `dataset` names a run's own .npz file rather than a built-in dataset."""
    return name.startswith(FILE_DATASET_PREFIX)


def _dataset_spec(name: str) -> bool:
    if not is_file_dataset(name):
        return name in BUILTIN_DATASETS
    path = name.removeprefix(FILE_DATASET_PREFIX)
    return path.startswith("/") and path.endswith(".npz") and path.isprintable()


class ConfigError(ValueError):
    """Bad run config: one line naming key, value and what is valid."""


def _key(name: str) -> str:
    return name.replace("_", "-")


def _choice(*valid: str) -> dict[str, Any]:
    return {"choices": valid}


def _check(pred: Callable[[Any], bool], valid: str) -> dict[str, Any]:
    return {"check": pred, "valid": valid}


def _ints(low: int, high: int, note: str = "") -> dict[str, Any]:
    """An integer in [low, high]: finite bounds, so no count can hang a run or fill memory."""
    return _check(lambda v: low <= v <= high, f"an integer >= {low} and <= {high}{note}")


def _one_folder_name(name: str) -> bool:
    """Whether `name` is one plain folder name (printable, <= 255 bytes, no separators)."""
    return (
        name.isprintable()  # no NUL, newline or other control character
        and len(name.encode()) <= 255
        and not any(sep in name for sep in "/\\")
        and name not in (".", "..")
        and not name.startswith("-")
    )


_POSITIVE_FLOAT = _check(lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_SAMPLES = _ints(0, 10_000_000, " (0 = no cap)")
_SEED = _ints(0, MAX_SEED)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The resolved run config; field `foo_bar` is run-config key `foo-bar`."""

    num_server_rounds: int = field(default=20, metadata=_ints(1, 100_000))
    strategy: str = field(default="fedavg", metadata=_choice("fedavg", "gossip"))
    eps: float = field(
        default=8.0,
        metadata=_check(
            lambda v: 0 < v <= MAX_EPS or v == math.inf,
            f"a number > 0 and <= {MAX_EPS:g}, or inf for no DP",
        ),
    )
    delta: float = field(default=1e-5, metadata=_check(lambda v: 0 < v < 1, "a number in (0, 1)"))
    max_grad_norm: float = field(default=1.0, metadata=_POSITIVE_FLOAT)
    local_epochs: int = field(default=1, metadata=_ints(1, 1_000))
    # DP-SGD (or SGD) steps per round instead of `local-epochs` whole epochs; 0 = epochs.
    local_steps: int = field(default=0, metadata=_ints(0, 1_000_000, " (0 = local-epochs epochs)"))
    batch_size: int = field(default=64, metadata=_ints(1, 100_000))
    lr: float = field(default=0.1, metadata=_POSITIVE_FLOAT)
    momentum: float = field(
        default=0.0, metadata=_check(lambda v: 0 <= v < 1, "a number in [0, 1)")
    )
    model: str = field(default="cnn", metadata=_check(_model_spec, MODEL_HELP))
    dataset: str = field(default="fashion-mnist", metadata=_check(_dataset_spec, DATASET_HELP))
    normalize: str = field(default="mean-std", metadata=_choice("mean-std", "none"))
    data_dir: str = ""
    partitioner: str = field(default="dirichlet", metadata=_choice("dirichlet", "iid", "shards"))
    alpha: float = field(default=0.5, metadata=_POSITIVE_FLOAT)
    shards_per_node: int = field(default=2, metadata=_ints(1, 10_000))
    seed: int = field(default=7, metadata=_SEED)
    # Seeds ONLY the DP noise and Poisson sampling, for repeatable simulations; -1 (the
    # default) keys them inside each node with a fresh OS key, which nobody else can replay.
    noise_seed: int = field(
        default=-1,
        metadata=_check(
            lambda v: v == -1 or 0 <= v <= MAX_SEED,
            f"an integer >= 0 and <= {MAX_SEED} (seeded, reproducible noise), or -1 for "
            "secret noise",
        ),
    )
    samples_per_node: int = field(default=0, metadata=_SAMPLES)
    # Training examples carved off before partitioning (fixed, not seeded by `seed`), never
    # seen by any node: the only data hyperparameters may be chosen on.
    validation_samples: int = field(
        default=0, metadata=_ints(0, 10_000_000, " (0 = no validation set)")
    )
    # What the central evaluation scores: the test set (final numbers) or the validation set
    # (tuning; such a run never touches the test set).
    evaluate_on: str = field(default="test", metadata=_choice("test", "validation"))
    test_samples: int = field(default=0, metadata=_SAMPLES)
    accountant: str = field(default="rdp", metadata=_choice("rdp", "prv"))
    dp_mode: str = field(default="sample", metadata=_choice(*DP_MODES))
    accounting: str = field(default="composed", metadata=_choice(*ACCOUNTINGS))
    fraction_train: float = field(
        default=1.0, metadata=_check(lambda v: 0 < v <= 1, "a number in (0, 1]")
    )
    grad_sample_mode: str = field(default="auto", metadata=_choice("auto", *GRAD_SAMPLE_MODES))
    # Where nodes train and the ServerApp evaluates (flower_app/device.py). `auto`: CUDA when
    # the machine doing the work has it, resolved by each node on its own hardware and by the
    # ServerApp on the server's. An explicit cuda device a machine lacks is refused, never
    # replaced by the CPU. The DP noise and Poisson batches are drawn on the CPU either way.
    device: str = field(
        default="auto",
        metadata=_check(
            lambda v: re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", v) is not None,
            "auto (CUDA when present), cpu, cuda or cuda:N",
        ),
    )
    topology: str = field(default="ring", metadata=_choice(*TOPOLOGIES))
    gossip_mode: str = field(default="matching", metadata=_choice(*GOSSIP_MODES))
    gossip_edges: int = field(default=10, metadata=_ints(1, 10_000))
    # Gossip iterations per round, each a fresh matching / set of edges / Metropolis step.
    gossip_steps: int = field(default=1, metadata=_ints(1, 1_000))
    # Who can read the models gossip exchanges (strategy=gossip). `sealed` (the default, in
    # simulation as on real SuperNodes): each node seals its model for one partner
    # (flower_app/sealed.py) and the server only routes ciphertexts, so the server never
    # holds a model after round 1's public initial one; node accuracy is measured by each
    # node on its own model, and consensus distance and the average model do not exist.
    # `open`: the server holds and averages every node's model (the old relay: FedAvg's
    # trust model), an explicit opt-in for the diagnostics that need every model.
    # One default everywhere: a run config cannot tell a simulation from a deployment, and
    # a diagnostic is worth less than a guarantee that silently changes with the backend.
    gossip_relay: str = field(default="sealed", metadata=_choice("sealed", "open"))
    # Whom `eps` protects against (flower_app/network_calibration.py). `local`: every
    # observer, including one that sees the node's own noisy model. `network` (only sealed
    # gossip, dp-mode=update): every observer at least `network-min-distance` hops away on the
    # graph, on the schedule the server will draw from `seed`; closer observers get a larger
    # ε, computed and reported, and each node checks it against its operator's limits.
    privacy_unit: str = field(default="local", metadata=_choice(*PRIVACY_UNIT_CHOICES))
    network_min_distance: int = field(default=2, metadata=_ints(1, 100_000))
    degree: int = field(default=4, metadata=_ints(1, 10_000))
    edge_prob: float = field(
        default=0.3, metadata=_check(lambda v: 0 < v <= 1, "a number in (0, 1]")
    )
    node_eval_samples: int = field(default=1000, metadata=_SAMPLES)
    num_nodes: int = field(
        default=0, metadata=_ints(0, 100_000, " (0 = the nodes connected at start)")
    )
    min_available_nodes: int = field(default=2, metadata=_ints(1, 100_000))
    round_timeout: float = field(
        default=3600.0,
        metadata=_check(lambda v: 0 < v <= 1_000_000, "a number of seconds > 0 and <= 1000000"),
    )
    # One-run privacy audit (flower_app/audit.py): canaries per node, 0 = no audit, and the
    # auditor's seed for choosing them and flipping their coins (never the DP noise's).
    audit_canaries: int = field(default=0, metadata=_ints(0, 10_000, " (0 = no audit)"))
    audit_seed: int = field(default=0, metadata=_SEED)
    # `canaries`: images in the training data, scored by loss (flower_app/audit.py);
    # `whitebox`: directions added to each clipped update of dp-mode=update, scored by
    # projection of what each observer receives (flower_app/whitebox_audit.py).
    audit_mode: str = field(default="canaries", metadata=_choice("canaries", "whitebox"))
    results_dir: str = ""
    # A sweep's cell list (flower_app/cells.py, written by fl-sweep): the ServerApp runs each
    # cell in turn in this one Flower run. "" = this run is one experiment.
    cells: str = ""
    # Which Flower node id may hold each partition id ("0:<node-id>,1:<node-id>"; the ids
    # `flwr supernode register` printed): a reply from any other node claiming it is refused.
    # "" binds each partition id to the first node that reports it.
    partition_nodes: str = field(
        default="",
        metadata=_check(
            lambda v: _bindings_or_none(v) is not None,
            "'' (first report binds) or 'PARTITION:NODE-ID,...' with distinct integers >= 0",
        ),
    )
    run_name: str = field(
        default="",
        metadata=_check(
            lambda v: v == "" or _one_folder_name(v),
            "'' (a generated name) or one folder name: printable, at most 255 bytes, no '/' "
            "or '\\', not '.' or '..', not starting with '-'",
        ),
    )

    def __post_init__(self) -> None:
        """Check every field against its metadata, so a bad value never reaches training."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):  # no key is a switch: True would count as 1
                raise _invalid(f, value)
            if choices := f.metadata.get("choices"):
                if value not in choices:
                    raise _invalid(f, value)
            elif (check := f.metadata.get("check")) and not check(value):
                raise _invalid(f, value)
        self._check_combinations()
        self._check_calibration()

    def _check_combinations(self) -> None:
        """Values valid alone but not together."""
        if self.accounting == "per-round" and self.dp_mode != "update":
            raise ConfigError(
                "accounting='per-round' is not valid with dp-mode='sample'; it is the "
                "uncomposed per-round calibration of dp-mode=update (use accounting=composed)"
            )
        from flower_app.privacy import one_shot_true_eps

        if claims_per_round(self) and (true := one_shot_true_eps(self.eps, self.delta)) > self.eps:
            raise ConfigError(
                f"eps={self.eps:g} is not valid with accounting='per-round': the one-shot "
                f"Gaussian σ for that label costs ε={true:.3g} per round at δ={self.delta:g} "
                "(the formula only holds for small ε); use a smaller eps or "
                "accounting='composed'"
            )
        if self.evaluate_on == "validation" and self.validation_samples == 0:
            raise ConfigError(
                "evaluate-on='validation' is not valid with validation-samples=0; carve a "
                "validation set first (e.g. validation-samples=5000)"
            )
        if is_file_dataset(self.dataset) and (self.data_dir or self.audited):
            key, fix, why = (
                ("data-dir", "''", "the file holds the whole dataset")
                if self.data_dir
                else ("audit-canaries", "0", "the audit's canaries are 28x28 images of 10 classes")
            )
            raise ConfigError(
                f"{key} is not valid with dataset={self.dataset!r}: {why}; use {key}={fix}, "
                "or a built-in dataset"
            )
        if self.whitebox_audit and (self.dp_mode != "update" or self.strategy != "gossip"):
            raise ConfigError(
                "audit-mode='whitebox' needs dp-mode='update' and strategy='gossip' (its "
                "canaries are added to the released update, scored per gossip observer)"
            )
        if reason := _network_unit_refusal(self):
            raise ConfigError(reason)
        if self.fraction_train < 1 and self.strategy != "fedavg":
            raise ConfigError(
                f"fraction-train={self.fraction_train!r} is not valid with "
                f"strategy={self.strategy!r}; only fedavg samples nodes (use 1.0)"
            )

    def _check_calibration(self) -> None:
        """An eps that no noise can meet at this delta fails here, not in every node."""
        if not self.private or claims_per_round(self):
            return  # per-round σ is a formula: nothing to search
        from flower_app.privacy import CalibrationError, smallest_target_eps

        try:
            floor = smallest_target_eps(self.delta, self.accountant)
        except CalibrationError as err:
            raise ConfigError(str(err)) from None
        if self.eps < floor:
            raise ConfigError(
                f"eps={self.eps:g} is too small: at δ={self.delta:g} the {self.accountant} "
                f"accountant certifies no ε below {floor:.4g}, whatever the noise; use a "
                "larger eps (or delta)"
            )

    @property
    def bindings(self) -> dict[int, int]:
        """`partition-nodes` as {partition id: Flower node id} (empty: first report binds)."""
        return _bindings_or_none(self.partition_nodes) or {}

    @property
    def opacus_mode(self) -> str:
        """The Opacus per-sample-gradient mode to train with (`auto`: the model's fastest)."""
        if self.grad_sample_mode == "auto":
            return FASTEST_GRAD_SAMPLE_MODE.get(self.model, "fast")
        return self.grad_sample_mode

    @property
    def audited(self) -> bool:
        """Whether this is an audit run (canaries in the nodes' training data)."""
        return self.audit_canaries > 0

    @property
    def whitebox_audit(self) -> bool:
        """Whether the audit's canaries are update directions (not training images)."""
        return self.audited and self.audit_mode == "whitebox"

    @property
    def sealed_relay(self) -> bool:
        """Whether gossip runs sealed: the server routes ciphertexts and holds no model."""
        return self.strategy == "gossip" and self.gossip_relay == "sealed"

    @property
    def private(self) -> bool:
        """Whether DP is on (eps=inf turns it off)."""
        return math.isfinite(self.eps)

    @property
    def seeded_noise(self) -> bool:
        """Whether `noise-seed` makes the DP noise reproducible (and so not private)."""
        return self.noise_seed >= 0

    @classmethod
    def from_run_config(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's kebab-case dict; unknown keys are typos, not ignored."""
        by_key = {_key(f.name): f for f in fields(cls)}
        if unknown := sorted(set(raw) - set(by_key)):
            raise ConfigError(
                f"unknown run-config key(s): {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(by_key))}"
            )
        return cls(**{by_key[k].name: _cast(by_key[k], v) for k, v in raw.items()})

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict, as Flower and `config.json` spell the keys."""
        return {_key(k): v for k, v in asdict(self).items()}


def _network_unit_refusal(cfg: RunConfig) -> str | None:
    """Why `privacy-unit=network` cannot hold for this run (None: it can, or it is `local`).

    Only sealed gossip keeps a node's own model from all but its partners, and only the
    update-level Gaussian mechanism (composed, finite eps) has a pairwise accountant.
    """
    if cfg.privacy_unit != "network":
        return None
    needed = {"strategy": "gossip", "dp-mode": "update", "gossip-relay": "sealed"}
    needed["accounting"] = "composed"
    asked = {key: getattr(cfg, key.replace("-", "_")) for key in needed}
    wrong = [f"{key}={value!r}" for key, value in asked.items() if value != needed[key]]
    if not cfg.private:
        wrong.append("eps=inf")
    if not wrong:
        return None
    return (
        f"privacy-unit='network' is not valid with {', '.join(wrong)}: it needs "
        "strategy='gossip', dp-mode='update', gossip-relay='sealed', accounting='composed' "
        "and a finite eps (under FedAvg or an open relay the server sees every node's noisy "
        "model, so only local ε bounds it); or use privacy-unit='local'"
    )


def claims_per_round(cfg: RunConfig) -> bool:
    """Whether `eps` is the tutorial's uncomposed per-round label, not the run's budget."""
    return cfg.private and cfg.dp_mode == "update" and cfg.accounting == "per-round"


def defaults() -> dict[str, Any]:
    """Every key with its default, kebab-case (what pyproject.toml must declare)."""
    return RunConfig().to_dict()


def _invalid(f: Field[Any], value: Any) -> ConfigError:
    """The one line for a bad value of `f`: its key, the value and what is valid."""
    shown = repr(value)
    if len(shown) > 80:
        shown = f"{shown[:60]}...({len(shown)} characters)"
    if choices := f.metadata.get("choices"):
        return ConfigError(
            f"{_key(f.name)}={shown} is not valid; choose one of: {', '.join(choices)}"
        )
    valid = f.metadata.get("valid") or _TYPE_WORDS[str(f.type)]
    return ConfigError(f"{_key(f.name)}={shown} is not valid; expected {valid}")


def _cast(f: Field[Any], value: Any) -> Any:
    """`value` as `f`'s type; TOML `true` is never a number or a name.

    A float is an integer only when it is one, and a small one: 1e300 would pass int().
    """
    if isinstance(value, bool):
        raise _invalid(f, value)
    try:
        if f.type == "int":
            if isinstance(value, float) and not (value.is_integer() and abs(value) <= MAX_SEED):
                raise ValueError
            return int(value)
        if f.type == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise _invalid(f, value) from None


def _bindings_or_none(text: str) -> dict[int, int] | None:
    """Parse `partition-nodes`; None when it is malformed."""
    if not text.strip():
        return {}
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
    except ValueError:
        return None
    if any(len(p) != 2 or min(p) < 0 for p in pairs):
        return None
    parts, nodes = [p[0] for p in pairs], [p[1] for p in pairs]
    if len(set(parts)) != len(parts) or len(set(nodes)) != len(nodes):
        return None
    return dict(pairs)  # type: ignore[arg-type]
