"""nn.Embedding: (one-hot(i1_s) . one-hot(i2_t)) (g_as . g'_bt), summed over pairs of positions;
the padding row gets no gradient. The sum over pairs is the Linear rule's pair-sum (``linear.pair_sum``),
in tiles of bounded memory."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import Mode
from pipeline.methods.structured.rules.base import OutputHook, Site, outer
from pipeline.methods.structured.rules.linear import pair_sum, pair_sum_bytes, pair_tiles


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

        def same(rows: slice, cols: slice) -> torch.Tensor:  # (r1, S, r2, T): whether the ids are equal
            ids1 = i1[rows]
            eq: torch.Tensor = (ids1[:, :, None, None] == i2[cols][None, None, :, :]).to(G1.dtype)
            if m.padding_idx is not None:  # the padding row gets no gradient
                eq = eq * torch.ne(ids1, m.padding_idx).to(G1.dtype)[:, :, None, None]
            return eq

        return pair_sum(same, G1, G2, mode)

    def cost(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode, samples: int) -> float:
        s = a[0].numel()  # ids per sample (a holds one sample's, or the batch's shared ones)
        d = g[0].numel() // max(s, 1)
        return float(2.0 * b1 * b2 * s * s * (1 + outer(mode, g.shape[0]) * d))

    def memory(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode) -> int:
        s, o = a[0].numel(), g.shape[0]
        d, itemsize = g[0].numel() // max(s, 1), g.element_size()
        tile = pair_tiles(b1, b2, s, s, o, d, itemsize)
        return b1 * b2 * outer(mode, o) * itemsize + pair_sum_bytes(*tile, s, s, o, d, itemsize)


RULE = EmbeddingRule()
