"""The NTK methods: one module per method behind one registry, four modes, one pntk normalisation.

    K = empirical_ntk(model, x1, x2, method="structured", mode="full")            # (n1, n2, o, o)
    K == empirical_ntk(model, x1, x2, method="jacobian_contraction", mode="full")  # to float tolerance

K[i, j, a, b] = <d f_a(x1_i) / d theta, d f_b(x2_j) / d theta>, theta = the trainable parameters.
Modes (pipeline.config.Mode): full (n1, n2, o, o); trace (n1, n2), the sum over a = b; diagonal
(n1, n2, o), the a = b entries; pntk (n1, n2), the NTK of sum_a f_a / sqrt(o) (Mohamadi, Bae,
Sutherland, ICML 2023), at the cost of an o = 1 kernel: ``normalise`` is the one place it becomes that
(``normalise_shape``, its half without a model, gives the mode and o alone, for counts from a record).

Methods (``REGISTRY``; each module's docstring gives its cost model and when it wins):
- structured: per-layer rules from the layers' inputs and output cotangents (Novak et al. 2022); the
  default choice wherever most parameters sit in Linear, Conv, norm or Embedding layers.
- jacobian_contraction: per-sample Jacobians, contracted: N·O·[FP] + N²·O²·P.
- ntk_vector_products: a vjp and O jvps per pair: N²·O·[FP], no Jacobians in memory.
``auto`` (pipeline.methods.auto) picks one per run from these modules' cost estimates and a timing.

Adding a method takes three things: a new module with ``side``, ``combine``, ``flops`` and ``memory``
(pipeline.methods.base); a member of ``pipeline.config.Method`` naming it (the StrEnum that
``ntk.method``, the store's record and the CLI's choices are checked against; config cannot import this
registry, which imports config); and one line in ``REGISTRY``. Nothing else lists the methods: ``auto``
and ``bench`` take every registered one, the costs come from the modules, and ``verify`` cross-checks a
store with ``cross_check`` (the first registered method but the recorded one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import Method, Mode
from pipeline.jacobians import single
from pipeline.methods import jacobian_contraction, ntk_vector_products, structured
from pipeline.methods.base import NtkMethod, Probe
from pipeline.methods.capabilities import check_model
from pipeline.models import FunctionalModel, batchable_attention, cast_input, eval_mode, forward_flops
from pipeline.plan import held_kernel_bytes
from pipeline.precision import float32_precision

# Ties in ``auto`` go in this order.
REGISTRY: dict[Method, NtkMethod] = {
    Method.STRUCTURED: structured,
    Method.JACOBIAN_CONTRACTION: jacobian_contraction,
    Method.NTK_VECTOR_PRODUCTS: ntk_vector_products,
}
METHODS: tuple[Method, ...] = tuple(REGISTRY)
MODES: tuple[Mode, ...] = tuple(m for m in Mode if m != Mode.FEATURES)  # the kernels (features: pipeline.features)


def cross_check(recorded: str) -> Method:
    """The method ``verify --config --sample`` recomputes a store's blocks with: the first registered
    method other than ``recorded`` (structured -> jacobian_contraction; jacobian_contraction and
    ntk_vector_products -> structured), so that a wrong block is not reproduced by the code that wrote
    it. Every registered method runs on any model the capability probe passes (each takes its own path
    around a missing transform, ``FunctionalModel.fallbacks``), so the first other one can; with a single
    method registered it is that one.
    """
    return next((m for m in REGISTRY if m != recorded), parse_method(recorded))


def parse_method(method: str) -> Method:
    """A registered method by name; ValueError naming the choices (``auto`` is not a method module)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {str(method)!r}")
    return Method(method)


def parse_mode(mode: str) -> Mode:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {str(mode)!r}")
    return Mode(mode)


def normalise(fm: FunctionalModel, mode: str) -> tuple[FunctionalModel, Mode]:
    """The model and mode a method computes: pntk is the trace kernel of x -> sum_a f_a(x) / sqrt(o)."""
    computed, _ = normalise_shape(mode, 1)
    return (fm if computed == mode else fm.sum_of_logits()), computed


def normalise_shape(mode: str, o: int) -> tuple[Mode, int]:
    """``normalise`` without a model: the mode and outputs per sample a method computes for ``mode`` on a
    model of ``o`` outputs: (trace, 1) for pntk, else (mode, o). What a count from a store's record (whose
    ``o`` is the model's) or a bench passes to ``plan.contraction_flops``."""
    if parse_mode(mode) == Mode.PNTK:
        return Mode.TRACE, 1
    return Mode(mode), o


# The functions below take a Method and a Mode, or their names (users' strings), checked by parse_*.


def side(fm: FunctionalModel, x: torch.Tensor, method: str, mode: str) -> Any:
    """What a block needs from one side (its rows or columns), computed once and reused across the
    blocks of a strip: per-layer inputs and cotangents (structured), per-sample Jacobians
    (jacobian_contraction), or the inputs themselves (ntk_vector_products)."""
    impl = REGISTRY[parse_method(method)]
    fm, _ = normalise(fm, mode)
    with torch.no_grad(), batchable_attention(fm):  # the methods switch gradients on where they need them
        return impl.side(fm, x)


