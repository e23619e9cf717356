"""Model spec -> nn.Module in eval mode, split into trainable parameters and fixed state.

    fm = FunctionalModel(build_model(spec))
    fm(fm.params, x)  # (n, o): the model's outputs, flattened per sample

The NTK is taken over trainable parameters (``requires_grad=True``) only; frozen parameters and
buffers (BatchNorm running statistics) are held fixed, and the model runs in eval mode.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import math
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import IO, Any

import torch
from torch import nn
from torch.func import functional_call

from pipeline.config import ModelSpec
from pipeline.errors import ModelError, brief


def cnn(num_classes: int = 10) -> nn.Module:
    """The CNN of PyTorch's "Neural Tangent Kernels" tutorial; input (3, 32, 32)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, (3, 3)),
        nn.ReLU(),
        nn.Conv2d(32, 32, (3, 3)),
        nn.ReLU(),
        nn.Conv2d(32, 32, (3, 3)),
        nn.Flatten(),
        nn.Linear(21632, num_classes),  # 32 channels x 26 x 26
    )


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "erf": nn.GELU, "sigmoid": nn.Sigmoid}


def mlp(
    in_features: int = 784,
    hidden: list[int] | tuple[int, ...] = (512, 512),
    out_features: int = 10,
    activation: str = "relu",
    bias: bool = True,
) -> nn.Module:
    """A fully connected net; the input is flattened first, so images work as they are."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    widths = [in_features, *hidden]
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b, bias=bias), _ACTIVATIONS[activation]()]
    layers.append(nn.Linear(widths[-1], out_features, bias=bias))
    return nn.Sequential(*layers)


BUILTINS = {"cnn": cnn, "mlp": mlp}


def _import_target(target: str, search_path: str | None) -> Any:
    module_name, attr = target.split(":")
    if search_path and search_path not in sys.path:
        sys.path.insert(0, search_path)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or any error raised while the user's module runs
        raise ModelError("model.target", f"cannot import {module_name!r}: {brief(err)}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelError("model.target", f"module {module_name!r} has no attribute {attr!r}") from None


def build_model(spec: ModelSpec, search_path: str | None = None) -> nn.Module:
    """Build the model a spec names, load its checkpoint, and put it in eval mode.

    Args:
      spec: the ``model`` section of a config.
      search_path: a folder put on ``sys.path`` for ``target`` (the config file's folder).

    Returns:
      The module, on the CPU, in eval mode.
    """
    if spec.builtin is not None:
        factory: Any = BUILTINS[spec.builtin]
        where = f"builtin {spec.builtin!r}"
    else:
        assert spec.target is not None  # guaranteed by ModelSpec's validator
        factory = _import_target(spec.target, search_path)
        where = repr(spec.target)
        if not callable(factory):
            raise ModelError("model.target",
                             f"{where} is a {type(factory).__name__}, not an nn.Module class or factory")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        try:
            model = factory(**spec.kwargs)
        except Exception as err:
            raise ModelError("model.kwargs", f"{where} failed with kwargs {spec.kwargs!r}: {brief(err)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError("model.target", f"{where} returned a {type(model).__name__}, not an nn.Module")
    if spec.checkpoint is not None:
        load_checkpoint(model, spec.checkpoint)
    return model.eval()


def load_tensors(f: str | IO[bytes]) -> Any:
    """What a torch.save file holds, read with ``weights_only=True`` (tensors and plain containers, never
    code), on the CPU. The one torch.load: quiet about a pickle protocol other than torch.save's own,
    which torch warns of even when the file loads (one it cannot read raises)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(f, map_location="cpu", weights_only=True)


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state_dict file into ``model`` (weights_only, strict)."""
    try:
        state = load_tensors(path)
    except Exception as err:
        raise ModelError("model.checkpoint", f"cannot load {path}: {brief(err)}") from None
    if not isinstance(state, dict):
        raise ModelError("model.checkpoint", f"{path} holds a {type(state).__name__}, expected a state_dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError("model.checkpoint", f"{path} does not fit the model: {err}") from None


class FunctionalModel:
    """A module seen as a function of its trainable parameters: ``f(params, x) -> (n, o)``.

    Frozen parameters and buffers are closed over as constants. Picklable, so Ray can ship it.
    """

    def __init__(self, module: nn.Module, output: str | int | None = None) -> None:
        self.module = module
        self.params = {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}
        frozen = {k: v.detach() for k, v in module.named_parameters() if not v.requires_grad}
        self.fixed = {**frozen, **{k: v.detach() for k, v in module.named_buffers()}}
        self.summed = False  # True: f(x) = sum_a f_a(x) / sqrt(o), whose NTK is the pNTK
        self.output = output  # what to take from the module's output (``model.output``); None: it as it is
        # Transforms the model does not support, decided on a probe (pipeline.methods.capabilities):
        # "vmap" and/or "forward_ad" -> why; the methods then take their vmap-free / reverse-mode paths.
        self.fallbacks: dict[str, str] = {}

    @property
    def itemsize(self) -> int:
        """Bytes per value of the parameters (and so of Jacobians and kernels): not the inputs', which may be ids."""
        return next(iter(self.params.values())).element_size() if self.params else 4

    @property
    def params_dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype if self.params else torch.float32

    @property
    def p(self) -> int:
        """Number of trainable parameters."""
        return sum(v.numel() for v in self.params.values())

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = select_output(functional_call(self.module, (params, self.fixed), (x,)), self.output)
        out = out.reshape(x.shape[0], -1)  # (n, o)
        if self.summed:
            return out.sum(1, keepdim=True) / math.sqrt(out.shape[1])  # (n, 1)
        return out

    def sum_of_logits(self) -> FunctionalModel:
        """The model x -> sum_a f_a(x) / sqrt(o): its NTK is the pNTK (Mohamadi et al., ICML 2023)."""
        new = copy.copy(self)
        new.summed = True
        return new

    def to(self, device: torch.device | str, dtype: torch.dtype) -> FunctionalModel:
        """A copy on ``device`` in ``dtype`` (floating tensors only)."""
        moved = FunctionalModel(copy.deepcopy(self.module).to(device=device, dtype=dtype), self.output)
        moved.summed, moved.fallbacks = self.summed, dict(self.fallbacks)
        return moved


def probe_key(fm: FunctionalModel, x: torch.Tensor) -> tuple[Any, ...]:
    """What a probe of a model on inputs like x depends on (cached per module object under it): the
    samples' shape, dtype and device, the module tree and which parameters are trainable, with shapes."""
    mods = tuple((name, type(m).__name__) for name, m in fm.module.named_modules())
    params = tuple((k, tuple(v.shape)) for k, v in fm.params.items())
    return tuple(x.shape[1:]), x.dtype, x.device.type, fm.summed, fm.output, mods, params


def select_output(out: Any, output: str | int | None) -> torch.Tensor:
    """The tensor ``model.output`` names in a model's output: an attribute or key (``"logits"`` of a
    Hugging Face ``ModelOutput``), a tuple index, or (None) the output itself.

    Raises:
      ModelError: naming ``model.output`` and what the output holds instead.
    """
    picked = out
    if output is not None:
        try:
            if isinstance(out, Mapping):
                picked = out[output]
            elif isinstance(out, tuple | list) and isinstance(output, int):
                picked = out[output]
            else:
                picked = getattr(out, str(output))
        except (KeyError, IndexError, AttributeError, TypeError):
            raise ModelError("model.output", f"the model's output has no {output!r}; it holds "
                             f"{describe_output(out)}") from None
    if not isinstance(picked, torch.Tensor):
        hint = "set model.output to one of them" if output is None else "name a tensor in it"
        raise ModelError("model.output", f"the model returns {describe_output(picked)}, not a tensor; {hint}")
    return picked


def describe_output(out: Any) -> str:
    """What a model's output holds, for an error: its keys, or the types at its tuple indices."""
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys " + ", ".join(repr(k) for k in out)
    if isinstance(out, tuple | list):
        return f"a {type(out).__name__} of " + ", ".join(f"[{i}] {type(v).__name__}" for i, v in enumerate(out))
    tensors = [k for k, v in vars(out).items() if isinstance(v, torch.Tensor)] if hasattr(out, "__dict__") else []
    name = type(out).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}" + (" with tensor attributes " + ", ".join(repr(k) for k in tensors) if tensors else "")


