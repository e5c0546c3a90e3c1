import numpy as np
import pytest

from flower_app import partition
from flower_app.config import ConfigError
from flower_app.partition import label_histogram, partition_indices


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test computes partitions for real, in an empty disk cache."""
    monkeypatch.setattr(partition, "CACHE_DIR", tmp_path / "partitions")
    partition._partition_indices_cached.cache_clear()
    yield tmp_path / "partitions"
    partition._partition_indices_cached.cache_clear()


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 10, size=6000).astype(np.int64)


@pytest.mark.parametrize("name", ["dirichlet", "iid", "shards"])
def test_partitions_are_deterministic_and_disjoint(labels, name):
    a = partition_indices(labels, name, 10, seed=7, alpha=0.5)
    b = partition_indices(labels, name, 10, seed=7, alpha=0.5)
    assert len(a) == 10
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    flat = np.concatenate(a)
    assert len(flat) == len(np.unique(flat)), "a sample landed in two partitions"
    assert all(len(p) >= 10 for p in a)
    c = partition_indices(labels, name, 10, seed=8, alpha=0.5)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _mean_max_class_share(labels, parts):
    shares = []
    for p in parts:
        h = label_histogram(labels, p)
        shares.append(h.max() / h.sum())
    return float(np.mean(shares))


def test_label_skew_grows_as_alpha_shrinks(labels):
    skew = [
        _mean_max_class_share(labels, partition_indices(labels, "dirichlet", 10, seed=7, alpha=a))
        for a in (100.0, 1.0, 0.1)
    ]
    assert skew[0] < skew[1] < skew[2]
    iid = _mean_max_class_share(labels, partition_indices(labels, "iid", 10, seed=7))
    assert iid < 0.15  # ten balanced classes: about 0.1 each


def test_shards_give_each_node_few_labels():
    labels = np.repeat(np.arange(10), 600).astype(np.int64)  # sorted, 600 per class
    parts = partition_indices(labels, "shards", 20, seed=7, shards_per_node=2)
    for p in parts:
        assert len(p) == 300
        assert np.count_nonzero(label_histogram(labels, p)) <= 2


def test_too_many_nodes_for_the_data_fails_clearly():
    with pytest.raises(ConfigError, match="cannot be split into 50 partitions"):
        partition_indices(np.zeros(100, dtype=np.int64), "iid", 50, seed=1)


def test_disk_cache_returns_the_same_partitions_and_survives_corruption(labels, fresh_cache):
    first = partition_indices(labels, "dirichlet", 10, seed=3, alpha=0.5)
    files = list(fresh_cache.glob("*.npz"))
    assert len(files) == 1
    partition._partition_indices_cached.cache_clear()
    cached = partition_indices(labels, "dirichlet", 10, seed=3, alpha=0.5)
    for x, y in zip(first, cached, strict=True):
        np.testing.assert_array_equal(x, y)
    files[0].write_bytes(b"garbage")
    partition._partition_indices_cached.cache_clear()
    again = partition_indices(labels, "dirichlet", 10, seed=3, alpha=0.5)
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, y)
    other = partition_indices(labels, "dirichlet", 10, seed=4, alpha=0.5)
    assert len(list(fresh_cache.glob("*.npz"))) == 2
    assert any(not np.array_equal(x, y) for x, y in zip(first, other, strict=True))
