"""Small models for the tests, importable as ``nets:...`` by config ``target`` (tests/ is on the path)."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn


def small_mlp(d_in: int = 6, width: int = 8, o: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, o))


class ConvBN(nn.Module):
    """A small conv net with BatchNorm (eval mode: running stats) and one frozen parameter."""

    def __init__(self, channels: int = 3, o: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, o)
        self.conv2.bias.requires_grad_(False)  # a frozen parameter: held fixed, not in the NTK
        with torch.no_grad():  # non-trivial running statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.tanh(self.conv2(h))
        return self.head(h.flatten(1))


def not_a_module() -> int:
    return 3


NOT_CALLABLE = 42


# ---------------------------------------------------------------------------------------------
# Models for the structured method's rules and its fallback (tests/test_methods.py)

VOCAB, SEQ, PAD = 11, 4, 0


class EmbedLN(nn.Module):
    """Token ids (n, SEQ) -> Embedding (with a padding row) -> LayerNorm -> Linear per position -> Linear."""

    def __init__(self, vocab: int = VOCAB, seq: int = SEQ, d: int = 5, o: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=PAD)
        self.ln = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)  # over (n, SEQ, d): a Linear at SEQ positions
        self.head = nn.Linear(seq * d, o)
        with torch.no_grad():  # a non-trivial elementwise affine
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.ln(self.emb(x))))
        return self.head(h.flatten(1))


class SinScale(nn.Module):
    """A module without a structured rule: its own parameters, used as x * scale + sin(x @ w)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + torch.sin(x @ self.w)


class CustomMLP(nn.Module):
    """Linear -> SinScale -> Linear: two rule sites around a fallback module."""

    def __init__(self, d_in: int = 6, width: int = 5, o: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.custom = SinScale(width)
        self.head = nn.Linear(width, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.custom(self.inp(x))))


class ConvGN(nn.Module):
    """(n, 2, 8) -> Conv1d (padded, strided) -> GroupNorm -> Linear."""

    def __init__(self, channels: int = 2, length: int = 8, o: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, 4, 3, padding=1, stride=2)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * ((length - 1) // 2 + 1), o)
        with torch.no_grad():
            self.gn.weight.uniform_(0.5, 1.5)
            self.gn.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.gn(self.conv(x))).flatten(1))


class TiedEmbedding(nn.Module):
    """Token ids (n, SEQ) -> Embedding -> mean over positions -> Linear whose weight IS the embedding's."""

    def __init__(self, vocab: int = 6, d: int = 4, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)
        self.out.weight = self.emb.weight  # tied: one parameter, used by two modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.ln(self.emb(x)).mean(1)))


class LinearTwice(nn.Module):
    """The same nn.Linear called twice per forward."""

    def __init__(self, d_in: int = 6, width: int = 5, o: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.shared = nn.Linear(width, width)
        self.head = nn.Linear(width, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.head(torch.tanh(self.shared(h)))


class SlowMLP(nn.Module):
    """A small MLP whose forward sleeps, so a run lasts long enough to be killed part-way."""

    def __init__(self, d_in: int = 4, o: int = 2, delay: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 6), nn.Tanh(), nn.Linear(6, o))
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.delay)
        return self.net(x)


class FailsInBlocks(nn.Module):
    """Runs on any rows without gradients (every input row passes the check before a run), and raises
    when a batch of ``block`` rows is differentiated: a model that fails only inside a block's task."""

    def __init__(self, d_in: int = 3, o: int = 2, block: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, o))
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.dim() == 2 and x.shape[0] == self.block:
            raise ValueError(f"cannot differentiate {self.block} rows at once\n(a second line of the reason)")
        return self.net(x)


class DieOnce(nn.Module):
    """Kills the process running it (once, and never the process that built it): a worker that dies."""

    def __init__(self, sentinel: str, d_in: int = 4, o: int = 2) -> None:
        super().__init__()
        import os

        self.net = nn.Sequential(nn.Linear(d_in, 6), nn.Tanh(), nn.Linear(6, o))
        self.sentinel = sentinel
        self.builder = os.getpid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os

        if os.getpid() != self.builder:
            try:
                os.remove(self.sentinel)  # atomic: of two workers that race here, exactly one dies
            except FileNotFoundError:
                return self.net(x)
            os._exit(1)
        return self.net(x)


