"""Reference models shipped with fedflock (usable as ``model_export.models:digits_cnn``)."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits (input ``[N, 1, 8, 8]``, ~6k parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))  # [N, 16, 4, 4]
        x = self.pool(self.relu(self.bn2(self.conv2(x))))  # [N, 32, 2, 2]
        return self.fc(self.flatten(x))


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """Factory for :class:`DigitsCNN`, for ``load_factory("model_export.models:digits_cnn")``."""
    return DigitsCNN(num_classes)
