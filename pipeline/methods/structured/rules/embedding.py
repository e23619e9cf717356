"""nn.Embedding: (one-hot(i1_s) . one-hot(i2_t)) (g_as . g'_bt), summed over pairs of positions;
the padding row gets no gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import Mode
from pipeline.methods.structured.rules.base import OutputHook, Site, outer


class EmbeddingRule(OutputHook):
    kind = "embedding"
    types: tuple[type[nn.Module], ...] = (nn.Embedding,)
    type_names: tuple[str, ...] = ()
    per_sample_broadcast = True  # position embeddings: ids (1, S) shared by the batch

    def eligible(self, module: nn.Module) -> bool:
        m: Any = module
        return m.max_norm is None and not m.scale_grad_by_freq

    def term(self, site: Site, a1: Any, g1: torch.Tensor, a2: Any, g2: torch.Tensor, mode: Mode) -> torch.Tensor:
        m: Any = site.module
        o, n1 = g1.shape[:2]
        n2 = g2.shape[1]
        # Ids shared by the batch (position ids of shape (1, S)) are every sample's ids.
        i1, i2 = a1.expand(n1, *a1.shape[1:]).reshape(n1, -1), a2.expand(n2, *a2.shape[1:]).reshape(n2, -1)
        G1, G2 = g1.reshape(o, n1, i1.shape[1], -1), g2.reshape(o, n2, i2.shape[1], -1)
        same = (i1[:, :, None, None] == i2[None, None, :, :]).to(G1.dtype)  # (n1, S, n2, T)
        if m.padding_idx is not None:  # the padding row gets no gradient
            same = same * torch.ne(i1, m.padding_idx).to(G1.dtype)[:, :, None, None]
        if mode == Mode.FULL:
            return torch.einsum("isjt,aisd,bjtd->ijab", same, G1, G2)
        if mode == Mode.TRACE:
            return torch.einsum("isjt,aisd,ajtd->ij", same, G1, G2)
        return torch.einsum("isjt,aisd,ajtd->ija", same, G1, G2)

    def cost(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode, samples: int) -> float:
        s = a[0].numel()  # ids per sample (a holds one sample's, or the batch's shared ones)
        d = g[0].numel() // max(s, 1)
        return float(2.0 * b1 * b2 * s * s * (1 + outer(mode, g.shape[0]) * d))


RULE = EmbeddingRule()