# ---------------------------------------------------------------------------------------------
# Real architectures (tests/test_real_models.py): torch's attention and recurrent layers, weight
# norm, and Hugging Face models built from small configs (never downloaded)


class AttentionClf(nn.Module):
    """(n, S, d) -> nn.MultiheadAttention (self-attention, PyTorch's fused path in eval) -> mean -> Linear."""

    def __init__(self, d: int = 8, heads: int = 2, o: int = 3) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.att(x, x, x, need_weights=False)[0].mean(1))


class EncoderClf(nn.Module):
    """(n, S, d) -> nn.TransformerEncoderLayer -> mean over positions -> Linear."""

    def __init__(self, d: int = 8, heads: int = 2, norm_first: bool = False, o: int = 3) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.head = nn.Linear(d, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


class DecoderClf(nn.Module):
    """(n, S, d) -> memory tanh(Linear(x)) -> nn.TransformerDecoderLayer (self-attention causal when
    ``causal``, cross-attention on the memory) -> mean over positions -> Linear."""

    def __init__(self, d: int = 8, heads: int = 2, norm_first: bool = False, causal: bool = True, o: int = 3) -> None:
        super().__init__()
        self.causal = causal
        self.inp = nn.Linear(d, d)
        self.dec = nn.TransformerDecoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.head = nn.Linear(d, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = torch.tanh(self.inp(x))
        if not self.causal:
            return self.head(self.dec(x, memory).mean(1))
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.head(self.dec(x, memory, tgt_mask=mask, tgt_is_causal=True).mean(1))


class WeightNormClf(nn.Module):
    """(n, S, d) -> mean -> a weight-normed Linear (torch.nn.utils.parametrizations) -> tanh -> Linear."""

    def __init__(self, d: int = 8, o: int = 3) -> None:
        super().__init__()
        self.inp = nn.utils.parametrizations.weight_norm(nn.Linear(d, 6))
        self.head = nn.Linear(6, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inp(x.mean(1))))


class RNNClf(nn.Module):
    """(n, S, d) -> a 2-layer LSTM or GRU -> its last state -> Linear."""

    def __init__(self, kind: str = "lstm", d: int = 8, hidden: int = 6, o: int = 3) -> None:
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(d, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


HF_VOCAB, HF_SEQ = 300, 6  # a vocabulary of a few hundred, as the real-models issue asks


def gpt2_classifier(**config: object) -> nn.Module:
    """Hugging Face's GPT2ForSequenceClassification from a GPT2Config (2 layers, width 32); returns a ModelOutput."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    defaults = dict(vocab_size=HF_VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, num_labels=3,
                    pad_token_id=0, bos_token_id=1, eos_token_id=1, use_cache=False)
    return GPT2ForSequenceClassification(GPT2Config(**{**defaults, **config}))


def bert_classifier(**config: object) -> nn.Module:
    """Hugging Face's BertForSequenceClassification from a BertConfig (2 layers, width 32)."""
    from transformers import BertConfig, BertForSequenceClassification

    defaults = dict(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(BertConfig(**{**defaults, **config}))


class BackwardFails(nn.Module):
    """Runs forward, raises in backward: no method can differentiate it."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Broken.apply(self.lin(x))


class _Broken(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x * 2

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        raise RuntimeError("this operator has no backward")


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    hidden: torch.Tensor
    note: str = "not a tensor"


class DataclassOut(nn.Module):
    """Returns a plain dataclass (neither a mapping nor a tuple): model.output logits takes the logits."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> Out:
        return Out(self.lin(x), x)


class Pair(nn.Module):
    """Returns a tuple (logits, features): model.output 0 takes the logits."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), x


class ConvVariant(nn.Module):
    """One convolution of the given configuration -> tanh -> mean over positions -> Linear; inputs (n, 4, *L)."""

    def __init__(self, dims: int = 2, length: int = 7, o: int = 3, **conv: object) -> None:
        super().__init__()
        kind = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = kind(4, conv.pop("out", 4), conv.pop("kernel", 3), **conv)
        self.head = nn.Linear(self.conv.out_channels, o)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(2).mean(2))


class MaskedAttention(nn.Module):
    """nn.MultiheadAttention with masks: ``mask`` "causal" (a bool attn_mask), "float" (an additive
    attn_mask), "padding" (a key_padding_mask hiding each sample's last position) or "encoder_causal" (a
    TransformerEncoderLayer with is_causal); ``batch_first`` False takes (S, n, d)."""

    def __init__(self, mask: str = "causal", batch_first: bool = True, d: int = 8, o: int = 3) -> None:
        super().__init__()
        self.mask, self.batch_first = mask, batch_first
        if mask == "encoder_causal":
            self.att: nn.Module = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=batch_first)
        else:
            self.att = nn.MultiheadAttention(d, 2, batch_first=batch_first)
        self.head = nn.Linear(d, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (n, S, d)
        s = x.shape[1]
        h = x if self.batch_first else x.transpose(0, 1)
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        if self.mask == "encoder_causal":
            out = self.att(h, src_mask=nn.Transformer.generate_square_subsequent_mask(s), is_causal=True)
        elif self.mask == "causal":
            out = self.att(h, h, h, attn_mask=causal, need_weights=False)[0]
        elif self.mask == "float":
            out = self.att(h, h, h, attn_mask=torch.linspace(-1.0, 1.0, s * s, dtype=x.dtype).reshape(s, s))[0]
        else:
            padding = torch.zeros(x.shape[0], s, dtype=torch.bool)
            padding[:, -1] = True
            out = self.att(h, h, h, key_padding_mask=padding)[0]
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1))


def vit_classifier(**config: object) -> nn.Module:
    """Hugging Face's ViTForImageClassification from a ViTConfig (2 layers, width 32, 8 x 8 images)."""
    from transformers import ViTConfig, ViTForImageClassification

    defaults = dict(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    return ViTForImageClassification(ViTConfig(**{**defaults, **config}))


class RowWeight(nn.Module):
    """Its own parameter of leading size 1 that is no per-sample addition: ``x @ w.T`` (n, 1)."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, d))
        self.scale = nn.Parameter(torch.ones(1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w.T) * self.scale


class Square(nn.Module):
    """An elementwise parametrization: weight = theta |theta|."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * w.abs()


class Reparametrized(nn.Module):
    """Weights computed from other parameters, on Linear and Conv1d layers: the legacy
    ``nn.utils.weight_norm`` (weight_g, weight_v) over the whole tensor, ``parametrizations.orthogonal``,
    weight norm along the input channels, and a user's elementwise parametrization; (n, S, d) -> (n, o)."""

    def __init__(self, d: int = 8, o: int = 3) -> None:
        super().__init__()
        with warnings.catch_warnings():  # the legacy weight_norm is deprecated, and still in use
            warnings.simplefilter("ignore", FutureWarning)
            self.conv = nn.utils.weight_norm(nn.Conv1d(d, 4, 3), dim=None)
        self.orth = nn.utils.parametrizations.orthogonal(nn.Linear(d, 6))
        self.cols = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 3, 2, bias=False), dim=1)
        self.square = nn.Linear(6 + 3, o)
        nn.utils.parametrize.register_parametrization(self.square, "weight", Square())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.orth(x.mean(1)))
        c = self.cols(torch.tanh(self.conv(x.transpose(1, 2)))).mean(2)  # (n, 3) for S >= 4
        return self.square(torch.cat([h, torch.tanh(c)], 1))


class Recurrent(nn.Module):
    """(n, S, d) -> an LSTM, GRU or RNN with the given options -> its last output -> Linear; ``packed``
    runs it on a PackedSequence (each sample's length S - i % 2)."""

    def __init__(self, kind: str = "lstm", d: int = 5, hidden: int = 4, o: int = 3, packed: bool = False,
                 **options: object) -> None:
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.rnn = cls(d, hidden, **options)
        self.batch_first, self.packed = bool(options.get("batch_first")), packed
        self.head = nn.Linear(hidden * (2 if options.get("bidirectional") else 1), o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.batch_first else x.transpose(0, 1)
        if self.packed:
            lengths = torch.tensor([x.shape[1] - i % 2 for i in range(x.shape[0])])
            h = nn.utils.rnn.pack_padded_sequence(h, lengths, batch_first=self.batch_first, enforce_sorted=False)
            out = nn.utils.rnn.pad_packed_sequence(self.rnn(h)[0], batch_first=True)[0]
        else:
            out = self.rnn(h)[0]
            out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out[:, 0])
