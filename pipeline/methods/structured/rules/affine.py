"""Elementwise affine parameters of norm layers (LayerNorm, GroupNorm, BatchNorm in eval mode):
the per-sample Jacobian is g * x_hat (weight) and g (bias), summed over positions: C values per
output, so it is formed and contracted."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Mode
from pipeline.jacobians import contract
from pipeline.methods.structured.rules.base import OutputHook, Site, outer

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _normalized(m: Any, a: torch.Tensor) -> torch.Tensor:
    """The input of an affine norm layer after normalization, before its weight and bias."""
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(a, m.normalized_shape, None, None, m.eps)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(a, m.num_groups, None, None, m.eps)
    view = (1, -1) + (1,) * (a.ndim - 2)  # BatchNorm with running statistics (see ``eligible``)
    x_hat: torch.Tensor = (a - m.running_mean.view(view)) / torch.sqrt(m.running_var.view(view) + m.eps)
    return x_hat


def affine_jacobians(site: Site, a: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample Jacobians of elementwise weight and bias: g * x_hat (and g) summed over positions."""
    m: Any = site.module
    o, n = g.shape[:2]
    if isinstance(m, nn.LayerNorm):  # parameters over the trailing normalized_shape
        d = len(m.normalized_shape)
        keep = tuple(range(g.ndim - d, g.ndim))
    else:  # per channel, axis 1 of the input
        keep = (2,)
    summed = tuple(i for i in range(2, g.ndim) if i not in keep)
    out = []
    if "weight" in site.params:
        gx = g * _normalized(m, a)
        out.append((gx.sum(summed) if summed else gx).reshape(o, n, -1).transpose(0, 1))
    if "bias" in site.params:
        out.append((g.sum(summed) if summed else g).reshape(o, n, -1).transpose(0, 1))
    return out


class AffineRule(OutputHook):
    kind = "affine"
    types: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, *_BATCHNORM)
    type_names: tuple[str, ...] = ()

    def eligible(self, module: nn.Module) -> bool:
        if isinstance(module, _BATCHNORM):  # eval mode with running statistics: a per-sample affine map
            return module.running_mean is not None and module.running_var is not None
        return True

    def term(self, site: Site, a1: Any, g1: torch.Tensor, a2: Any, g2: torch.Tensor, mode: Mode) -> torch.Tensor:
        return contract(affine_jacobians(site, a1, g1), affine_jacobians(site, a2, g2), mode)

    def cost(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode, samples: int) -> float:
        o = g.shape[0]
        return 2.0 * b1 * b2 * outer(mode, o) * site.numel + 2.0 * samples * o * g[0].numel()

    def memory(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode) -> int:
        """Both sides' per-sample Jacobians, the normalized inputs and g * x_hat they are formed from."""
        o, itemsize = g.shape[0], g.element_size()
        per_sample = o * site.numel + g.numel() + int(a.numel())
        return (b1 * b2 * outer(mode, o) + (b1 + b2) * per_sample) * itemsize


RULE = AffineRule()
