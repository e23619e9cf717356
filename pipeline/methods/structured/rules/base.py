"""What a structured rule is: a layer family's eligibility test, its kernel term and its cost."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from pipeline.config import Mode

if TYPE_CHECKING:
    from pipeline.methods.structured.rules.reparam import Reparam


@dataclass
class Site:
    """A module handled by a structured rule: its trainable direct parameters, by local name."""

    name: str
    module: nn.Module
    params: dict[str, str]  # "weight" / "bias" (or a computed weight's originals) -> full name (trainable only)
    rule: Rule
    reparam: Reparam | None = None  # the weight is computed from originals (parametrizations, weight norm)
    # The axis of the samples in the module's input and output: 0, or 1 for a sequence-first layer
    # ((S, n, d), nn.Transformer's default); decided on the layout's probe and kept with the site.
    batch_axis: int | None = None

    @property
    def kind(self) -> str:
        """The rule family: "linear", "conv", "affine", "embedding", ..."""
        return self.rule.kind

    @property
    def numel(self) -> int:
        """Trainable parameters the rule covers."""
        return sum(self.module.get_parameter(local).numel() for local in self.params)


class Rule(Protocol):
    """One layer family. ``a`` is the layer's input for n samples, ``g`` (o, n, *out.shape[1:]) the
    cotangents of each of the o outputs at the layer's output."""

    kind: str
    types: tuple[type[nn.Module], ...]  # the module types it may take (subclasses included)
    # Module types of other packages, by "module.QualifiedName", so that the rule needs no import of them.
    type_names: tuple[str, ...]

    def capture(self, site: Site, n: int, record: Record) -> Handle:
        """Install what records, at each forward of the site on a batch of n, its input ``a`` and the zero
        perturbations (leaves requiring grad) added where its cotangents are wanted: ``record(a, leaves)``."""
        ...

    def eligible(self, module: nn.Module) -> bool:
        """Whether the rule fits this module's configuration (before the numeric check)."""
        ...

    def term(self, site: Site, a1: Any, g1: torch.Tensor, a2: Any, g2: torch.Tensor, mode: Mode) -> torch.Tensor:
        """The site's parameters' share of the block: (n1, n2, o, o) full, (n1, n2) trace, (n1, n2, o) diagonal."""
        ...

    def cost(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode, samples: int) -> float:
        """FLOPs of ``term`` for a b1 x b2 block (``samples`` sides' rows), from one sample's a and g."""
        ...

    def memory(self, site: Site, a: Any, g: torch.Tensor, b1: int, b2: int, mode: Mode) -> int:
        """Peak bytes ``term`` holds for a b1 x b2 block beyond the sides' a and g (from one sample's):
        its temporaries (per-sample Jacobians, a pair-sum's tile) and the term it returns."""
        ...


@runtime_checkable
class WeightJacobians(Protocol):
    """A rule that can also give its layer's per-sample weight Jacobians, so that a weight computed from
    other parameters (``reparam``) can take it."""

    def weight_jacobians(self, site: Site, a: Any, g: torch.Tensor) -> torch.Tensor:
        """(n, o, *weight.shape): d f_a(x_i) / d weight from the layer's inputs and cotangents."""
        ...


class Handle(Protocol):
    def remove(self) -> None: ...


Record = Callable[[Any, list[torch.Tensor]], None]


class RestoreForward:
    """``capture``'s handle for rules that record through a decomposed forward set on the module
    instance (``module.forward = ...``): gives the module its own forward back."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


class OutputHook:
    """``capture`` for rules whose cotangents are those of the module's output: a forward hook adds a zero
    perturbation to it. ``per_sample_broadcast``: a module that gives one output for the whole batch
    (leading size 1, broadcast where it is used: position embeddings of ids (1, S)) gets a perturbation
    per sample, so that its cotangents are per sample, not their sum. A sequence-first module ((S, n, ...)
    in and out) is recorded batch-first: its input and its perturbation are transposed, so that rules
    always see the samples on the leading axis."""

    per_sample_broadcast = False

    def capture(self, site: Site, n: int, record: Record) -> Handle:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            shape = tuple(out.shape)
            if site.batch_axis is None:  # on the layout's probe: where the samples are
                site.batch_axis = 1 if len(shape) >= 2 and shape[0] not in (1, n) and shape[1] == n else 0
            a = args[0].detach()
            if site.batch_axis == 1:
                a, shape = a.transpose(0, 1), (shape[1], shape[0], *shape[2:])
            elif shape[0] == 1 < n and self.per_sample_broadcast:
                shape = (n, *shape[1:])
            e = torch.zeros(shape, dtype=out.dtype, device=out.device, requires_grad=True)
            record(a, [e])
            return out + (e.transpose(0, 1) if site.batch_axis == 1 else e)

        return site.module.register_forward_hook(hook)


def outer(mode: Mode, o: int) -> int:
    """Output pairs a term sums per sample pair: o^2 for full, o otherwise."""
    return o * o if mode == Mode.FULL else o
