"""Small models for the tests, importable as ``nets:...`` by config ``target`` (tests/ is on the path)."""

from __future__ import annotations

import torch
from torch import nn


def small_mlp(d_in: int = 6, width: int = 8, o: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, o))


class ConvBN(nn.Module):
    """A small conv net with BatchNorm (eval mode: running stats) and one frozen parameter."""

    def __init__(self, channels: int = 3, o: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, o)
        self.conv2.bias.requires_grad_(False)  # a frozen parameter: held fixed, not in the NTK
        with torch.no_grad():  # non-trivial running statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.tanh(self.conv2(h))
        return self.head(h.flatten(1))


def not_a_module() -> int:
    return 3


NOT_CALLABLE = 42
