"""The decoder families a Hugging Face checkpoint may be (transformers' gpt2 and llama), as data: how a
family's config.json maps onto `DecoderConfig`, what the family fixes, what it must not ask for, and how its
weight names and layouts map onto ours. The module (decoder.py) reads only the DecoderConfig this yields;
nothing asks which family a model came from.

Names map as the encoder families' do (families.py, checkpoint.hf_to_ours): the optional prefix
(`transformer.`), then a whole module (`wte` -> `embed.word`) or a layer's (`h.N.` + `ln_1` -> `blocks.N.` +
`attn_norm`), then the leaf. Two layouts differ from ours, and are data too:
  - `conv1d`: our modules whose checkpoint weight is stored (in, out), GPT-2's Conv1D; ours is (out, in);
  - `split`: a fused module of the checkpoint (GPT-2's c_attn, q|k|v) named by a module of ours that the model
    does not have (`attn.qkv`), cut along dim 0 into equal parts, one per module of ours, in order.
`to_our_layout` applies both to a state dict in our names; `checkpoint_shapes` is its inverse on shapes.
"""

import re
from dataclasses import dataclass, field

from .families import ACTIVATIONS as ENCODER_ACTIVATIONS
from .families import Family

# transformers' activation names -> ours (DecoderConfig.hidden_act); any other is refused
ACTIVATIONS = {**ENCODER_ACTIVATIONS, "silu": "silu", "swish": "silu"}
_NAME_RE = re.compile(r"(blocks\.\d+\.)?(.+)\.([^.]+)")  # (block prefix, module, leaf)


@dataclass(frozen=True)
class DecoderFamily(Family):
    """One family of decoder checkpoints. Inherited fields as Family's, but `config` maps DecoderConfig
    fields, each to a config.json key or a tuple of keys (the first one set wins; `a.b` is key b of the
    object at a), and `requires` keys may be dotted the same way."""

    derived: dict = field(default_factory=dict)  # DecoderConfig field -> (field, factor) it is when null
    checks: dict = field(
        default_factory=dict
    )  # config.json key -> DecoderConfig attribute it must equal if set
    conv1d: frozenset = frozenset()  # our modules (in a block: relative) whose weight is stored (in, out)
    split: dict = field(default_factory=dict)  # our fused module -> our modules it holds, stacked on dim 0
    buffers: tuple[str, ...] = ()  # a layer's non-parameters a checkpoint may carry (relative names)
    unprefixed: tuple[str, ...] = ("lm_head.",)  # checkpoint keys that never carry the prefix


def _split_name(name: str) -> tuple[str, str, str]:
    m = _NAME_RE.fullmatch(name)
    if m is None:
        raise ValueError(f"{name!r} is not a module.leaf name")
    return m.group(1) or "", m.group(2), m.group(3)


def to_our_layout(state: dict, family: DecoderFamily) -> dict:
    """A checkpoint's tensors under our names (fused modules of `family.split` included) -> our module's:
    `conv1d` weights transposed to (out, in), then fused modules cut into their parts."""
    out = {}
    for name, tensor in state.items():
        block, module, leaf = _split_name(name)
        if module in family.conv1d and leaf == "weight":
            tensor = tensor.t()
        parts = family.split.get(module)
        if parts is None:
            out[name] = tensor.contiguous()
            continue
        for part, chunk in zip(parts, tensor.chunk(len(parts), dim=0)):
            out[f"{block}{part}.{leaf}"] = chunk.contiguous()
    return out


def checkpoint_shapes(shapes: dict, family: DecoderFamily) -> dict:
    """Our module's name -> shape, as the checkpoint holds them: the inverse of to_our_layout (parts joined
    under their fused module's name, conv1d weights (in, out))."""
    part_of = {part: (fused, len(parts)) for fused, parts in family.split.items() for part in parts}
    out = {}
    for name, shape in shapes.items():
        block, module, leaf = _split_name(name)
        if module in part_of:
            module, n = part_of[module]
            shape = (shape[0] * n, *shape[1:])  # equal parts: each part's shape times n on dim 0
        if module in family.conv1d and leaf == "weight":
            shape = tuple(reversed(shape))
        out[f"{block}{module}.{leaf}"] = tuple(shape)
    return out


