"""Models the command-line tests name as MODEL, e.g. ``tests.cli_factories:tiny_convnet``."""

from __future__ import annotations

import torch
from torch import nn


def tiny_convnet() -> nn.Module:
    """Two convolutions (8 and 6 channels) and a linear head, for inputs (1, 3, H, W)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


def not_a_model() -> int:
    """A callable that returns no module: MODEL resolution must refuse it."""
    return 42