def cast_input(x: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """Inputs in the compute dtype; integer inputs (token ids for an Embedding) stay integers."""
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device=device)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then the caller's training flags back."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags.items():
            m.training = training


def batchable_attention(fm: FunctionalModel) -> contextlib.AbstractContextManager[Any]:
    """On the CPU, ``scaled_dot_product_attention`` in its math form for the duration. torch's fused CPU
    attention kernel and its backward have no batching rule, so under vmap or an o-batched backward they
    run once per batch element (functorch's fallback, with a warning); the math form batches. About 1.4x
    (ViT) to 2.9x (BERT) faster per structured side in the real-models benchmark; values differ from the
    fused kernel's in the last bits. Elsewhere (CUDA) torch's choice stands."""
    if fm.params and next(iter(fm.params.values())).device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def fingerprint_module(module: nn.Module) -> str:
    """sha256 over every parameter and buffer: names, shapes, dtypes, trainable flags, values."""
    h = hashlib.sha256()
    state: list[tuple[str, torch.Tensor, bool]] = [(k, v, v.requires_grad) for k, v in module.named_parameters()]
    state += [(k, v, False) for k, v in module.named_buffers()]
    for name, tensor, trainable in sorted(state, key=lambda t: t[0]):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{trainable}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def forward_flops(fm: FunctionalModel, x: torch.Tensor) -> int:
    """FLOPs of one forward pass on one sample (matmuls and convolutions, as torch counts them; the
    matrix products of RNN layers whose fused kernels it does not see, counted from their weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    missed: list[int] = []
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        rnns = [m for m in fm.module.modules() if isinstance(m, nn.RNNBase)]
        handles = [h for m in rnns for h in _rnn_counter(m, counter, missed)]
        try:
            fm(fm.params, x[:1])
        finally:
            for h in handles:
                h.remove()
    return max(int(counter.get_total_flops()) + sum(missed), 1)


def _rnn_counter(m: nn.RNNBase, counter: Any, missed: list[int]) -> list[Any]:
    """Hooks that add an RNN layer's gate products (2 x weights x time steps) to ``missed`` when the
    counter saw none of its FLOPs (CPU and cuDNN run them in one fused kernel)."""
    before: list[int] = []

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        before.append(int(counter.get_total_flops()))

    def post(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if int(counter.get_total_flops()) > before.pop():
            return
        a = args[0]
        if isinstance(a, nn.utils.rnn.PackedSequence):
            steps = int(a.data.shape[0])  # time steps summed over the batch
        else:
            steps = int(a.shape[0]) if a.ndim == 2 else int(a.shape[0] * a.shape[1])
        weights = sum(p.numel() for name, p in module.named_parameters() if name.startswith("weight"))
        missed.append(2 * weights * steps)

    return [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
