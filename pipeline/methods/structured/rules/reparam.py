"""Weights computed from other parameters: ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``,
``orthogonal``, ``spectral_norm``'s cousins, any user parametrization) and the older
``torch.nn.utils.weight_norm`` (``weight_g``, ``weight_v``) on a layer whose rule can give the weight's
per-sample Jacobians (Linear, Conv).

The weight W = phi(theta) depends on the parameters theta only, not on the sample, so a sample's Jacobian
with respect to theta is its Jacobian with respect to W pulled back through phi: J_theta = J_W dphi/dtheta,
one vector-Jacobian product of phi per sample and output (vmapped; a loop where phi cannot be vmapped).
The rule forms the layer's per-sample weight Jacobians from its inputs and cotangents (the per-layer
Jacobian form: no Jacobian of the rest of the network) and the pulled-back Jacobians are contracted.
Elementwise and per-row parametrizations (weight norm) cost about as much as the plain layer's
materialized form; the per-model check against autograd confirms each site.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from pipeline.config import Mode
from pipeline.jacobians import contract


@dataclass(frozen=True)
class Reparam:
    """How a site's weight is computed: ``fn(*originals) -> weight`` from its trainable originals, named
    by their path under the site's module (keys of ``Site.params``)."""

    originals: tuple[str, ...]
    fn: Callable[..., torch.Tensor]


def find(module: nn.Module, trainable: set[str], prefix: str) -> Reparam | None:
    """The reparametrization of ``module.weight``, if it has one whose originals are all trainable."""
    if parametrize.is_parametrized(module, "weight"):
        container: nn.Module = getattr(module, "parametrizations")["weight"]  # noqa: B009
        names = tuple(name for name, _ in container.named_parameters())

        def compute(*theta: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = functional_call(container, dict(zip(names, theta, strict=True)), ())
            return out

        reparam = Reparam(tuple(f"parametrizations.weight.{name}" for name in names), compute)
    else:
        hook = next((h for h in module._forward_pre_hooks.values()
                     if isinstance(h, WeightNorm) and h.name == "weight"), None)
        if hook is None:
            return None
        dim = hook.dim

        def weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return v * (g / torch.norm_except_dim(v, 2, dim))

        reparam = Reparam(("weight_g", "weight_v"), weight_norm)
    return reparam if all(prefix + name in trainable for name in reparam.originals) else None


def pulled_back(module: nn.Module, reparam: Reparam, jw: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample Jacobians (n, o, *W.shape) with respect to the weight -> [(n, o, p_k)] with respect to
    each original."""
    theta = tuple(module.get_parameter(name).detach() for name in reparam.originals)
    pull = vjp(reparam.fn, *theta)[1]
    n, o = jw.shape[0], jw.shape[1]
    flat = jw.reshape(n * o, *jw.shape[2:])
    try:
        grads = vmap(pull)(flat)
    except RuntimeError:  # a parametrization vmap cannot batch: one product per sample and output
        rows = [pull(row) for row in flat]
        grads = tuple(torch.stack([r[k] for r in rows]) for k in range(len(theta)))
    return [g.reshape(n, o, -1) for g in grads]


def term(module: nn.Module, reparam: Reparam, jw1: torch.Tensor, jw2: torch.Tensor, mode: Mode) -> torch.Tensor:
    """The originals' share of the block from both sides' per-sample weight Jacobians."""
    same = jw1 is jw2
    j1 = pulled_back(module, reparam, jw1)
    return contract(j1, j1 if same else pulled_back(module, reparam, jw2), mode)


def cost(module: nn.Module, reparam: Reparam, weight: int, n1: int, n2: int, o: int, mode: Mode,
         samples: int) -> float:
    """FLOPs of the pull-back (a few per weight entry per sample and output) and of the contraction."""
    p = sum(module.get_parameter(name).numel() for name in reparam.originals)
    oo = o * o if mode == Mode.FULL else o
    return 4.0 * samples * o * max(weight, p) + 2.0 * n1 * n2 * oo * p
