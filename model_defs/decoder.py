"""Decoder-only language models with a KV cache, GPT-2 style and Llama style as one module whose config says
which parts it has: learned positions or RoPE, LayerNorm or RMSNorm, a plain or a gated (SwiGLU) feed-forward,
biases or none, a tied or separate LM head. A checkpoint family (model_defs/decoder_families.py) and the
presets only set those fields; no code asks which family a model came from.

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

from ..decoder_format import ACTIVATIONS, FFNS, NORMS, POSITIONS


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
        if self.hidden_size % self.num_heads or self.num_heads % self.kv_heads:
            layout = f"hidden {self.hidden_size}, heads {self.num_heads}, kv heads {self.kv_heads}"
            raise ValueError(f"bad head layout: {layout}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for value, allowed in (
            (self.norm, NORMS),
            (self.positions, POSITIONS),
            (self.ffn, FFNS),
            (self.hidden_act, ACTIVATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_sequence(self) -> int:
        """The longest past + seq the model reads (its learned position table, or RoPE's trained length)."""
        return self.max_positions

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown DecoderConfig fields: {sorted(unknown)}")
        return cls(**d)


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


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):  # in float32 at least, as Llama
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        y = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def norm(cfg: DecoderConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


ACTIVATION = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


class FeedForward(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.act = ACTIVATION[cfg.hidden_act]
        h, f, bias = cfg.hidden_size, cfg.ffn_size, cfg.mlp_bias
        self.gated = cfg.ffn == "gated"
        if self.gated:
            self.gate_proj, self.up_proj = nn.Linear(h, f, bias=bias), nn.Linear(h, f, bias=bias)
            self.down_proj = nn.Linear(f, h, bias=bias)
        else:
            self.fc1, self.fc2 = nn.Linear(h, f, bias=bias), nn.Linear(f, h, bias=bias)

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


def rope_tables(position_ids, head_dim: int, theta: float, dtype):
    """cos, sin (B, 1, S, head_dim) of the rotary embedding at `position_ids` (B, S), rotate-half layout:
    dims i and i + head_dim/2 rotate by angle position * theta^(-2i/head_dim), in float32 at least."""
    wide = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(wide) / head_dim)
    angles = position_ids[:, None, :, None].to(wide) * inv_freq  # (B, 1, S, d/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class CachedAttention(nn.Module):
    """Causal self-attention over the cache: new keys and values are appended to the past ones, and
    the query at cache index P + i reads keys 0..P+i that the mask allows. Grouped-query attention when
    kv_heads < num_heads (query head h reads kv head h // (num_heads / kv_heads)). A query with no key to
    read (a left-padded row's padding) gets 0, written into the graph on every backend: SDPA gives NaN there,
    which the next layer would spread over the whole row."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        h, kv, bias = cfg.hidden_size, cfg.kv_heads * cfg.head_dim, cfg.attention_bias
        self.q_proj, self.k_proj = nn.Linear(h, h, bias=bias), nn.Linear(h, kv, bias=bias)
        self.v_proj, self.out_proj = nn.Linear(h, kv, bias=bias), nn.Linear(h, h, bias=bias)

    def forward(self, x, allowed, rope, past_key, past_value):
        """x (B, S, D); allowed (B, 1, S, P + S) bool; rope: (cos, sin) or None; past (B, Hkv, P, d).
        Returns (y (B, S, D), present key, present value)."""
        B, S, D = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        k = torch.cat([past_key, k], dim=2)
        v = torch.cat([past_value, v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, enable_gqa=self.num_kv_heads != self.num_heads
        )
        y = torch.where(allowed.any(-1, keepdim=True), y, 0)
        return self.out_proj(y.transpose(1, 2).reshape(B, S, D)), k, v


class DecoderBlock(nn.Module):
    """Pre-norm: x + attn(norm x), then x + ffn(norm x)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attn_norm, self.attn = norm(cfg), CachedAttention(cfg)
        self.ffn_norm, self.ffn = norm(cfg), FeedForward(cfg)

    def forward(self, x, allowed, rope, past_key, past_value):
        y, key, value = self.attn(self.attn_norm(x), allowed, rope, past_key, past_value)
        x = x + y
        return x + self.ffn(self.ffn_norm(x)), key, value


class Embeddings(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = (
            nn.Embedding(cfg.max_positions, cfg.hidden_size) if cfg.positions == "learned" else None
        )

    def forward(self, input_ids, position_ids):
        x = self.word(input_ids)
        return x if self.position is None else x + self.position(position_ids)


def allowed_keys(attention_mask, seq: int):
    """(B, 1, S, P + S) bool: query i (at cache index P + i) may read key j."""
    total = attention_mask.shape[1]
    past = total - seq
    causal = torch.arange(total, device=attention_mask.device)[None, :] <= (
        torch.arange(seq, device=attention_mask.device)[:, None] + past
    )
    return attention_mask.bool()[:, None, None, :] & causal[None, None]


class DecoderModel(nn.Module):
    """Embeddings -> pre-norm blocks -> final norm -> LM head, reading and returning the KV cache."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = norm(cfg)
        # tied: the head is the token embedding itself (one parameter, one name in the state_dict)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def forward(self, input_ids, attention_mask, position_ids, *past):
        """past: key, value of layer 0, then layer 1, ... Returns (logits, present key 0, value 0, ...)."""
        cfg = self.config
        x = self.embed(input_ids, position_ids)
        allowed = allowed_keys(attention_mask, input_ids.shape[1])
        rope = None
        if cfg.positions == "rope":
            rope = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        present = []
        for i, block in enumerate(self.blocks):
            x, key, value = block(x, allowed, rope, past[2 * i], past[2 * i + 1])
            present += [key, value]
        head = self.embed.word.weight if self.lm_head is None else self.lm_head.weight
        return (F.linear(self.final_norm(x), head), *present)


def empty_cache(cfg: DecoderConfig, batch: int, dtype=torch.float32) -> list:
    """The past of a prefill: every layer's key and value with P = 0."""
    shape = (batch, cfg.kv_heads, 0, cfg.head_dim)
    return [torch.zeros(shape, dtype=dtype) for _ in range(2 * cfg.num_layers)]


def decoder_param_count(cfg: DecoderConfig) -> int:
    """Closed-form parameter count of DecoderModel(cfg) (a tied head counted once)."""
    h, f, kv = cfg.hidden_size, cfg.ffn_size, cfg.kv_heads * cfg.head_dim
    norm_params = h * (2 if cfg.norm == "layer" else 1)
    attn = 2 * h * h + 2 * h * kv + (2 * h + 2 * kv if cfg.attention_bias else 0)
    ffn = (3 if cfg.ffn == "gated" else 2) * h * f + (
        ((2 * f + h) if cfg.ffn == "gated" else (f + h)) if cfg.mlp_bias else 0
    )
    embed = cfg.vocab_size * h + (cfg.max_positions * h if cfg.positions == "learned" else 0)
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return embed + cfg.num_layers * (attn + ffn + 2 * norm_params) + norm_params + head


def meta_param_count(cfg: DecoderConfig) -> int:
    """DecoderModel(cfg)'s parameters counted on the meta device (nothing allocated), tied ones once."""
    with torch.device("meta"):
        model = DecoderModel(cfg)
    return sum(p.numel() for p in model.parameters())
