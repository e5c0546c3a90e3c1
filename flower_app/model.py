"""Models small enough for DP-SGD on a CPU, and built only from layers Opacus supports."""

from __future__ import annotations

import torch
from torch import nn

from flower_app.config import GRAD_SAMPLE_MODES as GRAD_SAMPLE_MODES  # tests/e2e read it here
from flower_app.data import NUM_CLASSES


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


def build_model(name: str, seed: int | None = None) -> nn.Module:
    """A fresh model; seeded so every strategy starts from the same weights."""
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name]()