def combine(fm: FunctionalModel, s1: Any, s2: Any | None, method: str, mode: str) -> torch.Tensor:
    """The block between two sides (``s2=None``: K(x1, x1)).

    Returns:
      (n1, n2, o, o) for full, (n1, n2) for trace and pntk, (n1, n2, o) for diagonal.
    """
    impl = REGISTRY[parse_method(method)]
    fm, mode = normalise(fm, mode)
    with torch.no_grad(), batchable_attention(fm):
        return impl.combine(fm, s1, s2, mode).contiguous()


def compute_block(fm: FunctionalModel, x1: torch.Tensor, x2: torch.Tensor | None, method: str,
                  mode: str) -> torch.Tensor:
    """One block of the kernel; ``x2=None`` means K(x1, x1): one side serves both.

    Returns:
      (n1, n2, o, o) for full, (n1, n2) for trace and pntk, (n1, n2, o) for diagonal.
    """
    s1 = side(fm, x1, method, mode)  # checks the method and the mode
    return combine(fm, s1, None if x2 is None else side(fm, x2, method, mode), method, mode)


def probe(fm: FunctionalModel, x: torch.Tensor, mode: str) -> tuple[Probe, Mode]:
    """The (pntk-normalised) model on a block's first samples, for the cost estimates."""
    fm, mode = normalise(fm, mode)
    o = single(fm, fm.params, x[0]).numel()
    return Probe(fm, x[:2], o, forward_flops(fm, x), fm.p, fm.itemsize, int(x[0].numel())), mode


def estimate_flops(fm: FunctionalModel, x: torch.Tensor, b1: int, b2: int, mode: str,
                   diagonal: bool = False) -> dict[Method, float]:
    """Estimated FLOPs of one b1 x b2 block for each method, in ``METHODS`` order."""
    pr, mode = probe(fm, x, mode)
    return {m: impl.flops(pr, b1, b2, mode, diagonal) for m, impl in REGISTRY.items()}


def task_memory(fm: FunctionalModel, x: torch.Tensor, method: str, b1: int, b2: int, mode: str) -> int:
    """Estimated peak bytes of one b1 x b2 block task: its inputs, the kernel blocks it holds
    (``plan.held_kernel_bytes``) and the method's working memory."""
    impl = REGISTRY[parse_method(method)]
    pr, mode = probe(fm, x, mode)
    inputs = (b1 + b2) * pr.sample_numel * pr.itemsize
    return inputs + held_kernel_bytes(b1, b2, pr.o, mode, pr.itemsize) + impl.memory(pr, b1, b2, mode)


def jacobian_bytes(fm: FunctionalModel, x: torch.Tensor, b1: int, b2: int, mode: str, diagonal: bool) -> int:
    """Bytes of a block's per-sample Jacobians (one set on a diagonal block): ``auto``'s memory guard."""
    return jacobian_contraction.jacobian_bytes(probe(fm, x, mode)[0], b1, b2, diagonal)


def outputs(fm: FunctionalModel, x: torch.Tensor, mode: str) -> int:
    """o as the stored kernel counts it: the model's outputs per sample, 1 for pntk."""
    return single(normalise(fm, mode)[0], fm.params, x[0]).numel()


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *, method: str = "auto",
                  mode: str = "full", output: str | int | None = None, precision: str = "highest") -> torch.Tensor:
    """The empirical NTK of ``model`` between x1 and x2, in memory.

    The model runs in eval mode (its training flags are restored after); the kernel is taken over
    parameters with ``requires_grad=True``; frozen parameters and buffers are held fixed. Computes
    in the dtype and on the device of the model's parameters.

    Args:
      model: any nn.Module mapping a batch (n, ...) to outputs (n, ...), flattened to (n, o).
      x1: (n1, ...) inputs.
      x2: (n2, ...) inputs, or None for K(x1, x1).
      method: "auto" (by the cost model alone, no timing), "structured", "jacobian_contraction" or
        "ntk_vector_products".
      mode: "full", "trace", "diagonal" or "pntk".
      output: what to take from the model's output: an attribute or key (``"logits"`` of a Hugging
        Face model), a tuple index, or None for a model that returns a tensor.
      precision: "highest" (float32 products in float32) or "tf32" (TensorFloat-32 matrix products
        and cuDNN convolutions on GPUs that have them; float32 models only); the process's own
        setting is put back after (pipeline.precision).

    Returns:
      (n1, n2, o, o) for full, (n1, n2) for trace and pntk, (n1, n2, o) for diagonal.
    """
    from pipeline.methods.auto import estimated_choice  # auto reads this registry

    with eval_mode(model), float32_precision(precision):
        fm = FunctionalModel(model, output)
        ref = next(iter(fm.params.values()), x1)
        if precision == "tf32" and ref.dtype != torch.float32:
            raise ValueError(f"precision: tf32 applies to float32 products, and the model's parameters are {ref.dtype}")
        x1 = cast_input(x1, ref.dtype, ref.device)
        x2 = None if x2 is None else cast_input(x2, ref.dtype, ref.device)
        check_model(fm, x1)
        if method == Method.AUTO:
            method = estimated_choice(fm, x1, x2, parse_mode(mode))
        return compute_block(fm, x1, x2, method, mode)


__all__ = ["METHODS", "MODES", "REGISTRY", "check_model", "combine", "compute_block", "cross_check", "empirical_ntk",
           "estimate_flops", "jacobian_bytes", "normalise", "normalise_shape", "outputs", "side", "task_memory"]
