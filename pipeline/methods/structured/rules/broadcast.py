"""Parameters of leading size 1 that a module without a rule of its own uses for every sample (ViT's
class token and position embeddings: ``cat((cls_token.expand(n, -1, -1), h))``, ``h + position``):
while the cotangents are recorded, the module sees the parameter expanded to the batch plus a zero
perturbation per sample, so the perturbation's cotangents are the parameter's per-sample Jacobians
(o per sample: one batched backward, no vmap(jacrev) over the whole model). The per-model check against
autograd confirms the parameter is used that way, or it falls back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import Mode
from pipeline.jacobians import contract
from pipeline.methods.structured.rules.base import Handle, Record, Site, outer


def candidates(module: nn.Module, trainable: set[str], prefix: str) -> dict[str, str]:
    """The module's own trainable parameters of leading size 1 and at least two dimensions."""
    return {local: prefix + local for local, p in module.named_parameters(recurse=False)
            if prefix + local in trainable and p.ndim >= 2 and p.shape[0] == 1}


class BroadcastRule:
    kind = "broadcast"
    types: tuple[type[nn.Module], ...] = ()  # found by parameter (see ``candidates``), not by module type
    type_names: tuple[str, ...] = ()

    def eligible(self, module: nn.Module) -> bool:
        return True

    def capture(self, site: Site, n: int, record: Record) -> Handle:
        (local,) = site.params
        saved: list[Any] = []

        def expand(module: nn.Module, args: tuple[Any, ...]) -> None:
            p = module._parameters[local]
            if p is None:  # nothing to expand (a parameter set to None): the check finds no per-sample use
                return
            saved.append(p)
            e = torch.zeros((n, *p.shape[1:]), dtype=p.dtype, device=p.device, requires_grad=True)
            module._parameters[local] = p.expand(n, *p.shape[1:]) + e  # type: ignore[assignment]
            record(None, [e])

        def restore(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if saved:
                module._parameters[local] = saved.pop()

        return _Handles(site.module.register_forward_pre_hook(expand), site.module.register_forward_hook(restore))

    def term(self, site: Site, a1: Any, g1: torch.Tensor, a2: Any, g2: torch.Tensor, mode: Mode) -> torch.Tensor:
        return contract([_jacobian(g1)], [_jacobian(g2)], mode)

    def cost(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode, samples: int) -> float:
        return 2.0 * b1 * b2 * outer(mode, g.shape[0]) * site.numel

    def memory(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode) -> int:
        """Both sides' per-sample Jacobians (copies of the cotangents, samples first) and the term."""
        o = g.shape[0]
        return (b1 * b2 * outer(mode, o) + (b1 + b2) * o * site.numel) * g.element_size()


def _jacobian(g: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians (n, o, p) from the perturbation's cotangents (o, n, *shape)."""
    return g.reshape(g.shape[0], g.shape[1], -1).transpose(0, 1)


class _Handles:
    def __init__(self, *handles: Handle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


RULE = BroadcastRule()