_GPT2 = DecoderFamily(
    name="gpt2",
    prefix="transformer.",
    config={
        "num_layers": "n_layer",
        "hidden_size": "n_embd",
        "num_heads": "n_head",
        "ffn_size": "n_inner",
        "vocab_size": "vocab_size",
        "max_positions": "n_positions",
        "norm_eps": "layer_norm_epsilon",
        "hidden_act": "activation_function",
        "tie_word_embeddings": "tie_word_embeddings",
    },
    defaults={  # transformers' GPT2Config
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
    },
    fixed={"norm": "layer", "positions": "learned", "ffn": "mlp", "attention_bias": True, "mlp_bias": True},
    requires={
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "reorder_and_upcast_attn": (False,),
        "add_cross_attention": (False,),
    },
    derived={"ffn_size": ("hidden_size", 4)},  # n_inner null: 4 * n_embd
    modules={"wte": "embed.word", "wpe": "embed.position", "ln_f": "final_norm", "lm_head": "lm_head"},
    layers="h",
    layer={
        "ln_1": "attn_norm",
        "attn.c_attn": "attn.qkv",
        "attn.c_proj": "attn.out_proj",
        "ln_2": "ffn_norm",
        "mlp.c_fc": "ffn.fc1",
        "mlp.c_proj": "ffn.fc2",
    },
    conv1d=frozenset({"attn.qkv", "attn.out_proj", "ffn.fc1", "ffn.fc2"}),
    split={"attn.qkv": ("attn.q_proj", "attn.k_proj", "attn.v_proj")},
    buffers=("attn.bias", "attn.masked_bias"),  # the causal mask of older transformers
)

_LLAMA = DecoderFamily(
    name="llama",
    prefix="model.",
    config={
        "num_layers": "num_hidden_layers",
        "hidden_size": "hidden_size",
        "num_heads": "num_attention_heads",
        "num_kv_heads": "num_key_value_heads",  # null: as num_attention_heads
        "ffn_size": "intermediate_size",
        "vocab_size": "vocab_size",
        "max_positions": "max_position_embeddings",
        "norm_eps": "rms_norm_eps",
        "rope_theta": ("rope_parameters.rope_theta", "rope_theta"),  # transformers 5, then 4
        "hidden_act": "hidden_act",
        "attention_bias": "attention_bias",
        "mlp_bias": "mlp_bias",
        "tie_word_embeddings": "tie_word_embeddings",
    },
    defaults={  # transformers' LlamaConfig
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    },
    fixed={"norm": "rms", "positions": "rope", "ffn": "gated"},
    requires={
        "rope_scaling": (None,),  # transformers 4: linear, dynamic, llama3, yarn ... scaling
        "rope_parameters.rope_type": ("default",),  # transformers 5's place for it
        "rope_parameters.type": ("default",),  # its older spelling
        "pretraining_tp": (1, None),
    },
    checks={"head_dim": "head_dim"},  # a head_dim other than hidden_size / num_attention_heads is refused
    modules={"embed_tokens": "embed.word", "norm": "final_norm", "lm_head": "lm_head"},
    layers="layers",
    layer={
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn.q_proj",
        "self_attn.k_proj": "attn.k_proj",
        "self_attn.v_proj": "attn.v_proj",
        "self_attn.o_proj": "attn.out_proj",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn.gate_proj",
        "mlp.up_proj": "ffn.up_proj",
        "mlp.down_proj": "ffn.down_proj",
    },
    ignored=("rotary_emb.",),  # the inverse frequencies some checkpoints saved
    buffers=("self_attn.rotary_emb.inv_freq",),
)

DECODER_FAMILIES = {f.name: f for f in (_GPT2, _LLAMA)}


def transformers_config(cfg, **extra):
    """transformers' config of the model DecoderModel(cfg) is: GPT2Config (learned positions) or LlamaConfig
    (RoPE), the inverse of what DECODER_FAMILIES read; `extra` goes to both (token ids, init scale).
    ValueError for a config neither family expresses."""
    import transformers as t

    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_word_embeddings, **extra}
    if cfg.positions == "learned":
        gpt2 = ("layer", "mlp", "gelu_tanh", True, True)
        if (cfg.norm, cfg.ffn, cfg.hidden_act, cfg.attention_bias, cfg.mlp_bias) != gpt2:
            raise ValueError("learned positions are GPT-2's: LayerNorm, MLP, gelu_tanh, biases")
        return t.GPT2Config(
            n_layer=cfg.num_layers,
            n_embd=cfg.hidden_size,
            n_head=cfg.num_heads,
            n_inner=cfg.ffn_size,
            n_positions=cfg.max_positions,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new",
            **common,
        )
    if (cfg.norm, cfg.ffn, cfg.hidden_act) != ("rms", "gated", "silu"):
        raise ValueError("RoPE is Llama's: RMSNorm, SwiGLU")
    return t.LlamaConfig(
        num_hidden_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.ffn_size,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=cfg.norm_eps,
        hidden_act="silu",
        attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        **common,
    )
