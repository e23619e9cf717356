"""nn.LSTM, nn.GRU and nn.RNN: every layer (and direction) is two Linear maps applied at each of the T
time steps, ``W_ih x_t + b_ih`` and ``W_hh h_{t-1} + b_hh``, so its term is the Linear rule's over T
positions (linear.py), with the step inputs x_t and the previous states h_{t-1} as the inputs and the
cotangents of the two gate pre-activations as the cotangents.

PyTorch runs the whole recurrence in one fused kernel (that vmap cannot batch either), which exposes
neither. While the structured method records cotangents, the module runs a plain decomposition instead
(the gate equations, step by step) with zero perturbations on both pre-activations; the per-model check
against autograd on the module's own forward confirms that they agree, or the parameters fall back.
Sequences packed with ``pack_padded_sequence``, unbatched inputs and LSTM projections (``proj_size``)
keep the module's own forward and fall back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Mode
from pipeline.jacobians import accumulate
from pipeline.methods.structured.rules.base import Handle, Record, RestoreForward, Site, outer
from pipeline.methods.structured.rules.linear import linear_cost, linear_memory, linear_term, summed_memory

Pairs = list[tuple[torch.Tensor, torch.Tensor, str]]  # inputs A (n, T, K), cotangents G (o, n, T, C), "ih" / "hh"


class RecurrentRule:
    kind = "recurrent"
    types: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN)
    type_names: tuple[str, ...] = ()

    def eligible(self, module: nn.Module) -> bool:
        return not getattr(module, "proj_size", 0)

    def capture(self, site: Site, n: int, record: Record) -> Handle:
        m: Any = site.module

        def forward(input: Any, hx: Any = None) -> Any:
            if not isinstance(input, torch.Tensor) or input.dim() != 3:
                return type(m).forward(m, input, hx)  # not recorded: the per-model check rules the site out
            return _decomposed(m, record, input, hx)

        m.forward = forward  # the instance's forward, for the recording only
        return RestoreForward(m)

    def _pairs(self, site: Site, a: Any, g: Any) -> Pairs:
        """Per layer and direction: (x, g_ih, "ih...") and (h_prev, g_hh, "hh...") with the suffix of
        the parameter names (``_l0``, ``_l1_reverse``)."""
        m: Any = site.module
        out = []
        for k, suffix in enumerate(_suffixes(m)):
            x, h_prev = a[k]
            out += [(x, g[2 * k], f"ih{suffix}"), (h_prev, g[2 * k + 1], f"hh{suffix}")]
        return out

    def term(self, site: Site, a1: Any, g1: Any, a2: Any, g2: Any, mode: Mode) -> torch.Tensor:
        pairs = zip(self._pairs(site, a1, g1), self._pairs(site, a2, g2), strict=True)
        return accumulate(linear_term(A1, G1, A2, G2, mode, f"weight_{name}" in site.params,
                                      f"bias_{name}" in site.params)
                          for (A1, G1, name), (A2, G2, _) in pairs)

    def cost(self, site: Site, a: Any, g: Any, b1: int, b2: int, mode: Mode, samples: int) -> float:
        return sum(linear_cost(A, G, b1, b2, mode) for A, G, _ in self._pairs(site, a, g))

    def memory(self, site: Site, a: Any, g: Any, b1: int, b2: int, mode: Mode) -> int:
        pairs = self._pairs(site, a, g)
        result = b1 * b2 * outer(mode, pairs[0][1].shape[0]) * pairs[0][1].element_size()
        return summed_memory([linear_memory(A, G, b1, b2, mode) for A, G, _ in pairs], result)


def _suffixes(m: Any) -> list[str]:
    """The parameter name suffixes of each layer and direction, in PyTorch's order."""
    directions = ("", "_reverse") if m.bidirectional else ("",)
    return [f"_l{layer}{d}" for layer in range(m.num_layers) for d in directions]


def _decomposed(m: Any, record: Record, input: torch.Tensor, hx: Any) -> tuple[torch.Tensor, Any]:
    """The module's forward in plain operations, batch first inside, recording each layer's step inputs
    and previous states and perturbing both gate pre-activations at every step."""
    x = input if m.batch_first else input.transpose(0, 1)  # (n, T, K)
    lstm = isinstance(m, nn.LSTM)
    h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
    inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    leaves: list[torch.Tensor] = []
    finals: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    directions = 2 if m.bidirectional else 1
    for layer in range(m.num_layers):
        outs = []
        for d in range(directions):
            k = layer * directions + d
            state = (None if h0 is None else h0[k], None if c0 is None else c0[k])
            h_seq, final, recorded, perturbations = _layer(m, x, _suffixes(m)[k], state, reverse=d == 1)
            outs.append(h_seq)
            finals.append(final)
            inputs.append(recorded)
            leaves += perturbations
        x = outs[0] if directions == 1 else torch.cat(outs, dim=2)
    record(tuple(inputs), leaves)
    out = x if m.batch_first else x.transpose(0, 1)
    h_n = torch.stack([h for h, _ in finals])
    if lstm:
        return out, (h_n, torch.stack([c for _, c in finals if c is not None]))
    return out, h_n


def _layer(m: Any, x: torch.Tensor, suffix: str, state: tuple[torch.Tensor | None, torch.Tensor | None],
           reverse: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None],
                                   tuple[torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    """One layer and direction over x (n, T, K): its outputs (n, T, H), final (h, c), the recorded step
    inputs and previous states, and the two perturbations (n, T, G H)."""
    n, steps = x.shape[0], x.shape[1]
    w_hh, b_hh = getattr(m, f"weight_hh{suffix}"), getattr(m, f"bias_hh{suffix}", None)
    gi = F.linear(x, getattr(m, f"weight_ih{suffix}"), getattr(m, f"bias_ih{suffix}", None))  # (n, T, G H)
    e_ih = torch.zeros_like(gi, requires_grad=True)
    e_hh = torch.zeros_like(gi, requires_grad=True)
    gi = gi + e_ih
    h = x.new_zeros(n, m.hidden_size) if state[0] is None else state[0]
    c = x.new_zeros(n, m.hidden_size) if state[1] is None and isinstance(m, nn.LSTM) else state[1]
    hs: list[torch.Tensor] = [h] * steps
    prev: list[torch.Tensor] = [h] * steps
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        prev[t] = h
        gh = F.linear(h, w_hh, b_hh) + e_hh[:, t]
        h, c = _cell(m, gi[:, t], gh, h, c)
        hs[t] = h
    recorded = (x.detach(), torch.stack(prev, dim=1).detach())
    return torch.stack(hs, dim=1), (h, c), recorded, [e_ih, e_hh]


def _cell(m: Any, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor,
          c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step from the two pre-activations (n, G H) and the state h: the new h (and the LSTM's cell c)."""
    if isinstance(m, nn.LSTM) and c is not None:
        i, f, g, o = (gi + gh).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if isinstance(m, nn.GRU):
        ri, zi, ni = gi.chunk(3, dim=1)
        rh, zh, nh = gh.chunk(3, dim=1)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        new = torch.tanh(ni + r * nh)
        return (1 - z) * new + z * h, None
    act = torch.tanh if m.nonlinearity == "tanh" else torch.relu
    return act(gi + gh), None


RULE = RecurrentRule()
