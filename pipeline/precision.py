"""``ntk.precision``: how float32 matrix products and convolutions run, set for a block's computation
and put back after, so that a worker process another run reuses is not left in TF32.

    with float32_precision("tf32"):          # cuBLAS matmuls and cuDNN convolutions in TensorFloat-32
        K = compute_block(...)
    torch.get_float32_matmul_precision()     # what it was before, again

"highest" (the default): float32 products in float32 (24-bit significands). "tf32": on NVIDIA GPUs
from Ampere on, each float32 input of a matrix product or convolution is rounded to TensorFloat-32
(10 explicit mantissa bits, so a relative rounding of up to 2**-11 per input) and the products are
summed in float32: several times faster, at about 1e-3 relative error per product. Torch's own
switches: ``torch.set_float32_matmul_precision`` ("highest" / "high") for matrix products, which
leaves convolutions alone, and ``torch.backends.cudnn.allow_tf32`` for cuDNN's convolutions (True
in a fresh process: "highest" sets it False, so a highest run's convolutions are float32 too). On a
CPU neither changes the float32 products torch computes here (checked bit for bit on x86).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import torch

PRECISIONS = ("highest", "tf32")
# ntk.precision -> (torch's float32 matmul precision, cuDNN's allow_tf32 for convolutions)
_SETTINGS = {"highest": ("highest", False), "tf32": ("high", True)}


def _saved() -> Callable[[], None]:
    """A function that puts back the process's float32 matmul and cuDNN convolution settings as they
    are now. Torch >= 2.9 also has per-backend settings (``fp32_precision``); where code in this
    process mixed those with the legacy ones, torch refuses to read the legacy ones, and the
    per-backend values are kept instead."""
    try:
        matmul = torch.get_float32_matmul_precision()

        def put_matmul() -> None:
            torch.set_float32_matmul_precision(matmul)
    except RuntimeError:  # "mix of the legacy and new APIs": keep the new API's value
        backend = torch.backends.cuda.matmul.fp32_precision

        def put_matmul() -> None:
            torch.backends.cuda.matmul.fp32_precision = backend
    try:
        conv: bool | str = torch.backends.cudnn.allow_tf32
        attribute, holder = "allow_tf32", torch.backends.cudnn
    except RuntimeError:
        holder = torch.backends.cudnn.conv  # type: ignore[attr-defined]  # torch >= 2.9, untyped
        conv, attribute = holder.fp32_precision, "fp32_precision"

    def put() -> None:
        put_matmul()
        setattr(holder, attribute, conv)

    return put


@contextlib.contextmanager
def float32_precision(precision: str) -> Iterator[None]:
    """Run the body with float32 products at ``precision`` ("highest" or "tf32"), then restore the
    process's settings (also when the body raises).

    Raises:
      ValueError: an unknown precision (the config refuses it first, naming ``ntk.precision``).
    """
    if precision not in _SETTINGS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    matmul, conv = _SETTINGS[precision]
    put_back = _saved()
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = conv
    try:
        yield
    finally:
        put_back()


class _Task(Protocol):
    precision: str


TaskT = TypeVar("TaskT", bound=_Task)
BlocksT = TypeVar("BlocksT")
ResultT = TypeVar("ResultT")


def at_task_precision(run: Callable[[TaskT, BlocksT], ResultT]) -> Callable[[TaskT, BlocksT], ResultT]:
    """``run(task, blocks)`` under ``float32_precision(task.precision)``: the worker's strip function,
    wherever an executor runs it."""

    @functools.wraps(run)
    def wrapped(task: TaskT, blocks: BlocksT) -> ResultT:
        with float32_precision(task.precision):
            return run(task, blocks)

    return wrapped


__all__ = ["PRECISIONS", "at_task_precision", "float32_precision"]
