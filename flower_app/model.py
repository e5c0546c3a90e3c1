"""Models small enough for DP-SGD on a CPU, and built only from layers Opacus supports.

Run-config `model` is `cnn` or `mlp` (below), or a model of one's own: a callable named by
import path (`"package.module:build"`) or by file (`"/abs/path/nets.py:build"`) that returns
an `nn.Module` mapping a float batch (N, C, H, W) to logits (N, num_classes). It is called
with the keyword arguments its signature names of `num_classes` (int) and `input_shape`
((C, H, W)), both taken from the run's dataset (`data.dataset_shape`), after
`torch.manual_seed(seed)`, so every strategy starts from the same weights. `check_model` builds
it once before training and refuses, in one line, a model that cannot be imported, does
not fit the data, or holds a layer Opacus cannot train with DP-SGD (e.g. BatchNorm).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from functools import lru_cache
from types import ModuleType

import torch
from torch import nn

from flower_app.config import GRAD_SAMPLE_MODES as GRAD_SAMPLE_MODES  # tests/e2e read it here
from flower_app.config import MODEL_HELP, ConfigError, RunConfig, is_builtin_model
from flower_app.data import NUM_CLASSES, dataset_shape


class CNN(nn.Module):
    """Two strided 3x3 conv blocks with GroupNorm (Opacus rejects BatchNorm: it mixes samples).

    Sized for DP-SGD on one CPU thread. Stride-2 convolutions instead of max-pooling made a
    DP epoch about 3x faster here for under one point of accuracy; a wider 5x5 net was 4x
    slower again for a few points that DP noise erases anyway.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        """Build the layers."""
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, stride=2, padding=1),  # 28x28 -> 14x14
            nn.GroupNorm(4, 8),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1),  # 14x14 -> 7x7
            nn.GroupNorm(4, 16),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of (N, 1, 28, 28) images."""
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """The reference tutorial's 784-256-128-10 MLP."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        """Build the layers."""
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of (N, 1, 28, 28) images."""
        return self.net(x)


MODELS: dict[str, type[nn.Module]] = {"cnn": CNN, "mlp": MLP}


class ModelError(ConfigError):
    """The run's model cannot be built or trained: one line naming it and what is valid."""


def build_model(
    name: str, seed: int | None = None, *, dataset: str = "fashion-mnist", data_dir: str = ""
) -> nn.Module:
    """A fresh model for `dataset`'s images; seeded so every strategy starts alike."""
    input_shape, num_classes = dataset_shape(dataset, data_dir)
    build = model_builder(name)
    if seed is not None:
        torch.manual_seed(seed)
    if is_builtin_model(name):
        return build(num_classes)
    try:
        params = inspect.signature(build).parameters
    except (TypeError, ValueError):  # no signature to read (a C callable): pass nothing
        params = {}  # type: ignore[assignment]
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {"num_classes": num_classes, "input_shape": input_shape}
    kwargs = {k: v for k, v in given.items() if takes_all or k in params}
    try:
        model = build(**kwargs)
    except Exception as err:  # the user's code: its failure is one line, not a traceback
        called = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ModelError(
            f"model={name!r}: calling it with ({called}) raised {_brief(err)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model={name!r} returned a {type(model).__name__}, not a torch.nn.Module; "
            f"expected {MODEL_HELP} returning one"
        )
    return model


def model_for(cfg: RunConfig, seed: int | None = None) -> nn.Module:
    """The run's model (`model`) for the run's dataset (`dataset`, `data-dir`)."""
    return build_model(cfg.model, seed, dataset=cfg.dataset, data_dir=cfg.data_dir)


@lru_cache(maxsize=8)
def model_builder(name: str) -> Callable[..., nn.Module]:
    """The callable `model` names: a built-in class, or imported (once per process)."""
    if is_builtin_model(name):
        return MODELS[name]
    where, _, attr = name.rpartition(":")
    found: object = _import_file(name, where) if where.endswith(".py") else _import(name, where)
    for part in attr.split("."):
        if not hasattr(found, part):
            raise ModelError(
                f"model={name!r}: {where} has no attribute {attr!r}; expected {MODEL_HELP}"
            )
        found = getattr(found, part)
    if not callable(found):
        raise ModelError(f"model={name!r}: {attr} is not callable; expected {MODEL_HELP}")
    return found  # type: ignore[return-value]


def _import(name: str, module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ModelError(
            f"model={name!r}: cannot import {module} ({err}); expected {MODEL_HELP}"
        ) from None
    except Exception as err:  # the user's module failed while importing
        raise ModelError(f"model={name!r}: importing {module} raised {_brief(err)}") from None


def _import_file(name: str, path: str) -> ModuleType:
    """Import a model file by path, under a name of its own (so two files never clash)."""
    module_name = "fdg_model_" + hashlib.sha256(path.encode()).hexdigest()[:16]
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise ModelError(f"model={name!r}: no such file {path}; expected {MODEL_HELP}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise ModelError(f"model={name!r}: importing {path} raised {_brief(err)}") from None
    return module


def _brief(err: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= 200 else text[:200] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def check_model(cfg: RunConfig) -> None:
    """Build the run's model once before training; `ModelError` (one line) if it cannot train.

    Importable and an `nn.Module`; maps a batch of the dataset's images to one logit per
    class; and, when Opacus trains it (a finite `eps` with dp-mode=sample), every layer one
    Opacus supports. The global torch RNG is left as it was.
    """
    shape, classes = dataset_shape(cfg.dataset, cfg.data_dir)
    with torch.random.fork_rng():
        model = model_for(cfg, seed=cfg.seed)
        _check_logits(cfg, model, shape, classes)
    if cfg.private and cfg.dp_mode == "sample":
        _check_opacus(cfg.model, model)


def _check_logits(
    cfg: RunConfig, model: nn.Module, shape: tuple[int, int, int], classes: int
) -> None:
    batch = (2, *shape)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(batch))
    except Exception as err:
        raise ModelError(
            f"model={cfg.model!r} does not fit dataset={cfg.dataset!r}: a batch of shape "
            f"{batch} raised {_brief(err)}; expected a model taking (N, C, H, W) = "
            f"(N, {', '.join(map(str, shape))}) images"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model={cfg.model!r} gives {got} for a batch of shape {batch}; expected logits "
            f"of shape (2, {classes}), one per class of dataset={cfg.dataset!r}"
        )


def _check_opacus(name: str, model: nn.Module) -> None:
    """Refuse a layer Opacus cannot give per-example gradients for (its `ModuleValidator`)."""
    from opacus.validators import ModuleValidator  # Opacus: only when a run is checked

    model.train()
    for layer_name, layer in model.named_modules():
        check = ModuleValidator.VALIDATORS.get(type(layer))
        if check and (errors := check(layer)):
            reason = str(errors[0]).split(". ")[0]
            raise ModelError(
                f"model={name!r} cannot train with DP-SGD: layer {layer_name!r} is a "
                f"{type(layer).__name__} ({reason}); valid: layers Opacus supports, e.g. "
                "GroupNorm or LayerNorm instead of BatchNorm, opacus.layers.DPLSTM instead of "
                "LSTM (or return opacus.validators.ModuleValidator.fix(model)), or eps=inf or "
                "dp-mode=update, which need no per-example gradients"
            )
    if errors := ModuleValidator.validate(model, strict=False):
        raise ModelError(f"model={name!r} cannot train with DP-SGD: {_brief(errors[0])}")
