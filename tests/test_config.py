import math
import tomllib
from pathlib import Path

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
        ({"eps": "lots"}, ["eps='lots'", "float"]),
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
