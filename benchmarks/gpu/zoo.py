"""Real models for the GPU check's configs (``model.target: zoo:resnet18_cifar``, found in this folder, the
configs' own) and for ``benchmarks/bench_models.py``: one definition of each.

    from zoo import resnet18_cifar          # with benchmarks/gpu on sys.path
    net = resnet18_cifar()                   # 11,173,962 parameters; input (3, 32, 32), 10 logits
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout with the CIFAR stem (3x3 conv, stride 1, no max-pool), 10 classes:
    the model of the largest public whole-dataset eNTK run (github.com/aw31/empirical-ntks)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


def resnet18_cifar(classes: int = 10) -> nn.Module:
    return ResNet18(classes)


def vit_small(image_size: int = 32, patch_size: int = 4, width: int = 256, layers: int = 4, heads: int = 4,
              classes: int = 10) -> nn.Module:
    """A small Vision Transformer (Hugging Face's ViT, built from a config: nothing is downloaded); take its
    ``logits`` (``model.output: logits``). Defaults: 65 tokens of width 256, 4 layers, ~3.2M parameters."""
    import transformers as tf

    return tf.ViTForImageClassification(tf.ViTConfig(
        image_size=image_size, patch_size=patch_size, num_channels=3, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=4 * width, num_labels=classes))
