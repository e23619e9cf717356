"""Which of torch.func's transforms a model supports, decided once on a probe of two samples.

    fallbacks = check_model(fm, x)     # {} for an MLP; {"vmap": "..."} for an LSTM
    fm.fallbacks                       # the same: the methods read it and take their fallback paths

- "vmap": per-sample Jacobians (jacobian_contraction, structured's fallback parameters) come from a
  loop of backward passes (``jacobians.loop_jacobians``), and NTK-vector products from per-sample
  gradients pair by pair. RNN kernels, in-place updates of a batch, data-dependent indexing and
  ``.item()`` land here.
- "forward_ad": NTK-vector products take J t through the backward pass twice (operators without
  forward-mode AD: PyTorch's fused attention and transformer kernels, weight_norm's interface).
- "double_backward" (only looked at without forward AD): NTK-vector products by the loop as well.

A model that not even the plain loop can differentiate is refused here, before anything is written.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import jacrev, jvp, vjp, vmap

from pipeline.errors import ModelError, brief
from pipeline.jacobians import single
from pipeline.methods.ntk_vector_products import jvp_by_double_vjp
from pipeline.models import FunctionalModel, batchable_attention, probe_key


def _tries(fm: FunctionalModel, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """Each transform nested as the methods nest it (vmap over samples, vmap over output directions
    inside), on the model's outputs projected onto two fixed directions V (2, o) to keep it cheap."""
    o = single(fm, fm.params, x[0]).numel()
    V = torch.randn(2, o, generator=torch.Generator().manual_seed(0)).to(fm.params_dtype).to(x.device)
    params = fm.params

    def f(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return V @ single(fm, p, xi)  # (2,)

    def per_sample_jacobians() -> Any:  # as jacobians(): vmap(jacrev) over samples
        return vmap(jacrev(f), (None, 0))(params, x)

    def vector_products(backward_only: bool) -> Any:  # as ntk_vector_products.combine, for pairs (x0, x_j)
        def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            vjp_fn = vjp(lambda p: f(p, a), params)[1]

            def one(vec: torch.Tensor) -> torch.Tensor:
                cotangent = vjp_fn(vec)[0]
                if backward_only:
                    return jvp_by_double_vjp(lambda p: f(p, b), params, cotangent)
                tangent: torch.Tensor = jvp(lambda p: f(p, b), (params,), (cotangent,))[1]
                return tangent

            result: torch.Tensor = vmap(one)(torch.eye(2, dtype=V.dtype, device=V.device))
            return result

        return vmap(pair, (None, 0))(x[0], x)

    return {"vmap": per_sample_jacobians, "forward_ad": lambda: vector_products(False),
            "double_backward": lambda: vector_products(True)}


# Per module object (weakly: it goes when the module goes) and probe_key: the fallbacks found.
_FOUND: weakref.WeakKeyDictionary[nn.Module, dict[Any, dict[str, str]]] = weakref.WeakKeyDictionary()


def check_model(fm: FunctionalModel, x: torch.Tensor) -> dict[str, str]:
    """Probe the transforms on (up to) two samples of x and set ``fm.fallbacks``: transform -> why not.
    Probed once per module and kind of input (``models.probe_key``): repeated empirical_ntk calls on
    one model pay for it once.

    Raises:
      ModelError: ``model``: not even one backward pass per output works (the model cannot be differentiated).
    """
    cache = _FOUND.setdefault(fm.module, {})
    key = probe_key(fm, x)
    if key not in cache:
        cache[key] = _probe(fm, x)
    fm.fallbacks = dict(cache[key])
    return fm.fallbacks


def _probe(fm: FunctionalModel, x: torch.Tensor) -> dict[str, str]:
    probe = x[:2]
    fallbacks: dict[str, str] = {}
    tries = _tries(fm, probe)

    def fails(name: str) -> bool:
        # With attention in the form the methods run it (models.batchable_attention), and without
        # functorch's per-operator "performance drop" warnings: the probe's two samples are not the run.
        try:
            with torch.no_grad(), batchable_attention(fm), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="There is a performance drop")
                tries[name]()
        except Exception as err:
            fallbacks[name] = brief(err)
            return True
        return False

    # Without vmap every method takes its loop, and neither forward nor double backward matters.
    if not fails("vmap") and fails("forward_ad"):
        fails("double_backward")
    _check_backward(fm, probe[:1])
    return fallbacks


def _check_backward(fm: FunctionalModel, x: torch.Tensor) -> None:
    """One plain backward pass (what every fallback rests on), or ModelError saying why not."""
    params = {k: p.detach().requires_grad_(True) for k, p in fm.params.items()}
    try:
        with torch.enable_grad():
            out = fm(params, x)
            torch.autograd.grad(out.sum(), list(params.values()), allow_unused=True)
    except ModelError:
        raise
    except Exception as err:
        raise ModelError("model", f"cannot differentiate the model's outputs with respect to its parameters: "
                         f"{brief(err)}") from None
