"""nn.Conv1d and nn.Conv2d (groups = 1, zero padding): a Linear over unfolded patches at S positions,
so the term and its cost are the Linear rule's (linear.py) on the patches."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.structured.rules.base import Site
from pipeline.methods.structured.rules.linear import LinearRule


class ConvRule(LinearRule):
    kind = "conv"
    types: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
    per_sample_broadcast = False
    type_names: tuple[str, ...] = ()

    def eligible(self, module: nn.Module) -> bool:
        m: Any = module
        return bool(m.groups == 1 and m.padding_mode == "zeros"
                    and (not isinstance(m.padding, str) or m.padding == "valid"))

    def as_linear(self, site: Site, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches A (n, S, C_in k) and cotangents G (o, n, S, C_out) over the S output positions."""
        m: Any = site.module
        o, n = g.shape[:2]
        if isinstance(m, nn.Conv1d):
            a = a.unsqueeze(2)  # (n, C, 1, L): a 1-d convolution is a 2-d one of height 1
            kernel, dilation, padding, stride = (1, *m.kernel_size), (1, *m.dilation), (0, *_pad(m)), (1, *m.stride)
        else:
            kernel, dilation, padding, stride = m.kernel_size, m.dilation, _pad(m), m.stride
        patches = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)  # (n, K, S)
        return patches.transpose(1, 2), g.reshape(o, n, g.shape[2], -1).transpose(2, 3)


def _pad(m: Any) -> tuple[int, ...]:
    return (0,) * len(m.kernel_size) if m.padding == "valid" else tuple(m.padding)


RULE = ConvRule()
