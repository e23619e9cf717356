"""What every method module gives the registry (pipeline.methods), and the probe its cost estimates read.

A method is a module with four functions:

    s1 = side(fm, x1)                   # what a block needs from its rows, computed once per strip
    k = combine(fm, s1, s2, mode)       # the block between two sides (s2 None: K(x1, x1))
    flops(probe, b1, b2, mode, diagonal), memory(probe, b1, b2, mode)   # its costs for a block shape

The registry normalises pntk to an o = 1 trace kernel before it calls any of them, so a method
never sees ``Mode.PNTK``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline.config import Mode
from pipeline.models import FunctionalModel


@dataclass(frozen=True)
class Probe:
    """A block's model and first samples, as the cost estimates see them (after pntk is normalised)."""

    fm: FunctionalModel
    x: torch.Tensor  # (<= 2, ...): the block's first samples, in the compute dtype (token ids stay integers)
    o: int  # outputs per sample
    fp: int  # FLOPs of one forward pass on one sample
    p: int  # trainable parameters
    itemsize: int  # bytes per value of the parameters (and so of Jacobians and kernels)
    sample_numel: int  # values per input sample


class NtkMethod(Protocol):
    """The interface of one method module (pipeline.methods.structured, .jacobian_contraction, ...)."""

    def side(self, fm: FunctionalModel, x: torch.Tensor) -> Any: ...

    def combine(self, fm: FunctionalModel, s1: Any, s2: Any | None, mode: Mode) -> torch.Tensor: ...

    def flops(self, probe: Probe, b1: int, b2: int, mode: Mode, diagonal: bool) -> float: ...

    def memory(self, probe: Probe, b1: int, b2: int, mode: Mode) -> int: ...
