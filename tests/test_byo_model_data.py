"""A model and a dataset of one's own: import paths, .npz files, their checks and one round."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from flower_app.config import ConfigError, RunConfig
from flower_app.data import DatasetFileError, dataset_shape, load_arrays
from flower_app.model import ModelError, check_model, model_for
from flower_app.node import local_round
from flower_app.preflight import preflight

MODULE_MODEL = "tests.byo_models:build"
FILE_MODEL = f"{Path(__file__).with_name('byo_models.py')}:build"


def write_dataset(path, *, n_train=240, n_test=60, shape=(3, 8, 8), classes=3, seed=0):
    """Images whose class sets their brightness: learnable in a round or two."""
    rng = np.random.default_rng(seed)

    def split(n):
        y = rng.integers(0, classes, size=n)
        x = rng.normal(60 + 60 * y.reshape(-1, *[1] * len(shape)), 20, size=(n, *shape))
        return np.clip(x, 0, 255).astype(np.uint8), y

    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "data.npz")


def small(dataset, **kw):
    return RunConfig(**{"num_server_rounds": 2, "batch_size": 16, "lr": 0.2, "eps": 4.0, **kw},
                     dataset=dataset)  # fmt: skip


def one_line(err):
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_shape_and_classes_come_from_the_data(tmp_path, dataset):
    assert dataset_shape(dataset) == ((3, 8, 8), 3)
    gray = write_dataset(tmp_path / "gray.npz", shape=(5, 7), classes=4)
    assert dataset_shape(gray) == ((1, 5, 7), 4)
    assert dataset_shape("fashion-mnist") == ((1, 28, 28), 10)


def test_own_model_trains_one_dp_round_on_its_own_dataset(dataset):
    cfg = small(dataset, model=MODULE_MODEL)
    check_model(cfg)
    start = model_for(cfg, seed=cfg.seed).state_dict()
    out = local_round(
        cfg, partition_id=0, num_partitions=2, weights=start, ledger=None, server_round=1
    )
    assert out.round_steps > 0 and 0 < out.ledger.epsilon() < cfg.eps
    assert out.state_dict.keys() == start.keys()
    assert any(not torch.equal(out.state_dict[k], start[k]) for k in start)
    assert out.num_examples + local_round(
        cfg, partition_id=1, num_partitions=2, weights=start, ledger=None, server_round=1
    ).num_examples == len(load_arrays(dataset).y_train)


def test_a_model_file_builds_the_same_seeded_weights_as_its_module(dataset):
    by_module = model_for(small(dataset, model=MODULE_MODEL), seed=3).state_dict()
    by_file = model_for(small(dataset, model=FILE_MODEL), seed=3).state_dict()
    again = model_for(small(dataset, model=FILE_MODEL), seed=3).state_dict()
    other = model_for(small(dataset, model=FILE_MODEL), seed=4).state_dict()
    assert all(torch.equal(by_module[k], by_file[k]) for k in by_module)
    assert all(torch.equal(by_file[k], again[k]) for k in by_file)
    assert not all(torch.equal(by_file[k], other[k]) for k in by_file)


def test_batchnorm_is_refused_before_training_in_one_line(dataset):
    cfg = small(dataset, model="tests.byo_models:build_batchnorm")
    for check in (lambda: check_model(cfg), lambda: preflight(cfg, 2)):
        with pytest.raises(ModelError) as err:
            check()
        message = one_line(err)
        for words in ("BatchNorm2d", "'1'", "GroupNorm", "LayerNorm", "ModuleValidator.fix"):
            assert words in message, message
    check_model(small(dataset, model="tests.byo_models:build_batchnorm", eps=float("inf")))


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("nope.nets:build", ["model='nope.nets:build'", "cannot import nope.nets", "cnn, mlp"]),
        ("tests.byo_models:nope", ["has no attribute 'nope'", "package.module:callable"]),
        ("tests.byo_models:not_a_model", ["returned a str, not a torch.nn.Module"]),
        ("/no/such/nets.py:build", ["no such file /no/such/nets.py", "file.py:callable"]),
        ("tests.byo_models:build_ten_classes", ["gives (2, 10)", "(2, 3), one per class"]),
        ("cnn", ["does not fit", "(2, 3, 8, 8)", "(N, 3, 8, 8)"]),
    ],
)
def test_a_model_that_cannot_be_built_or_fit_is_one_line(dataset, model, words):
    with pytest.raises(ModelError) as err:
        check_model(small(dataset, model=model))
    message = one_line(err)
    assert all(w in message for w in words), message


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"model": "resnet"}, ["model='resnet' is not valid", "cnn, mlp", "module:callable"]),
        ({"model": "nets.build"}, ["model='nets.build'", "/absolute/path/file.py:callable"]),
        ({"dataset": "npz:data.npz"}, ["dataset='npz:data.npz'", "npz:/absolute/path"]),
        ({"dataset": "npz:/d.npz", "data-dir": "/x"}, ["data-dir is not valid", "data-dir=''"]),
        ({"dataset": "npz:/d.npz", "audit-canaries": 2}, ["audit-canaries=0"]),
    ],
)
def test_bad_model_and_dataset_names_are_one_config_line(raw, words):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(raw)
    message = one_line(err)
    assert all(w in message for w in words), message


def _not_a_zip(path):
    path.write_bytes(b"not a zip at all")


def _missing_array(path):
    np.savez(path, x_train=np.zeros((4, 2, 2), np.uint8), y_train=np.zeros(4, int))


def _labels_wrong_length(path):
    x = np.zeros((4, 2, 2), np.uint8)
    np.savez(path, x_train=x, y_train=np.arange(3), x_test=x, y_test=np.arange(4) % 2)


def _shapes_differ(path):
    y = np.arange(4) % 2
    np.savez(path, x_train=np.zeros((4, 2, 2), np.uint8), y_train=y,
             x_test=np.zeros((4, 3, 3), np.uint8), y_test=y)  # fmt: skip


@pytest.mark.parametrize(
    ("write", "words"),
    [
        (_not_a_zip, ["is not a readable .npz file"]),
        (_missing_array, ["no array(s) x_test, y_test", "holds x_train, y_train"]),
        (_labels_wrong_length, ["y_train has shape (3,), x_train 4 images"]),
        (_shapes_differ, ["x_test images are (3, 3), x_train's (2, 2)"]),
        (None, ["no such file"]),
    ],
)
def test_a_malformed_dataset_file_is_one_line_saying_what_is_valid(tmp_path, write, words):
    path = tmp_path / "bad.npz"
    if write:
        write(path)
    with pytest.raises(DatasetFileError) as err:
        preflight(small(f"npz:{path}"), 2)
    message = one_line(err)
    assert all(w in message for w in [*words, "x_train, x_test", "labels 0..K-1"]), message


def test_the_fast_path_fallback_is_said_once(dataset, caplog):
    cfg = small(dataset, model="tests.byo_models:build_layernorm", num_server_rounds=3)
    weights, ledger = model_for(cfg, seed=cfg.seed).state_dict(), None
    with caplog.at_level(logging.WARNING, logger="flower_app.train"):
        for server_round in (1, 2):
            out = local_round(
                cfg, partition_id=0, num_partitions=2, weights=weights, ledger=ledger,
                server_round=server_round,
            )  # fmt: skip
            weights, ledger = out.state_dict, out.ledger
    said = [r.getMessage() for r in caplog.records if "does not cover" in r.getMessage()]
    assert len(said) == 1 and "LayerNorm" in said[0] and "Opacus hooks" in said[0], said
