"""nn.MultiheadAttention's packed input projection (``in_proj_weight``, ``in_proj_bias``): three Linear
maps of the query, key and value, so its term is the Linear rule's summed over the three; ``out_proj``
is a child nn.Linear and takes the Linear rule itself.

PyTorch's fused path (``_native_multi_head_attention``, and the encoder layer's own kernel) exposes
neither the projections' outputs nor ``out_proj``'s input. While the structured method records
cotangents, the module runs a plain decomposition instead (projections, scaled dot products, softmax,
``out_proj``) with zero perturbations on the projected query, key and value; the per-model check
against autograd on the module's own forward confirms the two agree, or the parameters fall back.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Mode
from pipeline.jacobians import accumulate
from pipeline.methods.structured.rules.base import Handle, Record, RestoreForward, Site, outer
from pipeline.methods.structured.rules.linear import linear_cost, linear_memory, linear_term, summed_memory


class AttentionRule:
    kind = "attention"
    types: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)
    type_names: tuple[str, ...] = ()

    def eligible(self, module: nn.Module) -> bool:
        m: Any = module
        return bool(m._qkv_same_embed_dim and m.in_proj_weight is not None and m.bias_k is None
                    and not m.add_zero_attn)

    def capture(self, site: Site, n: int, record: Record) -> Handle:
        m: Any = site.module

        def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                    attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                    is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
            masks = (key_padding_mask, attn_mask, is_causal)
            return _decomposed(m, record, query, key, value, masks, need_weights, average_attn_weights)

        m.forward = forward  # the instance's forward, for the recording only
        return RestoreForward(m)

    def _pairs(self, a: Any, g: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Query, key and value: inputs A (n, L, E) and their projections' cotangents G (o, n, L, E)."""
        return [(x, gx) for x, gx in zip(a, g, strict=True)]

    def term(self, site: Site, a1: Any, g1: Any, a2: Any, g2: Any, mode: Mode) -> torch.Tensor:
        w, b = "in_proj_weight" in site.params, "in_proj_bias" in site.params
        pairs = zip(self._pairs(a1, g1), self._pairs(a2, g2), strict=True)
        return accumulate(linear_term(A1, G1, A2, G2, mode, w, b) for (A1, G1), (A2, G2) in pairs)

    def cost(self, site: Site, a: Any, g: Any, b1: int, b2: int, mode: Mode, samples: int) -> float:
        return sum(linear_cost(A, G, b1, b2, mode) for A, G in self._pairs(a, g))

    def memory(self, site: Site, a: Any, g: Any, b1: int, b2: int, mode: Mode) -> int:
        pairs = self._pairs(a, g)
        result = b1 * b2 * outer(mode, pairs[0][1].shape[0]) * pairs[0][1].element_size()
        return summed_memory([linear_memory(A, G, b1, b2, mode) for A, G in pairs], result)


def _decomposed(m: Any, record: Record, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                masks: tuple[torch.Tensor | None, torch.Tensor | None, bool], need_weights: bool,
                average: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MultiheadAttention's forward in plain operations, recording (query, key, value) batch first and
    perturbing each projection."""
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    E, h = m.embed_dim, m.num_heads
    n, L, S = query.shape[0], query.shape[1], key.shape[1]
    W, b = m.in_proj_weight, m.in_proj_bias
    leaves, heads = [], []
    for i, t in enumerate((query, key, value)):
        z = F.linear(t, W[i * E : (i + 1) * E], None if b is None else b[i * E : (i + 1) * E])  # (n, L|S, E)
        e = torch.zeros_like(z, requires_grad=True)
        leaves.append(e)
        heads.append((z + e).reshape(n, -1, h, E // h).transpose(1, 2))  # (n, h, L|S, E / h)
    record((query.detach(), key.detach(), value.detach()), leaves)
    q, k, v = heads
    scores = q @ k.transpose(-2, -1) / math.sqrt(E // h)  # (n, h, L, S)
    mask = _additive_mask(masks, n, h, L, S, scores.dtype, scores.device)
    weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
    out = m.out_proj((weights @ v).transpose(1, 2).reshape(n, L, E))  # (n, L, E)
    if not m.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, weights.mean(1) if average else weights


def _additive_mask(masks: tuple[torch.Tensor | None, torch.Tensor | None, bool], n: int, h: int, L: int, S: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """key_padding_mask (n, S), attn_mask (L, S) or (n h, L, S), or is_causal, as one additive mask
    broadcasting to (n, h, L, S): True (not allowed) becomes -inf, floats are added as they are."""
    key_padding_mask, attn_mask, is_causal = masks

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    total: torch.Tensor | None = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=device).triu(1)
    if attn_mask is not None:
        total = additive(attn_mask).reshape(n, h, L, S) if attn_mask.dim() == 3 else additive(attn_mask)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).reshape(n, 1, 1, S)
        total = padding if total is None else total + padding
    return total


RULE = AttentionRule()
