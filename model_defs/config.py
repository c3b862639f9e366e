"""Encoder configuration, named presets and the closed-form parameter count.

The fields past `with_pooler` are what the BERT families differ in (model_defs/families.py maps each family's
config.json onto them); their defaults are BERT's."""

from dataclasses import asdict, dataclass, fields

from ..artifact_format import ACTIVATIONS, POSITIONS, max_sequence, weight_totals


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
    hidden_act: str = "gelu"  # the feed-forward's activation: one of ACTIVATIONS
    positions: str = "absolute"  # one of POSITIONS (RoBERTa, XLM-R, MPNet: from-ids)
    pad_token_id: int = 0  # what padding positions hold; from-ids positions skip it and start after it
    embedding_size: int | None = None  # embeddings this wide, projected to hidden_size (ELECTRA)
    relative_attention_buckets: int = 0  # > 0: a bucketed relative position bias on every layer's scores

    def __post_init__(self):
        if self.num_heads < 1 or (self.num_kv_heads is not None and self.num_kv_heads < 1):
            raise ValueError(
                f"head counts must be >= 1, got num_heads {self.num_heads}, num_kv_heads {self.num_kv_heads}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.kv_heads}")
        if self.hidden_act not in ACTIVATIONS or self.positions not in POSITIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} or positions {self.positions!r} is unknown")
        if self.positions == "from-ids" and self.max_positions <= self.pad_token_id + 1:
            raise ValueError(f"max_positions {self.max_positions} has no room past pad {self.pad_token_id}")

    @property
    def max_sequence(self) -> int:
        """The longest sequence the position table covers (from-ids positions start at pad_token_id + 1)."""
        return max_sequence(self.to_dict())

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

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


def param_count(cfg: EncoderConfig) -> int:
    """Closed-form parameter count of `BertModel(cfg)`: the weights its config implies (artifact_format)."""
    return weight_totals("bert", cfg.to_dict())[1]
