import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from flower_app.config import ConfigError, RunConfig, defaults

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_pyproject_declares_every_key_with_the_same_default():
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == defaults()


def test_toml_types_are_cast():
    cfg = RunConfig.from_run_config({"eps": 2, "lr": 1, "num-server-rounds": 3.0})
    assert cfg.eps == 2.0 and isinstance(cfg.eps, float)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.num_server_rounds == 3 and isinstance(cfg.num_server_rounds, int)


@pytest.mark.parametrize("value", [math.inf, "inf"])
def test_eps_inf_turns_dp_off(value):
    cfg = RunConfig.from_run_config({"eps": value})
    assert math.isinf(cfg.eps) and not cfg.private
    assert RunConfig.from_run_config({"eps": 2}).private


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"epsilon": 2}, ["unknown run-config key", "epsilon", "valid keys", "eps"]),
        ({"eps": 0}, ["eps=0.0", "> 0"]),
        ({"eps": -1}, ["eps=-1.0", "inf for no DP"]),
        ({"eps": math.nan}, ["eps=nan"]),
        ({"eps": "lots"}, ["eps='lots'", "a number"]),
        ({"delta": 1.5}, ["delta=1.5", "(0, 1)"]),
        ({"delta": 0}, ["delta=0.0"]),
        ({"num-server-rounds": 0}, ["num-server-rounds=0", ">= 1"]),
        ({"num-server-rounds": 2.5}, ["num-server-rounds=2.5", "int"]),
        ({"strategy": "fedprox"}, ["strategy='fedprox'", "choose one of", "fedavg"]),
        ({"partitioner": "zipf"}, ["partitioner='zipf'", "dirichlet", "iid", "shards"]),
        ({"dataset": "cifar10"}, ["dataset='cifar10'", "fashion-mnist", "mnist"]),
        ({"alpha": 0}, ["alpha=0.0", "> 0"]),
        ({"batch-size": 0}, ["batch-size=0"]),
        ({"max-grad-norm": -1}, ["max-grad-norm=-1.0"]),
        ({"samples-per-node": -5}, ["samples-per-node=-5"]),
        ({"momentum": 1.0}, ["momentum=1.0", "[0, 1)"]),
        ({"lr": math.inf}, ["lr=inf", "finite"]),
    ],
)
def test_bad_values_fail_with_one_line_naming_key_value_and_valid(raw, words):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(raw)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_to_dict_round_trips():
    cfg = RunConfig.from_run_config({"eps": 4, "seed": 3, "partitioner": "shards"})
    assert RunConfig.from_run_config(cfg.to_dict()) == cfg


def test_auto_grad_sample_mode_is_the_models_fastest_and_explicit_modes_stay():
    assert RunConfig().grad_sample_mode == "auto"
    assert RunConfig().opacus_mode == "fast"
    assert RunConfig(model="mlp").opacus_mode == "fast"
    assert RunConfig(grad_sample_mode="hooks", model="mlp").opacus_mode == "hooks"


# Issue 26: every value is checked, including types TOML gets wrong and sizes that hang.

MAX_SEED = 2**63 - 1
# key: the largest valid value (each error text states it).
UPPER_BOUNDS = {
    "num-server-rounds": 100_000,
    "local-epochs": 1_000,
    "local-steps": 1_000_000,
    "batch-size": 100_000,
    "shards-per-node": 10_000,
    "samples-per-node": 10_000_000,
    "validation-samples": 10_000_000,
    "test-samples": 10_000_000,
    "node-eval-samples": 10_000_000,
    "gossip-edges": 10_000,
    "gossip-steps": 1_000,
    "degree": 10_000,
    "num-nodes": 100_000,
    "min-available-nodes": 100_000,
    "audit-canaries": 10_000,
    "round-timeout": 1_000_000,
    "eps": 1_000,
    "seed": MAX_SEED,
    "noise-seed": MAX_SEED,
    "audit-seed": MAX_SEED,
}


