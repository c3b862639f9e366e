"""The BERT families a Hugging Face checkpoint may be, as data: how a family's config.json maps onto
`EncoderConfig`, what it fixes, what it must not ask for, and how its weight names map onto ours. The module
(encoder.py), the oracle, the exporter and the graph contract read only the EncoderConfig this yields; none
of them asks which family a model came from.

A weight name maps in three parts: the family's prefix (`roberta.`, optional), then either a whole-module name
(`embeddings.word_embeddings` -> `embeddings.word`) or a layer's (`encoder.layer.N.` + `attention.self.query`
-> `blocks.N.` + `attn.q_proj`), then the leaf (`weight`, `bias`; old TF checkpoints' `gamma`, `beta`).
"""

from dataclasses import dataclass, field

# transformers' activation names -> ours (EncoderConfig.hidden_act)
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
LEAVES = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}

_BERT_CONFIG = {  # EncoderConfig field <- config.json key
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads",
    "ffn_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_positions": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_act": "hidden_act",
    "pad_token_id": "pad_token_id",
}
_BERT_EMBEDDINGS = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
    "pooler.dense": "pooler",
}
_BERT_LAYER = {
    "attention.self.query": "attn.q_proj",
    "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.out_proj",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn.fc1",
    "output.dense": "ffn.fc2",
    "output.LayerNorm": "ffn_norm",
}
# What a BERT-style config may not ask for, whatever the family: the value it must have (or not set).
_ENCODER_ONLY = {
    "is_decoder": (False,),
    "add_cross_attention": (False,),
    "position_embedding_type": ("absolute",),
}


@dataclass(frozen=True)
class Family:
    """One family of checkpoints."""

    name: str  # its config.json model_type
    prefix: str  # the base model's prefix in task checkpoints' weight names ("bert.")
    config: dict  # EncoderConfig field <- config.json key
    defaults: dict  # config.json keys transformers assumes when a file leaves them out
    fixed: dict = field(default_factory=dict)  # EncoderConfig fields the family itself decides
    requires: dict = field(default_factory=dict)  # config.json key -> the values we compute (others refused)
    modules: dict = field(default_factory=lambda: dict(_BERT_EMBEDDINGS))  # whole-module names -> ours
    layers: str = "encoder.layer"  # where the layers are: <layers>.N.<layer name>
    layer: dict = field(default_factory=lambda: dict(_BERT_LAYER))  # layer module names -> ours
    ignored: tuple[str, ...] = ()  # prefixes of pretraining heads and buffers a checkpoint may carry


def _family(name, prefix, defaults, heads=(), **kw) -> Family:
    """A family with BERT's config keys unless told; `heads`: its pretraining heads beside BERT's."""
    requires = {**_ENCODER_ONLY, **kw.pop("requires", {})}
    return Family(
        name,
        prefix,
        kw.pop("config", _BERT_CONFIG),
        defaults,
        requires=requires,
        ignored=_HEADS + _BUFFERS + heads,
        **kw,
    )


_BERT_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
_HEADS = ("cls.", "lm_head.")  # pretraining heads; a task head (classifier.) is refused: we export no head
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_UNTYPED_EMBEDDINGS = {  # no token types, no pooler
    k: v for k, v in _BERT_EMBEDDINGS.items() if k not in ("embeddings.token_type_embeddings", "pooler.dense")
}

FAMILIES = {
    f.name: f
    for f in [
        _family(
            "bert",
            "bert.",
            _BERT_DEFAULTS,
        ),
        _family(
            "roberta",
            "roberta.",
            {**_BERT_DEFAULTS, "vocab_size": 50265, "pad_token_id": 1},
            fixed={"positions": "from-ids"},
        ),
        _family(
            "xlm-roberta",
            "roberta.",
            {**_BERT_DEFAULTS, "pad_token_id": 1},
            fixed={"positions": "from-ids"},
        ),
        _family(
            "electra",
            "electra.",
            {**_BERT_DEFAULTS, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024},
            config={**_BERT_CONFIG, "embedding_size": "embedding_size"},
            modules={**_BERT_EMBEDDINGS, "embeddings_project": "embeddings.project"},
            heads=("discriminator_predictions.", "generator_predictions.", "generator_lm_head."),
        ),
        _family(
            "distilbert",
            "distilbert.",
            {
                "vocab_size": 30522,
                "dim": 768,
                "n_layers": 6,
                "n_heads": 12,
                "hidden_dim": 3072,
                "activation": "gelu",
                "max_position_embeddings": 512,
                "pad_token_id": 0,
            },
            config={
                "num_layers": "n_layers",
                "hidden_size": "dim",
                "num_heads": "n_heads",
                "ffn_size": "hidden_dim",
                "vocab_size": "vocab_size",
                "max_positions": "max_position_embeddings",
                "hidden_act": "activation",
                "pad_token_id": "pad_token_id",
            },
            fixed={"type_vocab_size": 0, "layer_norm_eps": 1e-12},  # its LayerNorms' eps is fixed in its code
            modules=_UNTYPED_EMBEDDINGS,
            layers="transformer.layer",
            layer={
                "attention.q_lin": "attn.q_proj",
                "attention.k_lin": "attn.k_proj",
                "attention.v_lin": "attn.v_proj",
                "attention.out_lin": "attn.out_proj",
                "sa_layer_norm": "attn_norm",
                "ffn.lin1": "ffn.fc1",
                "ffn.lin2": "ffn.fc2",
                "output_layer_norm": "ffn_norm",
            },
            heads=("vocab_transform.", "vocab_layer_norm.", "vocab_projector."),
        ),
        _family(
            "mpnet",
            "mpnet.",
            {**_BERT_DEFAULTS, "vocab_size": 30527, "pad_token_id": 1, "relative_attention_num_buckets": 32},
            config={k: v for k, v in _BERT_CONFIG.items() if k != "type_vocab_size"},
            fixed={"type_vocab_size": 0, "positions": "from-ids", "relative_attention_buckets": 32},
            # its code counts positions from 1 and buckets by 32 whatever the config says: only those configs
            requires={"relative_attention_num_buckets": (32,), "pad_token_id": (1,)},
            modules={
                **_UNTYPED_EMBEDDINGS,
                "encoder.relative_attention_bias": "relative_bias",
                "pooler.dense": "pooler",
            },
            layer={
                "attention.attn.q": "attn.q_proj",
                "attention.attn.k": "attn.k_proj",
                "attention.attn.v": "attn.v_proj",
                "attention.attn.o": "attn.out_proj",
                "attention.LayerNorm": "attn_norm",
                "intermediate.dense": "ffn.fc1",
                "output.dense": "ffn.fc2",
                "output.LayerNorm": "ffn_norm",
            },
        ),
    ]
}
