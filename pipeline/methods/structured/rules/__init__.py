"""The structured rules, one file per layer family, in a registry keyed by module type.

    rule_for(nn.Linear(3, 4)).kind     # "linear"
    rule_for(nn.GRU(3, 4)).kind        # "recurrent"
    rule_for(nn.RNNCell(3, 4))         # None: its parameters fall back to per-sample Jacobians

Adding a layer family: a module here with a ``RULE`` (pipeline.methods.structured.rules.base.Rule:
``kind``, ``types``, ``eligible``, ``term``, ``cost``, ``memory``) and one line in ``FAMILIES``. Adding a module
type to a family touches only that family's file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import Mode
from pipeline.methods.structured.rules import affine, attention, conv, embedding, linear, recurrent, reparam
from pipeline.methods.structured.rules.base import Rule, Site, WeightJacobians, outer

FAMILIES: tuple[Rule, ...] = (linear.RULE, conv.RULE, affine.RULE, embedding.RULE, attention.RULE, recurrent.RULE)
RULES: dict[type[nn.Module], Rule] = {t: rule for rule in FAMILIES for t in rule.types}
RULES_BY_NAME: dict[str, Rule] = {name: rule for rule in FAMILIES for name in rule.type_names}


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this module (its type or the nearest registered base class), if it is eligible."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls) or RULES_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule if rule.eligible(module) else None
    return None


def site_params(module: nn.Module, rule: Rule, trainable: set[str], prefix: str) -> Site | None:
    """The site of a module with a rule: its trainable direct parameters, and a weight computed from
    trainable originals (pipeline.methods.structured.rules.reparam) where its rule can take one."""
    params = {local: prefix + local for local, _ in module.named_parameters(recurse=False)
              if prefix + local in trainable}
    computed = reparam.find(module, trainable, prefix) if isinstance(rule, WeightJacobians) else None
    if computed is not None:
        params = {**{k: v for k, v in params.items() if k not in computed.originals},
                  **{name: prefix + name for name in computed.originals}}
    return Site(prefix.removesuffix("."), module, params, rule, computed) if params else None


def _own(site: Site) -> bool:
    """Whether the site has parameters of its own beside a computed weight's originals."""
    return site.reparam is None or any(k not in site.reparam.originals for k in site.params)


def site_term(site: Site, a1: Any, g1: torch.Tensor, a2: Any, g2: torch.Tensor, mode: Mode) -> torch.Tensor:
    """The site's share of the block: its rule's term, plus a computed weight's originals' term."""
    terms = [site.rule.term(site, a1, g1, a2, g2, mode)] if _own(site) else []
    if site.reparam is not None and isinstance(site.rule, WeightJacobians):
        jw1 = site.rule.weight_jacobians(site, a1, g1)
        jw2 = jw1 if a2 is a1 and g2 is g1 else site.rule.weight_jacobians(site, a2, g2)
        terms.append(reparam.term(site.module, site.reparam, jw1, jw2, mode))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def site_cost(site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode, samples: int) -> float:
    """FLOPs of ``site_term`` for a b1 x b2 block."""
    total = site.rule.cost(site, a, g, b1, b2, mode, samples) if _own(site) else 0.0
    if site.reparam is not None:
        o, weight = g.shape[0], getattr(site.module, "weight")  # noqa: B009  (a property when parametrized)
        per_sample = 2.0 * o * g[0].numel() * weight.numel() / weight.shape[0]  # its weight Jacobians from a and g
        total += samples * per_sample + reparam.cost(site.module, site.reparam, weight.numel(), b1, b2, o, mode,
                                                     samples)
    return total


def site_memory(site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode) -> int:
    """Peak bytes of ``site_term`` for a b1 x b2 block beyond the sides' a and g: its rule's term, then a
    computed weight's per-sample weight Jacobians and their pull-backs to the originals, and that term."""
    total = site.rule.memory(site, a, g, b1, b2, mode) if _own(site) else 0
    if site.reparam is not None:
        o, weight = g.shape[0], getattr(site.module, "weight")  # noqa: B009  (a property when parametrized)
        p = sum(site.module.get_parameter(name).numel() for name in site.reparam.originals)
        total += (b1 * b2 * outer(mode, o) + (b1 + b2) * o * (weight.numel() + p)) * g.element_size()
    return total


__all__ = ["FAMILIES", "RULES", "Rule", "Site", "rule_for", "site_cost", "site_memory", "site_params", "site_term"]
