"""Decoder-only language models with a KV cache as one module whose config says which parts it has: learned
positions or RoPE (scaled, partial, per layer type or off on some layers), LayerNorm or RMSNorm before, around
or after each sublayer, a plain or a gated feed-forward, biases or none, q/k norms, an explicit head width,
sliding-window layers, soft-capped scores and logits, multipliers, a tied or separate LM head. A checkpoint
family (model_defs/decoder_families.py) and the presets only set those fields
(qkv_onnx/decoder_format.FEATURES); no code asks which family a model came from.

The exported signature is the one deployments use, prefill and decode in one graph:
  forward(input_ids (B, S), attention_mask (B, P + S), position_ids (B, S), past.0.key, past.0.value, ...)
    -> (logits (B, S, V), present.0.key, present.0.value, ...)
with every cache tensor (B, kv_heads, P or P + S, head_dim) and P >= 0. Query i sits at cache index P + i and
attends to key j iff j <= P + i and attention_mask[b, j] == 1 (a query with no such key gets 0).
"""

from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from .. import rope as rope_math
from ..block import block_spec
from ..decoder_format import (
    ACTIVATIONS,
    DECODER,
    FEATURES,
    FFNS,
    NORMS,
    POSITIONS,
    config_problem,
    weight_totals,
)
from .block import Block, make_norm


@dataclass(frozen=True)
class DecoderConfig:
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: as num_heads; fewer: grouped-query attention
    ffn_size: int = 512
    vocab_size: int = 1000
    max_positions: int = 256
    norm: str = "layer"  # one of NORMS
    norm_eps: float = 1e-5
    positions: str = "learned"  # one of POSITIONS
    rope_theta: float = 10000.0
    ffn: str = "mlp"  # one of FFNS: fc2(act(fc1 x)), or down(act(gate x) * up x)
    hidden_act: str = "gelu_tanh"  # one of ACTIVATIONS
    attention_bias: bool = True  # biases on q/k/v/out projections
    mlp_bias: bool = True
    tie_word_embeddings: bool = True  # the LM head is the token embedding
    # the features of decoder_format.FEATURES, each off by default (its meaning is documented there)
    head_dim: int | None = None  # None: hidden / heads (head_size is the width either way)
    out_bias: bool | None = None
    qk_norm: str = "none"
    norm_placement: str = "pre"
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_scale: float | None = None
    logits_divisor: float = 1.0
    attention_softcap: float = 0.0
    final_softcap: float = 0.0
    sliding_window: int | None = None
    layer_types: tuple | None = None  # "full" or "sliding" per layer
    rope_scaling: dict | None = None
    rotary_dim: int | None = None
    rope_local_theta: float | None = None
    rope_layers: tuple | None = None  # per layer, whether it rotates

    def __post_init__(self):
        sizes = (
            self.num_layers,
            self.hidden_size,
            self.num_heads,
            self.kv_heads,
            self.ffn_size,
            self.vocab_size,
        )
        if min(sizes) < 1:  # kv_heads too: 0 or a negative count is no head layout
            raise ValueError(f"sizes must be >= 1: {self}")
        if (self.head_dim is None and self.hidden_size % self.num_heads) or self.num_heads % self.kv_heads:
            layout = f"hidden {self.hidden_size}, heads {self.num_heads}, kv heads {self.kv_heads}"
            raise ValueError(f"bad head layout: {layout}")
        if self.positions == "rope" and self.head_size % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_size}")
        for value, allowed in (
            (self.norm, NORMS),
            (self.positions, POSITIONS),
            (self.ffn, FFNS),
            (self.hidden_act, ACTIVATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
        problem = config_problem(self.to_dict())
        if problem:
            raise ValueError(problem.removeprefix("model config").strip(": "))

    @property
    def head_size(self) -> int:
        """The width of one attention head (head_dim where set, else hidden / heads)."""
        return self.head_dim or self.hidden_size // self.num_heads

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else "full"

    def rotates(self, layer: int) -> bool:
        return self.positions == "rope" and (self.rope_layers is None or self.rope_layers[layer])

    @property
    def max_sequence(self) -> int:
        """The longest past + seq the model reads (its learned position table, or RoPE's trained length)."""
        return self.max_positions

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def to_dict(self) -> dict:
        """The manifest's config: a feature only where it is on (decoder_format.FEATURES); tuples as lists."""
        out = {}
        for k, v in asdict(self).items():
            if k in FEATURES and (
                v == FEATURES[k][0] or (k == "head_dim" and v == self.hidden_size // self.num_heads)
            ):
                continue
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown DecoderConfig fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) and k in FEATURES else v for k, v in d.items()})


GPT2 = DecoderConfig()  # learned positions, pre-LN LayerNorm, GELU (tanh) MLP, biases, tied head
LLAMA = DecoderConfig(
    norm="rms",
    norm_eps=1e-6,
    positions="rope",
    ffn="gated",
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
)

DECODER_PRESETS = {
    "gpt2-tiny": replace(GPT2, num_layers=2, hidden_size=128, num_heads=4, ffn_size=512, vocab_size=1000),
    "llama-tiny": replace(
        LLAMA, num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, ffn_size=256, vocab_size=1000
    ),
    "gpt2-small": replace(
        GPT2,
        num_layers=12,
        hidden_size=768,
        num_heads=12,
        ffn_size=3072,
        vocab_size=50257,
        max_positions=1024,
    ),
    "llama-100m": replace(  # ~100M: the bench's Llama-style model
        LLAMA,
        num_layers=12,
        hidden_size=768,
        num_heads=12,
        num_kv_heads=4,
        ffn_size=2048,
        vocab_size=32000,
        max_positions=2048,
        tie_word_embeddings=True,
    ),
}


