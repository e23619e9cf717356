"""nn.Conv1d, nn.Conv2d and nn.Conv3d, grouped or not, any padding and padding mode: per group, a Linear
over the input patches at the S output positions, so the term and its cost are the Linear rule's
(linear.py) on the patches, summed over the groups (a depthwise convolution: one group per channel)."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Mode
from pipeline.jacobians import accumulate
from pipeline.methods.structured.rules.base import OutputHook, Site, outer
from pipeline.methods.structured.rules.linear import (
    linear_cost,
    linear_jacobians,
    linear_memory,
    linear_term,
    summed_memory,
)

Groups = list[tuple[torch.Tensor, torch.Tensor]]  # per group: patches A (n, S, K), cotangents G (o, n, S, C)


class ConvRule(OutputHook):
    kind = "conv"
    types: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    type_names: tuple[str, ...] = ()

    def eligible(self, module: nn.Module) -> bool:
        return True  # every configuration: the per-model check against autograd has the last word

    def groups(self, site: Site, a: torch.Tensor, g: torch.Tensor) -> Groups:
        """Each group's patches A (n, S, C_in / groups * k) and cotangents G (o, n, S, C_out / groups)."""
        m: Any = site.module
        o, n = g.shape[:2]
        patches = _patches(m, a)  # (n, C_in k, S), channel-major: a group's channels are one slice
        cot = g.reshape(o, n, g.shape[2], -1)  # (o, n, C_out, S)
        k, c = patches.shape[1] // m.groups, cot.shape[2] // m.groups
        return [(patches[:, i * k : (i + 1) * k].transpose(1, 2), cot[:, :, i * c : (i + 1) * c].transpose(2, 3))
                for i in range(m.groups)]

    def weight_jacobians(self, site: Site, a: Any, g: torch.Tensor) -> torch.Tensor:
        """(n, o, *weight.shape): each group's rows (C_out / groups, C_in / groups * k), channel-major as
        the weight is laid out."""
        per_group = [linear_jacobians(A, G, True, False)[0].reshape(A.shape[0], G.shape[0], G.shape[3], A.shape[2])
                     for A, G in self.groups(site, a, g)]
        jw = torch.cat(per_group, dim=2)
        weight: torch.Tensor = getattr(site.module, "weight")  # noqa: B009  (a property when parametrized)
        return jw.reshape(jw.shape[0], jw.shape[1], *weight.shape)

    def term(self, site: Site, a1: Any, g1: torch.Tensor, a2: Any, g2: torch.Tensor, mode: Mode) -> torch.Tensor:
        pairs = zip(self.groups(site, a1, g1), self.groups(site, a2, g2), strict=True)
        w, b = "weight" in site.params, "bias" in site.params
        return accumulate(linear_term(A1, G1, A2, G2, mode, w, b) for (A1, G1), (A2, G2) in pairs)

    def cost(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode, samples: int) -> float:
        return sum(linear_cost(A, G, b1, b2, mode) for A, G in self.groups(site, a, g))

    def memory(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode) -> int:
        """Both sides' input patches, and the groups' Linear terms summed one at a time."""
        groups = self.groups(site, a, g)
        patches = (b1 + b2) * sum(A.numel() for A, _ in groups) * g.element_size()
        result = b1 * b2 * outer(mode, g.shape[0]) * g.element_size()
        return patches + summed_memory([linear_memory(A, G, b1, b2, mode) for A, G in groups], result)


def _patches(m: Any, a: torch.Tensor) -> torch.Tensor:
    """The convolution's input patches (n, C_in k, S) as it sees them: padded as it pads."""
    d = a.ndim - 2
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        # 'same' may pad unevenly and other modes are no zeros: pad first, as the module itself does.
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
        padding: tuple[int, ...] = (0,) * d
    else:
        padding = tuple(m.padding)
    kernel, dilation, stride = tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride)
    if d == 1:  # (n, C, 1, L): a 1-d convolution is a 2-d one of height 1
        return F.unfold(a.unsqueeze(2), (1, *kernel), dilation=(1, *dilation), padding=(0, *padding),
                        stride=(1, *stride))
    if d == 2:
        return F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
    return _unfold(F.pad(a, [p for q in reversed(padding) for p in (q, q)]), kernel, dilation, stride)


def _unfold(a: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
            stride: tuple[int, ...]) -> torch.Tensor:
    """F.unfold for any number of spatial dims (it takes two): (n, C, *L) -> (n, C prod(kernel), S)."""
    n, c, *lengths = a.shape
    out = [(length - dil * (k - 1) - 1) // s + 1 for length, k, dil, s in zip(lengths, kernel, dilation, stride,
                                                                               strict=True)]
    offsets = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * dil, o * dil + s * (size - 1) + 1, s)
                      for o, dil, s, size in zip(offset, dilation, stride, out, strict=True))
        offsets.append(a[(slice(None), slice(None), *index)])
    return torch.stack(offsets, dim=2).reshape(n, c * len(offsets), -1)


RULE = ConvRule()
