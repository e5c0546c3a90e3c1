import gzip

import numpy as np
import pytest

from flower_app import data
from flower_app.data import DatasetMissing, load_arrays, read_idx


def write_idx(path, array, gz=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def make_idx_folder(folder, n_train=30, n_test=10, gz=False):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", x, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", y, gz)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips(tmp_path, gz):
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    path = tmp_path / ("x.gz" if gz else "x")
    write_idx(path, x, gz)
    np.testing.assert_array_equal(read_idx(path), x)


def test_read_idx_rejects_truncated_files(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_data_dir_loads_user_idx_files(tmp_path):
    made = make_idx_folder(tmp_path / "mnist", gz=True)
    arrays = load_arrays("mnist", str(tmp_path / "mnist"))
    np.testing.assert_array_equal(arrays.x_train, made["train"][0])
    assert arrays.y_test.dtype == np.int64 and len(arrays.y_test) == 10


def test_missing_data_dir_says_which_files_are_expected(tmp_path):
    with pytest.raises(DatasetMissing, match="train-images-idx3-ubyte") as info:
        load_arrays("mnist", str(tmp_path / "nowhere"))
    assert "\n" not in str(info.value)


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    load_arrays.cache_clear()
    try:
        with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
            load_arrays("fashion-mnist", "")
    finally:
        load_arrays.cache_clear()


def test_mnist_offline_without_files_fails_saying_exactly_that(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MNIST_CACHE_DIR", tmp_path / "cache")

    class OfflineMNIST:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", OfflineMNIST)
    load_arrays.cache_clear()
    try:
        with pytest.raises(DatasetMissing) as info:
            load_arrays("mnist", "")
    finally:
        load_arrays.cache_clear()
    message = str(info.value)
    assert "offline" in message and "data-dir=" in message and "\n" not in message


def test_fashion_mnist_from_the_debian_package_is_the_default():
    arrays = load_arrays("fashion-mnist", "")
    assert arrays.x_train.shape == (60000, 28, 28)
    assert arrays.x_test.shape == (10000, 28, 28)
    assert set(np.unique(arrays.y_train)) == set(range(10))
