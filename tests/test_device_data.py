"""A device trains on its own files (node config data-dir), whole, never cut."""

import gzip

import numpy as np
import pytest
import torch

from flower_app.config import RunConfig
from flower_app.data import DeviceDataError, load_device_data
from flower_app.model import build_model
from flower_app.node import serve_train
from flower_app.policy import NodePolicy
from flower_app.shards import canary_set, shard_for
from tests.test_node_policy import MemoryStore


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def write_idx(folder, x, y, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr, dims in (
        ("train-images-idx3-ubyte", x, x.shape),
        ("train-labels-idx1-ubyte", y.astype(np.uint8), y.shape),
    ):
        raw = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
        raw += arr.tobytes()
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)


def test_a_npz_and_an_idx_folder_are_read_whole(tmp_path):
    x, y = images(37)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    got_x, got_y = load_device_data(str(tmp_path / "mine.npz"))
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y) and got_y.dtype == np.int64
    np.savez(tmp_path / "flat.npz", x=x.reshape(37, -1), y=y)
    assert np.array_equal(load_device_data(str(tmp_path / "flat.npz"))[0], x)
    write_idx(tmp_path / "idx", x, y, gz=True)
    got_x, got_y = load_device_data(str(tmp_path / "idx"))
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "no train-images-idx3-ubyte and train-labels-idx1-ubyte"),
        (lambda p: p.write_bytes(b"not a zip"), "is not a readable .npz file"),
        (lambda p: np.savez(open(p, "wb"), images=images(3)[0]), "expected x and y"),
        (lambda p: np.savez(open(p, "wb"), x=images(3)[0][:, :5], y=images(3)[1]), "shape"),
        (lambda p: np.savez(open(p, "wb"), x=images(3)[0] * 1.0, y=images(3)[1]), "uint8"),
        (lambda p: np.savez(open(p, "wb"), x=images(3)[0], y=images(4)[1]), "one label per image"),
        (lambda p: np.savez(open(p, "wb"), x=images(3)[0], y=np.array([0, 1, 12])), "0..9"),
    ],
)
def test_bad_own_data_is_one_line_naming_the_path(tmp_path, make, message):
    path = tmp_path / "data"
    make(path)
    with pytest.raises(DeviceDataError, match=message) as err:
        load_device_data(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_own_data_is_the_whole_training_set_whatever_the_partitioner(tmp_path):
    x, y = images(150, seed=3)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    cfg = RunConfig(samples_per_node=20, partitioner="shards", validation_samples=5000)
    mine = shard_for(cfg, 1, 3, str(tmp_path / "d.npz"))
    assert len(mine) == 150  # no cap, no partition, no validation carve-out
    assert torch.equal(mine.tensors[1], torch.from_numpy(y.astype(np.int64)))
    # partition-id stays the node's identity: another id, the same data.
    assert torch.equal(shard_for(cfg, 2, 3, str(tmp_path / "d.npz")).tensors[0], mine.tensors[0])


def test_a_device_in_an_audit_trains_on_its_own_data_plus_exactly_its_included_canaries(
    tmp_path,
):
    x, y = images(150, seed=3)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    cfg = RunConfig(audit_canaries=30, audit_seed=5)
    canaries, canary_images = canary_set(cfg, 3)
    for pid in range(3):
        got = shard_for(cfg, pid, 3, str(tmp_path / "d.npz"))
        mine = canaries.of(pid)
        assert len(got) == 150 + len(mine)
        assert torch.equal(got.tensors[0][150:], canary_images.tensors[0][mine])
        assert torch.equal(got.tensors[1][150:], canary_images.tensors[1][mine])


def test_a_node_trains_on_its_own_data_and_plans_for_its_size(tmp_path):
    x, y = images(96, seed=4)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    cfg = RunConfig(eps=4.0, num_server_rounds=2, batch_size=32, model="mlp", delta=1e-3)
    out = serve_train(
        cfg,
        NodePolicy(),
        MemoryStore(),
        run_id="r",
        partition_id=0,
        num_partitions=3,
        weights=build_model("mlp", seed=7).state_dict(),
        server_round=1,
        own_data=str(tmp_path / "d.npz"),
    )
    assert out.num_examples == 96 and out.round_steps == 3 and out.ledger.planned_steps == 6
