"""The NTK math: the tutorial's two methods, the three modes, and the ``auto`` choice.

    K = empirical_ntk(model, x1, x2, method="jacobian_contraction", mode="full")  # (n1, n2, o, o)
    K == empirical_ntk(model, x1, x2, method="ntk_vector_products", mode="full")  # to float tolerance

K[i, j, a, b] = <d f_a(x1_i) / d theta, d f_b(x2_j) / d theta>, theta = the trainable parameters.
Modes: full (n1, n2, o, o); trace (n1, n2), the sum over a = b; diagonal (n1, n2, o), the a = b entries.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.func import jacrev, jvp, vjp, vmap

from pipeline.models import FunctionalModel, eval_mode, forward_flops
from pipeline.plan import METHODS, MODES, block_flops

# Bytes of parameter-sized cotangents that ntk_vector_products holds at once (it vmaps over
# pairs in chunks of this size); and of Jacobians above which ``auto`` avoids the contraction.
VPS_CHUNK_BYTES = 1 << 30
JACOBIAN_BUDGET_BYTES = 4 << 30


def _single(fm: FunctionalModel, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return fm(params, x.unsqueeze(0)).reshape(-1)  # (o,)


def _jacobians(fm: FunctionalModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample Jacobians, one (n, o, p_k) tensor per trainable parameter tensor."""
    jac = vmap(jacrev(lambda p, xi: _single(fm, p, xi)), (None, 0))(fm.params, x)
    return [j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()]


def _sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of per-parameter terms, accumulated in place (one block's worth of memory)."""
    it = iter(terms)
    acc = next(it)  # a fresh product, safe to add into
    for t in it:
        acc += t
    return acc


def jacobian_contraction(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Form per-sample Jacobians with vmap(jacrev), then contract them over the parameters.

    Cost: N·O·[FP] for the Jacobians plus N²·O²·P (full) or N²·O·P (trace, diagonal) for the
    contraction; memory (n1 + n2)·O·P. With ``x2=None`` one set of Jacobians serves both sides.
    """
    j1 = _jacobians(fm, x1)
    j2 = j1 if x2 is None else _jacobians(fm, x2)
    n1, o = j1[0].shape[:2]
    n2 = j2[0].shape[0]
    if mode == "full":
        acc = _sum(a.reshape(n1 * o, -1) @ b.reshape(n2 * o, -1).T for a, b in zip(j1, j2, strict=True))
        return acc.reshape(n1, o, n2, o).permute(0, 2, 1, 3).contiguous()  # (n1, n2, o, o)
    # (o, n1, p_k) @ (o, p_k, n2) -> (o, n1, n2): one matmul per output a, over a = b only.
    diag = _sum(a.transpose(0, 1) @ b.permute(1, 2, 0) for a, b in zip(j1, j2, strict=True))
    if mode == "trace":
        return diag.sum(0)  # (n1, n2)
    return diag.permute(1, 2, 0).contiguous()  # (n1, n2, o)


def ntk_vector_products(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, mode: str) -> torch.Tensor:
    """For each pair, one vjp on x1_i and o jvps on x2_j (the tutorial's NTK-vector products).

    Cost: N²·O·[FP], no contraction and no Jacobian in memory: wins when O·P is large next to a
    forward pass. Pairs are vmapped in chunks so that at most ~VPS_CHUNK_BYTES of cotangents live.
    """
    x2 = x1 if x2 is None else x2
    params = fm.params

    def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out, vjp_fn = vjp(lambda p: _single(fm, p, a), params)[:2]

        def one(vec: torch.Tensor) -> torch.Tensor:
            cotangent = vjp_fn(vec)[0]
            return jvp(lambda p: _single(fm, p, b), (params,), (cotangent,))[1]

        basis = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
        return vmap(one)(basis)  # (o, o): [a, b] = <J_a(x1_i), J_b(x2_j)>

    itemsize = x1.element_size()
    o = _single(fm, params, x1[0]).numel()
    chunk = max(1, VPS_CHUNK_BYTES // (3 * o * max(fm.p, 1) * itemsize))
    row = vmap(pair, (None, 0), chunk_size=chunk)
    k = torch.stack([row(x1[i], x2) for i in range(x1.shape[0])])  # (n1, n2, o, o)
    if mode == "full":
        return k
    d = torch.diagonal(k, dim1=2, dim2=3)  # (n1, n2, o)
    return d.sum(-1) if mode == "trace" else d.contiguous()


_METHODS = {"jacobian_contraction": jacobian_contraction, "ntk_vector_products": ntk_vector_products}


def compute_block(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, method: str,
                  mode: str) -> torch.Tensor:
    """One block of the kernel; ``x2=None`` means K(x1, x1). Used by empirical_ntk and the workers."""
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    with torch.no_grad():  # torch.func transforms track their own gradients
        return _METHODS[method](fm, x1, x2, mode)


def choose_method(b1: int, b2: int, o: int, p: int, fp: int, mode: str, itemsize: int,
                  diagonal: bool = False) -> dict[str, Any]:
    """The ``auto`` choice for blocks of b1 x b2, by the cost models in ``plan.block_flops``.

    Jacobian contraction is taken when its estimated FLOPs are lower and its Jacobians,
    (b1 + b2)·o·P values, fit JACOBIAN_BUDGET_BYTES; otherwise NTK-vector products.

    Returns:
      ``{"method": ..., "reason": ..., "flops": {method: estimate}}``, recorded in the output.
    """
    flops = {m: block_flops(m, b1, b2, o, p, fp, mode, diagonal) for m in METHODS}
    jac_bytes = (b1 if diagonal else b1 + b2) * o * p * itemsize
    if jac_bytes > JACOBIAN_BUDGET_BYTES:
        method = "ntk_vector_products"
        reason = f"Jacobians of a block ({jac_bytes / 2**30:.1f} GiB) exceed {JACOBIAN_BUDGET_BYTES / 2**30:.0f} GiB"
    else:
        method = min(METHODS, key=lambda m: flops[m])
        reason = "fewest estimated FLOPs per block"
    return {"method": method, "reason": reason, "flops": flops, "block": [b1, b2]}


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *, method: str = "auto",
                  mode: str = "full") -> torch.Tensor:
    """The empirical NTK of ``model`` between x1 and x2, in memory.

    The model runs in eval mode (its training flags are restored after); the kernel is taken over
    parameters with ``requires_grad=True``; frozen parameters and buffers are held fixed. Computes
    in the dtype and on the device of the model's parameters.

    Args:
      model: any nn.Module mapping a batch (n, ...) to outputs (n, ...), flattened to (n, o).
      x1: (n1, ...) inputs.
      x2: (n2, ...) inputs, or None for K(x1, x1).
      method: "auto", "jacobian_contraction" or "ntk_vector_products".
      mode: "full", "trace" or "diagonal".

    Returns:
      (n1, n2, o, o) for full, (n1, n2) for trace, (n1, n2, o) for diagonal.
    """
    with eval_mode(model):
        fm = FunctionalModel(model)
        ref = next(iter(fm.params.values()), x1)
        x1 = x1.to(device=ref.device, dtype=ref.dtype)
        x2 = None if x2 is None else x2.to(device=ref.device, dtype=ref.dtype)
        if method == "auto":
            o = _single(fm, fm.params, x1[0]).numel()
            n2 = x1.shape[0] if x2 is None else x2.shape[0]
            method = choose_method(x1.shape[0], n2, o, fm.p, forward_flops(fm, x1), mode,
                                   x1.element_size(), diagonal=x2 is None)["method"]
        return compute_block(fm, x1, x2, method, mode)