# Shapes only counted (meta device), never built: GPT-3 175B (Brown et al. 2020, table 2.1)
COUNTED_ONLY = {
    "gpt3": replace(
        GPT2,
        num_layers=96,
        hidden_size=12288,
        num_heads=96,
        ffn_size=4 * 12288,
        vocab_size=50257,
        max_positions=2048,
    ),
}


def norm(cfg: DecoderConfig) -> nn.Module:
    return make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)


def rope_tables(position_ids, cfg: DecoderConfig, dtype, local: bool = False):
    """cos, sin (B, 1, S, rotary_dim) of the rotary embedding at `position_ids` (B, S), rotate-half layout:
    dims i and i + r/2 rotate by angle position * inv_freq[i] (qkv_onnx/rope.py: the scalings), in float32
    at least, times the scaling's attention factor. longrope: the long factors where this call's largest
    position + 1 passes the original length (per call, as transformers chooses)."""
    wide = torch.promote_types(dtype, torch.float32)
    d = cfg.to_dict()
    precision = str(wide).removeprefix("torch.")  # float32 (exports), float64 (a float64 module)
    inv, factor = rope_math.frequencies(d, local, dtype=precision)
    inv_freq = torch.from_numpy(inv).to(wide)
    original = None if local else rope_math.switches(d)
    if original is not None:
        long = torch.from_numpy(rope_math.frequencies(d, long=True, dtype=precision)[0]).to(wide)
        inv_freq = torch.where(position_ids.max() + 1 > original, long, inv_freq)
    angles = position_ids[:, None, :, None].to(wide) * inv_freq  # (B, 1, S, r/2)
    angles = torch.cat([angles, angles], dim=-1)
    if factor == 1.0:
        return angles.cos().to(dtype), angles.sin().to(dtype)
    return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


class Embeddings(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = (
            nn.Embedding(cfg.max_positions, cfg.hidden_size) if cfg.positions == "learned" else None
        )
        self.multiplier = cfg.embedding_multiplier

    def forward(self, input_ids, position_ids):
        x = self.word(input_ids)
        x = x if self.position is None else x + self.position(position_ids)
        return x * self.multiplier if self.multiplier != 1.0 else x


def allowed_keys(attention_mask, seq: int, window: int | None = None):
    """(B, 1, S, P + S) bool: query i (at cache index P + i) may read key j; with a window, only the keys
    j > P + i - window (it sees `window` keys, itself included)."""
    total = attention_mask.shape[1]
    past = total - seq
    key = torch.arange(total, device=attention_mask.device)[None, :]
    position = torch.arange(seq, device=attention_mask.device)[:, None] + past
    causal = key <= position
    if window is not None:
        causal = causal & (key > position - window)
    return attention_mask.bool()[:, None, None, :] & causal[None, None]


class DecoderModel(nn.Module):
    """Embeddings -> blocks -> final norm -> LM head (divided, soft-capped where the config says), reading and
    returning the KV cache."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(block_spec(DECODER, cfg.to_dict())) for _ in range(cfg.num_layers))
        self.final_norm = norm(cfg)
        # tied: the head is the token embedding itself (one parameter, one name in the state_dict)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def forward(self, input_ids, attention_mask, position_ids, *past):
        """past: key, value of layer 0, then layer 1, ... Returns (logits, present key 0, value 0, ...)."""
        cfg = self.config
        x = self.embed(input_ids, position_ids)
        types = [cfg.layer_type(i) for i in range(cfg.num_layers)]
        seq = input_ids.shape[1]
        masks = {
            t: allowed_keys(attention_mask, seq, cfg.sliding_window if t == "sliding" else None)
            for t in dict.fromkeys(types)
        }
        tables = {}
        for i, t in enumerate(types):
            if cfg.rotates(i) and t not in tables:
                local = t == "sliding" and cfg.rope_local_theta is not None  # a sliding layer's own theta
                tables[t] = rope_tables(position_ids, cfg, x.dtype, local)
        present = []
        for i, block in enumerate(self.blocks):
            rope = tables[types[i]] if cfg.rotates(i) else None
            x, key, value = block(x, allowed=masks[types[i]], rope=rope, past=(past[2 * i], past[2 * i + 1]))
            present += [key, value]
        head = self.embed.word.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.final_norm(x), head)
        if cfg.logits_divisor != 1.0:
            logits = logits / cfg.logits_divisor
        if cfg.final_softcap:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return (logits, *present)


def empty_cache(cfg: DecoderConfig, batch: int, dtype=torch.float32) -> list:
    """The past of a prefill: every layer's key and value with P = 0."""
    shape = (batch, cfg.kv_heads, 0, cfg.head_size)
    return [torch.zeros(shape, dtype=dtype) for _ in range(2 * cfg.num_layers)]


def decoder_param_count(cfg: DecoderConfig) -> int:
    """Closed-form parameter count of DecoderModel(cfg) (a tied head counted once): the shapes of
    decoder_format, their one home."""
    return weight_totals(cfg.to_dict())[1]


def meta_param_count(cfg: DecoderConfig) -> int:
    """DecoderModel(cfg)'s parameters counted on the meta device (nothing allocated), tied ones once."""
    with torch.device("meta"):
        model = DecoderModel(cfg)
    return sum(p.numel() for p in model.parameters())