def one_line_error(raw):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(raw)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("noise-seed", True),
        ("noise-seed", False),
        ("seed", True),
        ("audit-seed", True),
        ("num-server-rounds", True),
        ("local-steps", False),
        ("eps", True),
        ("lr", True),
        ("round-timeout", True),
        ("run-name", True),
        ("data-dir", False),
    ],
)
def test_a_boolean_is_never_a_number_or_a_name(key, value):
    message = one_line_error({key: value})
    assert message.startswith(f"{key}={value!r} is not valid; expected")
    with pytest.raises(ConfigError, match=f"{key}={value!r}"):
        RunConfig(**{key.replace("-", "_"): value})


def test_noise_seed_true_is_refused_with_what_is_valid():
    message = one_line_error({"noise-seed": True})
    assert "expected an integer" in message and "-1 for secret noise" in message


@pytest.mark.parametrize(("key", "bound"), sorted(UPPER_BOUNDS.items()))
def test_every_count_and_seed_has_a_stated_upper_bound(key, bound):
    assert RunConfig.from_run_config({key: bound}).to_dict()[key] == bound
    message = one_line_error({key: bound + 1})
    assert message.startswith(f"{key}={bound + 1}") and " is not valid; expected " in message
    assert str(bound) in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-server-rounds", 1e300),
        ("local-steps", 1e15),
        ("audit-canaries", 1e9),
        ("local-epochs", 1e300),
        ("seed", 2.0**64),
        ("round-timeout", 1e300),
        ("eps", 1e300),
    ],
)
def test_huge_values_fail_in_one_short_line(key, value):
    message = one_line_error({key: value})
    assert message.startswith(f"{key}=") and str(UPPER_BOUNDS[key]) in message


@pytest.mark.parametrize("key", ["seed", "noise-seed", "audit-seed"])
def test_seeds_must_fit_in_64_bits(key):
    message = one_line_error({key: 2**64})
    assert f"{key}={2**64}" in message and str(MAX_SEED) in message


def test_the_largest_seeds_work_where_they_are_used():
    from flower_app.audit import make_canaries
    from flower_app.data import cap
    from flower_app.model import build_model

    cfg = RunConfig(seed=MAX_SEED, noise_seed=MAX_SEED, audit_seed=MAX_SEED)
    build_model("mlp", seed=cfg.seed)
    assert len(cap(np.arange(10), 5, cfg.seed + 99)) == 5
    assert len(make_canaries(2, 1, cfg.audit_seed).label) == 2


@pytest.mark.parametrize(
    "name",
    ["a/b", "/abs", "a\\b", ".", "..", "a\x00b", "two\nlines", "-rf", "x" * 256],
)
def test_run_name_is_one_folder_name(name):
    message = one_line_error({"run-name": name})
    assert message.startswith("run-name=") and "one folder name" in message


@pytest.mark.parametrize("name", ["", "fedavg-eps2-seed7", "my run 2", "r.1", "ü" * 127])
def test_plain_run_names_pass(name):
    assert RunConfig.from_run_config({"run-name": name}).run_name == name


@pytest.mark.parametrize(
    "raw",
    [
        {"eps": 1e-9},
        {"eps": 1e-9, "dp-mode": "update"},
        {"eps": 1e-9, "accountant": "prv"},
        {"eps": 0.003},
    ],
)
def test_an_eps_no_noise_can_meet_fails_before_training(raw):
    message = one_line_error(raw)
    assert message.startswith(f"eps={raw['eps']:g} is too small")
    assert "δ=1e-05" in message and "whatever the noise" in message


def test_a_tiny_per_round_label_needs_no_calibration_and_passes():
    cfg = RunConfig.from_run_config({"eps": 1e-9, "dp-mode": "update", "accounting": "per-round"})
    assert cfg.eps == 1e-9


def test_prv_at_a_delta_it_cannot_compute_is_one_line():
    message = one_line_error({"accountant": "prv", "delta": 1e-30})
    assert "delta=1e-30" in message and "prv" in message
