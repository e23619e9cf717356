"""A model's functional fingerprint: what it computes on a few fixed rows, recorded when a store is
created and recomputed by a resume (and by ``verify --config``), so that one kernel never mixes two
functions.

    f = function_fingerprint(p)                    # outputs on x1[0:2] (and x2[0:2]), a 2 x 2 block, sources
    function_mismatch(recorded, f, "float32")      # None, or what differs, as one phrase

The sha256 fingerprints of the parameters and inputs say that the weights and the data are the same;
this says that the code is: the same weights under an edited ``forward`` (``torch.tanh`` ->
``torch.sin``) compute another kernel. The outputs and the probe block decide, compared with a
tolerance keyed by dtype relative to their magnitude, not bit for bit: a resume may run on another
machine or with another thread count, whose BLAS sums in another order. When the outputs differ, the
message names the source files that changed. When they agree but a source file changed, a resume is
refused too (``edited_source=False``): a few rows agreeing does not show that an edited ``forward``
computes the same on the others (``torch.where(x[:, 0] > 2, sin, tanh)``); the user who knows the edit
changes nothing (a comment) says so (``run --allow-edited-source``). ``verify --config`` recomputes
blocks itself and only notes the change. Cost: one forward pass over ``ROWS`` rows of each input and
one ``ROWS`` x ``ROWS`` block with the run's method.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Mode, ModelSpec
from pipeline.errors import ModelError, PipelineError, brief
from pipeline.features import sketch_function
from pipeline.methods import compute_block
from pipeline.models import cast_input
from pipeline.prepare import Prepared, split_mismatch
from pipeline.store.format import Function, Provenance, SourceFile, Values

ROWS = 2  # rows 0:ROWS of x1 (and of x2)
SAMPLE = 64  # values kept per tensor, at evenly spaced flat indices; its norm and sum cover all of them
# Relative to the largest magnitude of each tensor: far above the rounding of the same computation
# summed in another order, far below what another function gives.
TOLERANCE = {"float32": 1e-4, "float64": 1e-9}


def function_fingerprint(p: Prepared) -> Function:
    """The functional fingerprint of a prepared run: its model's outputs on rows 0:ROWS of x1 (and x2)
    and the block K(x1[0:ROWS], x2[0:ROWS]) (x1's rows again for K(x1, x1)), with the run's method,
    mode and dtype, on the CPU, and the sha256 of the model's source files."""
    rows = min(ROWS, p.x1.n, p.x1.n if p.x2 is None else p.x2.n)
    a = p.rows(0, rows)
    c = None if p.x2 is None else cast_input(p.x2.read(0, rows), p.dtype)
    with torch.no_grad():
        out1 = p.fm(p.fm.params, a)  # (rows, o)
        out2 = None if c is None else p.fm(p.fm.params, c)
    try:
        if p.config.ntk.mode == Mode.FEATURES:  # a feature run's "block": the rows' features, (rows[, o], k)
            f = p.config.ntk.sketch
            split = p.split if p.split is not None else {}  # always set for a feature run (prepare)
            block = sketch_function(p.fm, a, f.k, f.seed, f.of, projection=f.projection, split=split)
        else:
            block = compute_block(p.fm, a, c, p.method, p.config.ntk.mode)  # (rows, rows[, o[, o]])
    except PipelineError:
        raise
    except Exception as err:  # before anything is written: one line, not a traceback
        raise ModelError("model", f"the kernel block of x1 rows 0:{rows} fails with {p.method}: {brief(err)}") \
            from None
    return Function(rows=rows, outputs_x1=summarize(out1), outputs_x2=None if out2 is None else summarize(out2),
                    block=summarize(block), sources=source_files(p.config.model, p.module))


def summarize(t: torch.Tensor) -> Values:
    """A tensor as the record keeps it: shape, up to SAMPLE values, norm and sum (in float64)."""
    flat = t.detach().to("cpu", torch.float64).reshape(-1).numpy()
    picks = np.unique(np.linspace(0, flat.size - 1, min(SAMPLE, flat.size)).round().astype(int)) if flat.size \
        else np.zeros(0, dtype=int)
    return Values(shape=tuple(int(d) for d in t.shape), values=tuple(float(v) for v in flat[picks]),
                  norm=float(np.linalg.norm(flat)), sum=float(flat.sum()))


def source_files(spec: ModelSpec, module: torch.nn.Module) -> tuple[SourceFile, ...]:
    """The source files of the module ``model.target`` names and of the module that defines the
    model's class (when another, and not torch's), with their sha256; () for a builtin model."""
    if spec.target is None:
        return ()
    names = [spec.target.split(":")[0], type(module).__module__]
    out = []
    for name in dict.fromkeys(names):
        if name.split(".")[0] in ("torch", "pipeline", "builtins"):
            continue
        found = _source_file(name)
        if found is not None:
            out.append(found)
    return tuple(out)


def _source_file(name: str) -> SourceFile | None:
    mod = sys.modules.get(name)
    try:
        path = inspect.getsourcefile(mod) if mod is not None else None
        data = Path(path).read_bytes() if path else None
    except (TypeError, OSError):  # a built-in or compiled module, or a file gone since
        return None
    if path is None or data is None:
        return None
    return SourceFile(module=name, file=path, sha256="sha256:" + hashlib.sha256(data).hexdigest())


def function_mismatch(recorded: Function, now: Function, dtype: str, *, edited_source: bool = True) -> str | None:
    """What differs between a recorded functional fingerprint and one taken now, as one phrase naming
    the rows and, when something differs, the source files changed since; None when it is the same
    function (within ``TOLERANCE[dtype]``). ``edited_source=False``: a changed source file is a
    difference even where the outputs and the block agree."""
    tol = TOLERANCE.get(dtype, TOLERANCE["float32"])
    rows = f"rows 0:{recorded.rows}"
    other = "x1" if recorded.outputs_x2 is None else "x2"
    parts = (("outputs_x1", f"the model's outputs on x1 {rows}"), ("outputs_x2", f"the model's outputs on x2 {rows}"),
             ("block", f"the kernel block K(x1 {rows}, {other} {rows})"))
    changed = source_changes(recorded, now)
    for key, what in parts:
        found = _difference(getattr(recorded, key), getattr(now, key), tol)
        if found:
            return f"{what} differ from the recorded run's ({found}){_changed(changed)}"
    if changed and not edited_source:
        return (f"{_files(changed)} changed since the store was created: the model's outputs and kernel block on "
                f"{rows} still agree, which does not show that it computes the same on the other rows; restore "
                "it, or rerun with --allow-edited-source if the edit does not change what the model computes")
    return None


def recorded_mismatch(p: Prepared, recorded: Provenance, *,
                      edited_source: bool = True) -> tuple[str | None, Function | None]:
    """After the config and fingerprints agree: whether ``p`` (``prepare_recorded``) is the run that wrote
    the store, as the split of k (a feature store) and then the function (``function_mismatch``) say.

    Returns:
      What differs (one phrase) or None, and the functional fingerprint taken now (None where the split
      already differs or the store records none: written before the record existed).
    """
    if recorded.features is not None:
        mismatch = split_mismatch(p, dict(recorded.features.split))
        if mismatch:
            return mismatch, None
    if recorded.function is None:
        return None, None
    now = function_fingerprint(p)
    return function_mismatch(recorded.function, now, recorded.dtype, edited_source=edited_source), now


def source_changes(recorded: Function, now: Function) -> list[str]:
    """The recorded source files whose sha256 differs now (a file gone or unreadable is not counted)."""
    current = {s.module: s for s in now.sources}
    return [r.file for r in recorded.sources if r.module in current and current[r.module].sha256 != r.sha256]


def _difference(recorded: Values | None, now: Values | None, tol: float) -> str | None:
    """How two recorded tensors differ beyond ``tol`` of their magnitude, or None."""
    if recorded is None or now is None:
        return None if recorded is now else "recorded " + ("none" if recorded is None else "some") + \
            ", now " + ("none" if now is None else "some")
    if recorded.shape != now.shape or len(recorded.values) != len(now.values):
        return f"shape {list(now.shape)}, recorded {list(recorded.shape)}"
    a, b = np.asarray(recorded.values, dtype=np.float64), np.asarray(now.values, dtype=np.float64)
    size = max(1, math.prod(recorded.shape))
    scale = max(float(np.max(np.abs(a), initial=0.0)), recorded.norm / math.sqrt(size), 1e-30)
    diff = np.where((a == b) | (np.isnan(a) & np.isnan(b)), 0.0, np.abs(a - b))
    worst = float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))
    if worst > tol * scale:
        return f"max abs diff {worst:.3g} where values reach {scale:.3g}; tolerance {tol:g} of that"
    if _far(recorded.norm, now.norm, tol * max(recorded.norm, 1e-30)):
        return f"norm {now.norm:.6g}, recorded {recorded.norm:.6g}"
    if _far(recorded.sum, now.sum, tol * max(recorded.norm * math.sqrt(size), 1e-30)):
        return f"sum {now.sum:.6g}, recorded {recorded.sum:.6g}"
    return None


def _far(x: float, y: float, atol: float) -> bool:
    if x == y or (math.isnan(x) and math.isnan(y)):
        return False
    return not abs(x - y) <= atol  # NaN against a number is far


def _files(changed: list[str]) -> str:
    return f"its source file{'s' if len(changed) > 1 else ''} {', '.join(changed)}"


def _changed(changed: list[str]) -> str:
    """``; its source file F changed`` for each file in ``changed``."""
    return f"; {_files(changed)} changed" if changed else ""


__all__ = ["ROWS", "SAMPLE", "TOLERANCE", "function_fingerprint", "function_mismatch", "recorded_mismatch",
           "source_changes", "source_files", "summarize"]
