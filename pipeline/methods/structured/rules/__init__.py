"""The structured rules, one file per layer family, in a registry keyed by module type.

    rule_for(nn.Linear(3, 4)).kind     # "linear"
    rule_for(nn.GRU(3, 4))             # None: its parameters fall back to per-sample Jacobians

Adding a layer family: a module here with a ``RULE`` (pipeline.methods.structured.rules.base.Rule:
``kind``, ``types``, ``eligible``, ``term``, ``cost``) and one line in ``FAMILIES``. Adding a module
type to a family touches only that family's file.
"""

from __future__ import annotations

from torch import nn

from pipeline.methods.structured.rules import affine, attention, conv, embedding, linear
from pipeline.methods.structured.rules.base import Rule, Site

FAMILIES: tuple[Rule, ...] = (linear.RULE, conv.RULE, affine.RULE, embedding.RULE, attention.RULE)
RULES: dict[type[nn.Module], Rule] = {t: rule for rule in FAMILIES for t in rule.types}
RULES_BY_NAME: dict[str, Rule] = {name: rule for rule in FAMILIES for name in rule.type_names}


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this module (its type or the nearest registered base class), if it is eligible."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls) or RULES_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule if rule.eligible(module) else None
    return None


__all__ = ["FAMILIES", "RULES", "Rule", "Site", "rule_for"]
