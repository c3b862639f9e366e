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
from ..decoder_format import ACTIVATIONS, FEATURES, FFNS, NORMS, POSITIONS, config_problem, weight_totals


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


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):  # in float32 at least, as Llama
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        y = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def norm(cfg: DecoderConfig, width: int | None = None) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(width or cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(width or cfg.hidden_size, eps=cfg.norm_eps)


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


def rope_tables(position_ids, cfg: DecoderConfig, dtype, local: bool = False):
    """cos, sin (B, 1, S, rotary_dim) of the rotary embedding at `position_ids` (B, S), rotate-half layout:
    dims i and i + r/2 rotate by angle position * inv_freq[i] (qkv_onnx/rope.py: the scalings), in float32
    at least, times the scaling's attention factor. longrope: the long factors where this call's largest
    position + 1 passes the original length (per call, as transformers chooses)."""
    wide = torch.promote_types(dtype, torch.float32)
    d = cfg.to_dict()
    inv, factor = rope_math.frequencies(d, local, dtype="float32")
    inv_freq = torch.from_numpy(inv).to(wide)
    original = None if local else rope_math.switches(d)
    if original is not None:
        long = torch.from_numpy(rope_math.frequencies(d, long=True, dtype="float32")[0]).to(wide)
        inv_freq = torch.where(position_ids.max() + 1 > original, long, inv_freq)
    angles = position_ids[:, None, :, None].to(wide) * inv_freq  # (B, 1, S, r/2)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype)


def rotate(x, cos, sin):
    """x (B, H, S, d) rotated in its first cos.shape[-1] dims (partial rotary: the rest pass through)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([rotate(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class CachedAttention(nn.Module):
    """Causal self-attention over the cache: new keys and values are appended to the past ones, and
    the query at cache index P + i reads keys 0..P+i that the mask allows (a sliding layer's mask also drops
    keys at or before P + i - window). Grouped-query attention when kv_heads < num_heads (query head h reads
    kv head h // (num_heads / kv_heads)). q and k may be RMS-normed (over each head, or over the whole
    projection) before RoPE; scores are scaled by `attention_scale` (default 1/sqrt(head_dim)) and may be
    soft-capped: cap * tanh(score / cap). A query with no key to read (a left-padded row's padding) gets 0,
    written into the graph on every backend: SDPA gives NaN there, which the next layer would spread over the
    whole row.

    `fused_softcap`: set by the exporter where the fused op caps the scores itself (the `softcap` of ONNX
    `Attention` and of GroupQueryAttention): the graph then traces SDPA and export/cache.py sets the op's cap;
    otherwise (eager, decomposed) the cap is computed here."""

    fused_softcap = False

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_size
        h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
        bias = cfg.attention_bias
        self.q_proj, self.k_proj = nn.Linear(h, q, bias=bias), nn.Linear(h, kv, bias=bias)
        self.v_proj = nn.Linear(h, kv, bias=bias)
        self.out_proj = nn.Linear(q, h, bias=bias if cfg.out_bias is None else cfg.out_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = norm(cfg, cfg.head_size if per_head else q)
            self.k_norm = norm(cfg, cfg.head_size if per_head else kv)
        self.scale, self.softcap = cfg.attention_scale, cfg.attention_softcap

    def forward(self, x, allowed, rope, past_key, past_value):
        """x (B, S, D); allowed (B, 1, S, P + S) bool; rope: (cos, sin) or None; past (B, Hkv, P, d).
        Returns (y (B, S, D), present key, present value)."""
        B, S, _ = x.shape
        q = self._heads(self.q_proj(x), self.num_heads, getattr(self, "q_norm", None))
        k = self._heads(self.k_proj(x), self.num_kv_heads, getattr(self, "k_norm", None))
        v = self._heads(self.v_proj(x), self.num_kv_heads, None)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        k = torch.cat([past_key, k], dim=2)
        v = torch.cat([past_value, v], dim=2)
        if self.softcap and not self.fused_softcap:
            y = self._capped(q, k, v, allowed)
        else:
            gqa = self.num_kv_heads != self.num_heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale, enable_gqa=gqa)
        y = torch.where(allowed.any(-1, keepdim=True), y, 0)
        return self.out_proj(y.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)), k, v

    def _heads(self, t, n: int, qk_norm):
        """(B, S, n * d) -> (B, n, S, d), normed over the projection or each head where the config says."""
        B, S, _ = t.shape
        if qk_norm is not None and self.qk_norm == "projection":
            t = qk_norm(t)
        t = t.view(B, S, n, self.head_dim).transpose(1, 2)
        return qk_norm(t) if qk_norm is not None and self.qk_norm == "head" else t

    def _capped(self, q, k, v, allowed):
        """Attention with soft-capped scores, written out: softmax(cap tanh(q k^T scale / cap)) v."""
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scale = self.head_dim**-0.5 if self.scale is None else self.scale
        scores = torch.tanh(q @ k.transpose(-1, -2) * scale / self.softcap) * self.softcap
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1) @ v


class DecoderBlock(nn.Module):
    """x + r * attn(norm x), then x + r * ffn(norm x) ("pre"); "sandwich" norms the sublayer's output too
    (Gemma 2 and 3), "post" only its output (OLMo 2). r: the residual multiplier (Granite), 1 elsewhere."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.placement, self.multiplier = cfg.norm_placement, cfg.residual_multiplier
        if self.placement != "post":
            self.attn_norm = norm(cfg)
        self.attn = CachedAttention(cfg)
        if self.placement != "pre":
            self.post_attn_norm = norm(cfg)
        if self.placement != "post":
            self.ffn_norm = norm(cfg)
        self.ffn = FeedForward(cfg)
        if self.placement != "pre":
            self.post_ffn_norm = norm(cfg)

    def forward(self, x, allowed, rope, past_key, past_value):
        h = x if self.placement == "post" else self.attn_norm(x)
        y, key, value = self.attn(h, allowed, rope, past_key, past_value)
        x = x + self._residual(y, "post_attn_norm")
        h = x if self.placement == "post" else self.ffn_norm(x)
        return x + self._residual(self.ffn(h), "post_ffn_norm"), key, value

    def _residual(self, y, post: str):
        if self.placement != "pre":
            y = getattr(self, post)(y)
        return y * self.multiplier if self.multiplier != 1.0 else y


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
            x, key, value = block(x, masks[types[i]], rope, past[2 * i], past[2 * i + 1])
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
