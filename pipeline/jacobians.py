"""Per-sample Jacobians and their contraction: the building blocks that the methods share.

    j1 = jacobians(fm, x1)          # [(n1, o, p_k)] one per trainable parameter tensor
    contract(j1, j1, "trace")       # (n1, n1) = sum over k and a of J1_k[:, a] J1_k[:, a]^T
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch.func import jacrev, vmap

from pipeline.config import Mode
from pipeline.models import FunctionalModel

# Bytes of intermediate Jacobian rows jacrev may hold at once for one sample; beyond it, jacrev
# computes the o rows in chunks (memory for time).
JACREV_CHUNK_BYTES = 256 << 20


def single(fm: FunctionalModel, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f(params, x) for one sample x (no batch axis): (o,)."""
    return fm(params, x.unsqueeze(0)).reshape(-1)


def jacobians(fm: FunctionalModel, x: torch.Tensor, names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Per-sample Jacobians with vmap(jacrev) (by ``loop_jacobians`` where the model cannot be vmapped):
    one (n, o, p_k) tensor per trainable parameter.

    Args:
      names: only these parameters (the others held fixed); all trainable ones if None.
    """
    names = list(fm.params) if names is None else list(names)
    if not names:
        return []
    if "vmap" in fm.fallbacks:
        return loop_jacobians(fm, x, names)
    sub = {k: fm.params[k] for k in names}
    rest = {k: v for k, v in fm.params.items() if k not in sub}

    def f(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return single(fm, {**rest, **p}, xi)

    o = single(fm, fm.params, x[0]).numel()
    row_bytes = sum(v.numel() for v in sub.values()) * fm.itemsize
    chunk = None if o * row_bytes <= JACREV_CHUNK_BYTES else max(1, JACREV_CHUNK_BYTES // max(row_bytes, 1))
    jac = vmap(jacrev(f, chunk_size=chunk), (None, 0))(sub, x)
    return [j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()]


def loop_jacobians(fm: FunctionalModel, x: torch.Tensor, names: Sequence[str]) -> list[torch.Tensor]:
    """Per-sample Jacobians without vmap: per sample, one forward pass and one backward pass per output
    (n (FP + o BP)). For models vmap cannot trace: RNN kernels, data-dependent indexing, ``.item()``."""
    rows: list[list[torch.Tensor]] = [[] for _ in names]  # per parameter: (o, p_k) per sample
    for i in range(x.shape[0]):
        params = {**fm.params, **{k: fm.params[k].detach().requires_grad_(True) for k in names}}
        leaves = [params[k] for k in names]
        with torch.enable_grad():
            out = fm(params, x[i : i + 1])[0]  # (o,)
            per_output = [torch.autograd.grad(out[a], leaves, retain_graph=a + 1 < out.numel(), allow_unused=True)
                          for a in range(out.numel())]
        for k, leaf in enumerate(leaves):
            rows[k].append(torch.stack([(torch.zeros_like(leaf) if g[k] is None else g[k]).reshape(-1)
                                        for g in per_output]))
    return [torch.stack(r) for r in rows]


def accumulate(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of per-parameter terms, accumulated in place (one block's worth of memory)."""
    it = iter(terms)
    acc = next(it)  # a fresh product, safe to add into
    for t in it:
        acc += t
    return acc


def contract(j1: Sequence[torch.Tensor], j2: Sequence[torch.Tensor], mode: Mode) -> torch.Tensor:
    """Contract per-sample Jacobians [(n1, o, p_k)] and [(n2, o, p_k)] over the parameters.

    Returns:
      (n1, n2, o, o) for full, (n1, n2) for trace, (n1, n2, o) for diagonal.
    """
    n1, o = j1[0].shape[:2]
    n2 = j2[0].shape[0]
    pairs = list(zip(j1, j2, strict=True))
    if mode == Mode.FULL:  # one (n1 o, p_k) x (p_k, n2 o) product per parameter
        acc = accumulate(a.reshape(n1 * o, -1) @ b.reshape(n2 * o, -1).T for a, b in pairs)
        return acc.reshape(n1, o, n2, o).permute(0, 2, 1, 3)
    if mode == Mode.TRACE:  # sum over a = b and k: one (n1, o p_k) x (o p_k, n2) product per parameter
        return accumulate(a.reshape(n1, -1) @ b.reshape(n2, -1).T for a, b in pairs)
    # diagonal: (o, n1, p_k) @ (o, p_k, n2) -> (o, n1, n2), a = b only
    return accumulate(a.transpose(0, 1) @ b.permute(1, 2, 0) for a, b in pairs).permute(1, 2, 0)
