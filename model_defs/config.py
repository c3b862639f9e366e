"""Encoder configuration, named presets and the closed-form parameter count."""

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class EncoderConfig:
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 2
    num_kv_heads: int | None = None  # None: same as num_heads (no grouped-query attention)
    ffn_size: int = 512
    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pre_layer_norm: bool = False  # False: BERT's post-LN block
    with_pooler: bool = True

    def __post_init__(self):
        if self.num_heads < 1 or (self.num_kv_heads is not None and self.num_kv_heads < 1):
            raise ValueError(
                f"head counts must be >= 1, got num_heads {self.num_heads}, num_kv_heads {self.num_kv_heads}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EncoderConfig fields: {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    "bert-tiny": EncoderConfig(num_layers=2, hidden_size=128, num_heads=2, ffn_size=512),
    "bert-mini": EncoderConfig(num_layers=4, hidden_size=256, num_heads=4, ffn_size=1024),
    "bert-base": EncoderConfig(num_layers=12, hidden_size=768, num_heads=12, ffn_size=3072),
    "bert-large": EncoderConfig(num_layers=24, hidden_size=1024, num_heads=16, ffn_size=4096),
}


def attention_param_count(hidden: int, num_heads: int, kv_heads: int, kv_dim: int | None = None) -> int:
    """Q, K, V and output projections, with biases."""
    kv_dim = hidden if kv_dim is None else kv_dim
    kv_width = hidden // num_heads * kv_heads
    return (hidden * hidden + hidden) + 2 * (kv_dim * kv_width + kv_width) + (hidden * hidden + hidden)


def block_param_count(cfg: EncoderConfig) -> int:
    """One encoder block: attention, two LayerNorms, the feed-forward pair."""
    h, f = cfg.hidden_size, cfg.ffn_size
    return attention_param_count(h, cfg.num_heads, cfg.kv_heads) + 2 * (2 * h) + (h * f + f) + (f * h + h)


def param_count(cfg: EncoderConfig) -> int:
    """Closed-form parameter count of `BertModel(cfg)`."""
    h = cfg.hidden_size
    embeddings = (cfg.vocab_size + cfg.max_positions + cfg.type_vocab_size) * h + 2 * h
    final_norm = 2 * h if cfg.pre_layer_norm else 0
    pooler = h * h + h if cfg.with_pooler else 0
    return embeddings + cfg.num_layers * block_param_count(cfg) + final_norm + pooler
