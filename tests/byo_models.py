"""Models of one's own for the tests, named in a run config as `tests.byo_models:<name>`.

Shipped in the app's FAB (only `test_*.py` files are left out), so a ServerApp and
ClientApps that run from the staged app import them too.
"""

import math

from torch import nn


def build(num_classes, input_shape):
    """A tiny conv net sized from the data: every layer on the DP fast path."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 4, kernel_size=3, stride=2, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * math.ceil(height / 2) * math.ceil(width / 2), num_classes),
    )


def build_layernorm(**shape):
    """LayerNorm is private but not on the fast path: training falls back to Opacus hooks."""
    channels, height, width = shape["input_shape"]
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * height * width, 16),
        nn.LayerNorm(16),
        nn.ReLU(),
        nn.Linear(16, shape["num_classes"]),
    )


def build_batchnorm(num_classes, input_shape):
    """BatchNorm mixes the examples of a batch: Opacus cannot train it with DP-SGD."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 4, kernel_size=3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * height * width, num_classes),
    )


def build_ten_classes(input_shape):
    """Ignores the dataset's classes: its logits do not fit a 3-class dataset."""
    channels, height, width = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, 10))


def not_a_model():
    return "a string"
