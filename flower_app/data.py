"""Image data, offline first: loading idx files, partitioning across nodes, tensors.

Everything expensive is cached per process, so a simulation worker loads and partitions the
data once per run, not once per round.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from flower_app.config import FILE_DATASET_PREFIX, is_file_dataset

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_CACHE_DIR = Path.home() / ".cache" / "flower-dp-gossip"
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Per-dataset pixel mean and std, for normalisation.
NORMALISATION = {"fashion-mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}
NUM_CLASSES = 10
# A run's own data set: `dataset="npz:/absolute/path/data.npz"` (`load_npz_dataset`).
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# What the built-in datasets hold: (channels, height, width) images of NUM_CLASSES classes.
BUILTIN_SHAPE = (1, 28, 28)
# The validation split's own seed: the split is the same for every run seed, so tuning runs
# and final runs (of any seed) train on the same examples and never on the validation set.
VALIDATION_SEED = 0x5A11D


class DatasetMissing(FileNotFoundError):
    """The dataset's files are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class Arrays:
    """A dataset as numpy arrays: images (N, H, W) or (N, C, H, W), int64 labels (N,).

    The built-in datasets hold uint8 images (N, 28, 28); a file dataset (`npz:`) uint8 or
    float images of any size.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (optionally gzipped) into a numpy array.

    Hand-written because torchvision's reader wants its own folder layout and no gzip.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected shape {shape}")
    return data.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_folder(folder: Path) -> Arrays | None:
    """All four idx files from one folder, or None when any is missing."""
    found = {
        split: tuple(_find_idx(folder, stem) for stem in stems)
        for split, stems in IDX_STEMS.items()
    }
    if any(p is None for paths in found.values() for p in paths):
        return None
    (xtr, ytr), (xte, yte) = (
        tuple(read_idx(p) for p in found[split]) for split in ("train", "test")
    )
    return Arrays(xtr, ytr.astype(np.int64), xte, yte.astype(np.int64))


def _idx_help(folder: Path | str) -> str:
    names = ", ".join(s for stems in IDX_STEMS.values() for s in stems)
    return f"expected the idx files {names} (optionally .gz) in {folder}"


def _load_mnist_online() -> Arrays:
    from torchvision.datasets import MNIST  # local import: only this path needs it

    try:
        train = MNIST(str(MNIST_CACHE_DIR), train=True, download=True)
        test = MNIST(str(MNIST_CACHE_DIR), train=False, download=True)
    except Exception as err:  # torchvision raises plain RuntimeError/URLError offline
        raise DatasetMissing(
            "dataset=mnist is not available: this machine is offline and torchvision could "
            f"not download it ({type(err).__name__}); pass data-dir=/path/to/mnist-idx with "
            f"MNIST's four idx files, or use dataset=fashion-mnist"
        ) from None
    return Arrays(
        train.data.numpy(),
        train.targets.numpy().astype(np.int64),
        test.data.numpy(),
        test.targets.numpy().astype(np.int64),
    )


@lru_cache(maxsize=2)
def load_arrays(dataset: str, data_dir: str = "") -> Arrays:
    """Load a dataset's train and test arrays (cached per process).

    Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` unless `data_dir`
    names another folder; MNIST comes from `data_dir`, else through torchvision when online.
    `npz:/path/data.npz` is a file dataset (`load_npz_dataset`).
    """
    if is_file_dataset(dataset):
        return load_npz_dataset(dataset.removeprefix(FILE_DATASET_PREFIX))
    if data_dir:
        folder = Path(data_dir).expanduser()
        arrays = _read_idx_folder(folder) or _read_idx_folder(folder / "raw")
        if arrays is None:
            raise DatasetMissing(f"dataset={dataset}: {_idx_help(folder)}")
        return arrays
    if dataset == "fashion-mnist":
        arrays = _read_idx_folder(FASHION_MNIST_DIR)
        if arrays is None:
            raise DatasetMissing(
                f"dataset=fashion-mnist not found in {FASHION_MNIST_DIR}: install it with "
                "`apt-get install dataset-fashion-mnist` (or run scripts/setup), "
                "or pass data-dir=/path/to/idx-files"
            )
        return arrays
    if dataset == "mnist":
        cached = _read_idx_folder(MNIST_CACHE_DIR / "MNIST" / "raw")
        return cached if cached is not None else _load_mnist_online()
    raise DatasetMissing(f"unknown dataset {dataset!r}")


class DatasetFileError(DatasetMissing):
    """A file dataset (`npz:`) that is missing or malformed: one line naming what is wrong."""


NPZ_HELP = (
    "expected a .npz file with arrays x_train, x_test (uint8 pixels or floats, shape "
    "(N, H, W) or (N, C, H, W), the same image shape in both) and y_train, y_test (integer "
    "labels 0..K-1, one per image)"
)


@lru_cache(maxsize=2)
def load_npz_dataset(path: str) -> Arrays:
    """A run's own dataset from one .npz file (`dataset="npz:/absolute/path/data.npz"`).

    Arrays `x_train`, `y_train`, `x_test`, `y_test`; the image shape and the number of
    classes come from them (`dataset_shape`). Read with `allow_pickle=False`: a data file
    never runs code.
    """
    where = Path(path).expanduser()
    try:
        with np.load(where, allow_pickle=False) as stored:
            held = sorted(stored.files)
            arrays = [stored[k] for k in NPZ_ARRAYS if k in held]
    except FileNotFoundError:
        raise DatasetFileError(f"dataset=npz:{path}: no such file; {NPZ_HELP}") from None
    except (OSError, ValueError, EOFError) as err:  # not a zip, truncated, pickled objects
        raise DatasetFileError(
            f"dataset=npz:{path} is not a readable .npz file ({type(err).__name__}); {NPZ_HELP}"
        ) from None
    if missing := [k for k in NPZ_ARRAYS if k not in held]:
        raise DatasetFileError(
            f"dataset=npz:{path}: no array(s) {', '.join(missing)} in it (it holds "
            f"{', '.join(held) or 'none'}); {NPZ_HELP}"
        )
    return _checked_dataset(path, *arrays)


def _checked_dataset(
    path: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> Arrays:
    """The four arrays as `Arrays`, or `DatasetFileError` naming the first thing wrong."""
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        problem = _npz_problem(name, x, y)
        if problem is None and x.shape[1:] != x_train.shape[1:]:
            problem = f"x_test images are {x.shape[1:]}, x_train's {x_train.shape[1:]}"
        if problem:
            raise DatasetFileError(f"dataset=npz:{path}: {problem}; {NPZ_HELP}")
    return Arrays(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


def _npz_problem(name: str, x: np.ndarray, y: np.ndarray) -> str | None:
    """What is wrong with one split's images `x` and labels `y`, or None."""
    if x.ndim not in (3, 4) or len(x) == 0 or 0 in x.shape:
        return f"x_{name} has shape {x.shape}"
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        return f"x_{name} has dtype {x.dtype}"
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        return f"x_{name} holds NaN or infinite values"
    if y.shape != (len(x),):
        return f"y_{name} has shape {y.shape}, x_{name} {len(x)} images"
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        return f"y_{name} is not non-negative integers (dtype {y.dtype})"
    if name == "train" and len(np.unique(y)) < 2:
        return "y_train holds fewer than 2 classes"
    return None


class BatchTensorDataset(TensorDataset):
    """A TensorDataset that hands a DataLoader a whole batch with one indexing operation.

    The default fetch indexes sample by sample and stacks, which costs more than training
    the small models here. Use with `collate_fn=keep_batch`.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """The batch at `indices` (empty indices give empty tensors of the right shape)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[idx] for t in self.tensors)


def keep_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Collate function for `BatchTensorDataset`: the batch is already stacked."""
    return batch


def to_tensors(
    dataset: str, x: np.ndarray, y: np.ndarray, normalize: str = "mean-std"
) -> BatchTensorDataset:
    """Float images (N, C, H, W) (a channel added to (N, H, W)) and labels, all in memory.

    uint8 pixels are scaled to [0, 1], float ones kept. `normalize="mean-std"` then
    standardises with the dataset's pixel mean and std (`pixel_stats`); `"none"` keeps them,
    as torchvision's `ToTensor` alone gives.
    """
    mean, std = pixel_stats(dataset) if normalize == "mean-std" else (0.0, 1.0)
    images = torch.from_numpy(x.astype(np.float32))
    if x.dtype == np.uint8:
        images = images / 255.0
    images = (images - mean) / std
    return BatchTensorDataset(
        images.unsqueeze(1) if images.dim() == 3 else images, torch.from_numpy(y)
    )


def pixel_stats(dataset: str) -> tuple[float, float]:
    """The dataset's pixel mean and std: fixed for the built-ins, else from its training set."""
    if dataset in NORMALISATION:
        return NORMALISATION[dataset]
    return _file_stats(dataset)


@lru_cache(maxsize=2)
def _file_stats(dataset: str) -> tuple[float, float]:
    x = load_arrays(dataset).x_train.astype(np.float64)
    x = x / 255.0 if load_arrays(dataset).x_train.dtype == np.uint8 else x
    return float(x.mean()), float(x.std()) or 1.0


def dataset_shape(dataset: str, data_dir: str = "") -> tuple[tuple[int, int, int], int]:
    """((channels, height, width), number of classes) of the images a model gets.

    The built-ins are known without loading them; a file dataset says so itself (the
    classes are 0 .. the largest label).
    """
    if not is_file_dataset(dataset):
        return BUILTIN_SHAPE, NUM_CLASSES
    arrays = load_arrays(dataset, data_dir)
    shape = arrays.x_train.shape[1:]
    chw = (1, *shape) if len(shape) == 2 else shape
    classes = max(int(arrays.y_train.max()), int(arrays.y_test.max())) + 1
    return (int(chw[0]), int(chw[1]), int(chw[2])), classes


def cap(indices: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """A seeded random subset of at most `limit` indices (0 = keep all), order kept."""
    if limit <= 0 or limit >= len(indices):
        return indices
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(indices, size=limit, replace=False))


def validation_split(num_train: int, validation_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) of a training set of `num_train` examples.

    `validation_samples` examples chosen at random with the fixed `VALIDATION_SEED` are
    held out; the rest (sorted) is what partitioning sees. 0 holds out nothing.
    """
    if not 0 <= validation_samples < num_train:
        raise ValueError(
            f"validation-samples={validation_samples} is not valid for a training set of "
            f"{num_train}; expected 0 to {num_train - 1}"
        )
    order = np.random.default_rng(VALIDATION_SEED).permutation(num_train)
    held = np.sort(order[:validation_samples])
    return np.sort(order[validation_samples:]), held


def evaluation_sets(
    arrays: Arrays,
    *,
    evaluate_on: str,
    validation_samples: int,
    test_samples: int,
    node_eval_samples: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, central indices, per-node-model indices) of the evaluation set.

    `evaluate_on="test"`: the test set capped at `test_samples`; `"validation"`: the
    validation split carved off the training set. The per-node subset is a fixed cap of the
    central one: the server scores open-relay node models on it, sealed nodes themselves.
    """
    _, held = validation_split(len(arrays.y_train), validation_samples)
    if evaluate_on == "validation":
        x, y, idx = arrays.x_train, arrays.y_train, held
    else:
        x, y = arrays.x_test, arrays.y_test
        idx = cap(np.arange(len(y)), test_samples, seed)
    return x, y, idx, cap(idx, node_eval_samples, seed + 1)


class DeviceDataError(ValueError):
    """A device's own training files are missing or malformed: one line naming the path."""


def load_device_data(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A device's own training set: images (N, 28, 28) uint8 and labels (N,) int64.

    `path` is a `.npz` file with arrays `x` (N×28×28 or N×784, uint8 pixels) and `y` (N
    labels in 0..9), or a folder with the two training idx files (optionally .gz; the test
    files are not needed). All of it is the node's data: nothing is cut from it.
    """
    where = Path(path).expanduser()
    if where.suffix == ".npz" or where.is_file():
        x, y = _read_npz(where)
    elif where.is_dir():
        found = [_find_idx(where, stem) for stem in IDX_STEMS["train"]]
        if any(f is None for f in found):
            raise DeviceDataError(
                f"{where}: no {' and '.join(IDX_STEMS['train'])} (optionally .gz) in it; "
                "expected those two idx files or a .npz file with arrays x and y"
            )
        try:
            x, y = (read_idx(f) for f in found)  # type: ignore[arg-type]
        except ValueError as err:
            raise DeviceDataError(f"{where}: {err}") from None
    else:
        raise DeviceDataError(
            f"{where} does not exist; expected a .npz file with arrays x and y, or a folder "
            "with the training idx files"
        )
    return _checked(where, x, y)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as stored:
            if "x" not in stored or "y" not in stored:
                raise DeviceDataError(
                    f"{path}: holds arrays {sorted(stored.files)}; expected x and y"
                )
            return stored["x"], stored["y"]
    except FileNotFoundError:
        raise DeviceDataError(f"{path} does not exist") from None
    except (OSError, ValueError) as err:
        raise DeviceDataError(f"{path} is not a readable .npz file ({err})") from None


def _checked(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) == 0:
        raise DeviceDataError(f"{path}: holds no examples")
    if x.ndim == 2 and x.shape[1] == 28 * 28:
        x = x.reshape(-1, 28, 28)
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DeviceDataError(f"{path}: x has shape {x.shape}; expected (N, 28, 28) or (N, 784)")
    if x.dtype != np.uint8:
        raise DeviceDataError(f"{path}: x has dtype {x.dtype}; expected uint8 pixels 0..255")
    if y.ndim != 1 or len(y) != len(x):
        raise DeviceDataError(
            f"{path}: y has shape {y.shape}; expected ({len(x)},), one label per image"
        )
    if (
        not np.issubdtype(y.dtype, np.integer)
        or len(y)
        and not 0 <= y.min() <= y.max() < NUM_CLASSES
    ):
        raise DeviceDataError(f"{path}: labels must be integers in 0..{NUM_CLASSES - 1}")
    return x, y.astype(np.int64)
