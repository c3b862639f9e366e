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

import math
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
    activations: dict = field(default_factory=dict)  # the family's own meaning of an activation name
    rope: str = "none"  # how it reads RoPE (read_rope): "none" (learned positions), "rope", "partial"
    sliding: dict | None = None  # how it says which layers slide (read_sliding)
    read: dict = field(default_factory=dict)  # DecoderConfig feature -> f(config.json) (None: off)
    offset: frozenset = frozenset()  # our norms whose checkpoint weight w scales by 1 + w (Gemma)


def _split_name(name: str) -> tuple[str, str, str]:
    m = _NAME_RE.fullmatch(name)
    if m is None:
        raise ValueError(f"{name!r} is not a module.leaf name")
    return m.group(1) or "", m.group(2), m.group(3)


def to_our_layout(state: dict, family: DecoderFamily, shapes: dict) -> dict:
    """A checkpoint's tensors under our names (fused modules of `family.split` included) -> our module's:
    `conv1d` weights transposed to (out, in), fused modules cut into their parts (each as long on dim 0 as
    our module's `shapes` say: q | k | v of unequal widths under grouped-query attention), and `offset`
    norms' weights w made the 1 + w they scale by (Gemma's RMSNorm)."""
    out = {}
    for name, tensor in state.items():
        block, module, leaf = _split_name(name)
        if module in family.conv1d and leaf == "weight":
            tensor = tensor.t()
        if module in family.offset and leaf == "weight":
            tensor = 1.0 + tensor
        parts = family.split.get(module)
        if parts is None:
            out[name] = tensor.contiguous()
            continue
        sizes = [shapes[f"{block}{part}.{leaf}"][0] for part in parts]
        for part, chunk in zip(parts, tensor.split(sizes, dim=0)):
            out[f"{block}{part}.{leaf}"] = chunk.contiguous()
    return out


def checkpoint_shapes(shapes: dict, family: DecoderFamily) -> dict:
    """Our module's name -> shape, as the checkpoint holds them: the inverse of to_our_layout (parts joined
    under their fused module's name, conv1d weights (in, out))."""
    part_of = {part: fused for fused, parts in family.split.items() for part in parts}
    ours = {}  # our layout, fused modules joined: their parts stack on dim 0
    for name, shape in shapes.items():
        block, module, leaf = _split_name(name)
        if module in part_of:
            module = part_of[module]
            joined = ours.get(f"{block}{module}.{leaf}")
            shape = (shape[0] + (joined[0] if joined else 0), *shape[1:])
        ours[f"{block}{module}.{leaf}"] = tuple(shape)
    return {
        name: tuple(reversed(shape))
        if _split_name(name)[1] in family.conv1d and name.endswith(".weight")
        else shape
        for name, shape in ours.items()
    }


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

# --- RoPE and sliding windows as config.json says them: one reader each, every family's -----------------


def _g(scale: float, m: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 m ln(scale) + 1 (1 where the context is not stretched)."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def read_rope(hf: dict, family: DecoderFamily, head_dim: int) -> dict:
    """DecoderConfig's RoPE fields (rope_theta, rope_scaling, rotary_dim, rope_local_theta) from config.json:
    transformers 5's rope_parameters (per layer type for Gemma 3: its sliding layers' own theta), or 4.x's
    rope_theta and rope_scaling. The scaling's derived values are resolved here as transformers resolves them
    (an original length at top level wins; yarn's and longrope's attention factor). ValueError naming the key
    for what we do not compute: dynamic NTK (its frequencies depend on the calls before), a partial rotary
    factor where the family does not rotate partially, a scaled sliding-layer RoPE."""
    params = hf.get("rope_parameters")
    local = None
    if isinstance(params, dict) and "full_attention" in params:
        local, params = params.get("sliding_attention") or {}, params["full_attention"]
    where = "rope_parameters" if params or not hf.get("rope_scaling") else "rope_scaling"  # 5.x, or 4.x
    params = dict(params or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    kind = family.read.get("rope_type", lambda k: k)(kind)
    out = {"rope_theta": theta}
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if factor not in (None, 1, 1.0):
        if family.rope != "partial":
            raise ValueError(f"partial_rotary_factor {factor!r} is not supported for {family.name}")
        out["rotary_dim"] = int(head_dim * factor)
    dim = out.get("rotary_dim", head_dim)
    original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    original = int(original or hf["max_position_embeddings"])

    def number(key, default=None):
        value = params.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}.{key} {value!r} is not a number")
        return float(value)

    if kind == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": number("factor")}
    elif kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor")
        out["rope_scaling"] = {"rope_type": "llama3", **{k: number(k) for k in keys}}
        out["rope_scaling"]["original_max_position_embeddings"] = original
    elif kind == "yarn":
        scale = number("factor", hf["max_position_embeddings"] / original)
        attention = params.get("attention_factor")
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if attention is None:
            attention = _g(scale, mscale) / _g(scale, mscale_all) if mscale and mscale_all else _g(scale)
        out["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": scale,
            "original_max_position_embeddings": original,
            "beta_fast": float(params.get("beta_fast") or 32),
            "beta_slow": float(params.get("beta_slow") or 1),
            "truncate": bool(params.get("truncate", True)),
            "attention_factor": float(attention),
        }
    elif kind == "longrope":
        scale = float(params.get("factor") or hf["max_position_embeddings"] / original)
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original))
        factors = {k: [float(x) for x in params.get(k) or ()] for k in ("short_factor", "long_factor")}
        if any(len(v) != dim // 2 for v in factors.values()):
            raise ValueError(f"{where} short_factor and long_factor need {dim // 2} values each")
        out["rope_scaling"] = {
            "rope_type": "longrope",
            **factors,
            "original_max_position_embeddings": original,
            "attention_factor": float(attention),
        }
    elif kind != "default":
        why = (
            " (its frequencies change with the calls before: no graph computes that)"
            if "dynamic" in kind
            else ""
        )
        raise ValueError(
            f"rope_type {kind!r} is not supported{why}; only default, linear, llama3, yarn, longrope"
        )
    if local is not None:
        if local.get("rope_type", "default") != "default":
            raise ValueError(
                f"rope_parameters.sliding_attention.rope_type {local['rope_type']!r} is not supported"
            )
        out["rope_local_theta"] = float(local.get("rope_theta") or hf.get("rope_local_base_freq") or 10000.0)
    return out


LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def read_sliding(hf: dict, family: DecoderFamily, layers: int) -> dict:
    """DecoderConfig's sliding_window and layer_types from config.json, as the family's transformers model
    applies them: its window key (off where null, or where its switch is off), on every layer or on the layers
    config.json's layer_types names (or, where a 4.x config has none, the family's own rule). ValueError
    naming the key for a layer_types list we cannot read."""
    rule = family.sliding
    if rule is None:
        return {}
    window = hf.get(rule["window"])
    if window is None or (rule.get("switch") and not hf.get(rule["switch"])):
        return {}
    if rule["layers"] == "all":
        types = ["sliding"] * layers
    elif hf.get("layer_types") is not None:
        saved = hf["layer_types"]
        if not isinstance(saved, list) or len(saved) != layers or any(t not in LAYER_TYPES for t in saved):
            raise ValueError(f"layer_types {saved!r} is not {layers} of {list(LAYER_TYPES)}")
        types = [LAYER_TYPES[t] for t in saved]
    else:
        types = rule["layers"](hf, layers)
    if "sliding" not in types:
        return {}
    if type(window) is not int or window < 1:
        raise ValueError(f"{rule['window']} {window!r} is not a positive integer")
    return {"sliding_window": window, "layer_types": tuple(types)}


def _every(k: int, kind: str):
    """The layer rule 'every k-th layer is full, the others `kind`' (Gemma 2: 2; Gemma 3: its pattern)."""
    return lambda i: "full" if (i + 1) % k == 0 else kind


# --- the families ---------------------------------------------------------------------------------------

_LLAMA_CONFIG = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",  # null: as num_attention_heads
    "head_dim": "head_dim",  # null: hidden_size / num_attention_heads
    "ffn_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_positions": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "hidden_act": "hidden_act",
    "attention_bias": "attention_bias",
    "mlp_bias": "mlp_bias",
    "tie_word_embeddings": "tie_word_embeddings",
}
_LLAMA_DEFAULTS = {  # transformers' LlamaConfig
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
}
_LLAMA_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.out_proj",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn.gate_proj",
    "mlp.up_proj": "ffn.up_proj",
    "mlp.down_proj": "ffn.down_proj",
}
_QK_NORMS = {"self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}
_SANDWICH = {  # Gemma 2 and 3: a norm before and after each sublayer (post_attention_layernorm: after)
    **_LLAMA_LAYER,
    "post_attention_layernorm": "post_attn_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffn_norm",
}


def _llama_like(name: str, **kw) -> DecoderFamily:
    """A family over the Llama block: Llama's config keys, defaults and weight names unless told."""
    return DecoderFamily(
        name=name,
        prefix="model.",
        config={**_LLAMA_CONFIG, **kw.pop("config", {})},
        defaults={**_LLAMA_DEFAULTS, **kw.pop("defaults", {})},
        fixed={"norm": "rms", "positions": "rope", "ffn": "gated", **kw.pop("fixed", {})},
        requires={"pretraining_tp": (1, None), **kw.pop("requires", {})},
        modules={"embed_tokens": "embed.word", "norm": "final_norm", "lm_head": "lm_head"},
        layers="layers",
        layer=kw.pop("layer", _LLAMA_LAYER),
        ignored=("rotary_emb.",),  # the inverse frequencies some checkpoints saved
        buffers=("self_attn.rotary_emb.inv_freq",),
        rope=kw.pop("rope", "rope"),
        **kw,
    )


_NO_BIAS = {"attention_bias": False, "mlp_bias": False}
_QWEN_SLIDING = {  # transformers' Qwen2/Qwen3: layers from max_window_layers on slide, where switched on
    "window": "sliding_window",
    "switch": "use_sliding_window",
    "layers": lambda hf, n: ["sliding" if i >= hf.get("max_window_layers", 28) else "full" for i in range(n)],
}
_GEMMA_NORMS = frozenset({"attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "final_norm"})
_GEMMA = {  # what every Gemma shares: (1 + w) norms, sqrt(hidden) embeddings, GeGLU, a tied head
    "defaults": {"hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True, "head_dim": 256},
    "activations": {"gelu": "gelu_tanh"},  # a Gemma's "gelu" is the tanh form (transformers rewrites it)
    "read": {"embedding_multiplier": lambda hf: math.sqrt(hf["hidden_size"])},
    "fixed": {"mlp_bias": False},
}
_GEMMA_2_3 = {  # Gemma 2 and 3 on top: sandwich norms, hidden_activation, the query_pre_attn_scalar scale
    "config": {"hidden_act": "hidden_activation"},
    "defaults": {
        **_GEMMA["defaults"],
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
    },
    "fixed": {**_GEMMA["fixed"], "norm_placement": "sandwich"},
    "layer": _SANDWICH,
}


def _gemma_read(**more) -> dict:
    scale = {"attention_scale": lambda hf: float(hf["query_pre_attn_scalar"]) ** -0.5}
    return {**_GEMMA["read"], **scale, **more}


def _number(key: str):
    return lambda hf: float(hf[key])


def _cap(key: str):
    return lambda hf: float(hf[key]) if hf.get(key) else None


_GRANITE = {  # its multipliers (1 by default): the attention's replaces 1/sqrt(head_dim)
    "embedding_multiplier": "embedding_multiplier",
    "residual_multiplier": "residual_multiplier",
    "attention_multiplier": "attention_scale",
    "logits_scaling": "logits_divisor",
}
_LLAMA = _llama_like("llama")
_FAMILIES = [
    _LLAMA,
    _llama_like(
        "mistral",
        defaults={
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "max_position_embeddings": 131072,
            "sliding_window": 4096,
        },
        fixed=_NO_BIAS,
        sliding={"window": "sliding_window", "layers": "all"},  # on by default (4096): null turns it off
    ),
    _llama_like(
        "qwen2",
        defaults={"vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32},
        fixed={"attention_bias": True, "out_bias": False, "mlp_bias": False},  # q/k/v biases, no output bias
        sliding=_QWEN_SLIDING,
    ),
    _llama_like(
        "qwen3",
        defaults={
            "vocab_size": 151936,
            "intermediate_size": 22016,
            "num_key_value_heads": 32,
            "head_dim": 128,
        },
        fixed={"qk_norm": "head", "mlp_bias": False},
        layer={**_LLAMA_LAYER, **_QK_NORMS},
        sliding=_QWEN_SLIDING,
    ),
    _llama_like(
        "phi3",
        defaults={
            "vocab_size": 32064,
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
        },
        fixed=_NO_BIAS,
        layer={
            **{
                k: v
                for k, v in _LLAMA_LAYER.items()
                if "q_proj" not in k and "k_proj" not in k and "v_proj" not in k
            },
            "self_attn.qkv_proj": "attn.qkv",
            "mlp.gate_up_proj": "ffn.gate_up",
        },
        split={
            "attn.qkv": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
            "ffn.gate_up": ("ffn.gate_proj", "ffn.up_proj"),
        },
        rope="partial",
        read={"rope_type": lambda kind: "longrope" if kind in ("su", "yarn") else kind},  # Phi-3's old names
        sliding={"window": "sliding_window", "layers": "all"},
    ),
    _llama_like(
        "gemma",
        defaults={**_GEMMA["defaults"], "max_position_embeddings": 8192},
        fixed=_GEMMA["fixed"],
        activations=_GEMMA["activations"],
        read=_GEMMA["read"],
        offset=_GEMMA_NORMS,
    ),
    _llama_like(
        "gemma2",
        **{k: v for k, v in _GEMMA_2_3.items()},
        activations=_GEMMA["activations"],
        read=_gemma_read(
            attention_softcap=_cap("attn_logit_softcapping"), final_softcap=_cap("final_logit_softcapping")
        ),
        offset=_GEMMA_NORMS,
        sliding={
            "window": "sliding_window",
            "layers": lambda hf, n: [_every(2, "sliding")(i) for i in range(n)],
        },
    ),
    _llama_like(
        "gemma3_text",
        **{
            **_GEMMA_2_3,
            "defaults": {**_GEMMA_2_3["defaults"], "rope_theta": 1e6, "rope_local_base_freq": 1e4},
            "fixed": {**_GEMMA_2_3["fixed"], "qk_norm": "head"},
            "layer": {**_SANDWICH, **_QK_NORMS},
        },
        activations=_GEMMA["activations"],
        read=_gemma_read(final_softcap=_cap("final_logit_softcapping")),  # its attention cap is never applied
        offset=_GEMMA_NORMS | {"attn.q_norm", "attn.k_norm"},
        requires={"use_bidirectional_attention": (False, None)},
        sliding={
            "window": "sliding_window",
            "layers": lambda hf, n: [
                _every(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6, "sliding")(
                    i
                )
                for i in range(n)
            ],
        },
    ),
    _llama_like(
        "olmo2",
        defaults={"vocab_size": 50304, "rms_norm_eps": 1e-5},
        fixed={"qk_norm": "projection", "norm_placement": "post", "mlp_bias": False},
        layer={
            **{
                k: v
                for k, v in _LLAMA_LAYER.items()
                if k not in ("input_layernorm", "post_attention_layernorm")
            },
            **_QK_NORMS,
            "post_attention_layernorm": "post_attn_norm",  # after the attention (Llama's: before the MLP)
            "post_feedforward_layernorm": "post_ffn_norm",
        },
    ),
    _llama_like(
        "granite",
        defaults=dict.fromkeys(_GRANITE, 1.0),
        read={ours: _number(key) for key, ours in _GRANITE.items()},
    ),
    _llama_like(
        "smollm3",
        defaults={"vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 2_000_000.0},
        read={"rope_layers": lambda hf: _nope(hf)},
        sliding={  # only its layers without RoPE slide, where switched on
            "window": "sliding_window",
            "switch": "use_sliding_window",
            "layers": lambda hf, n: ["full" if rotates else "sliding" for rotates in _nope(hf)[:n]],
        },
    ),
]


def _nope(hf: dict) -> tuple:
    """SmolLM3's layers that rotate (no_rope_layers: 1 = RoPE), or its rule: every interval-th does not."""
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = hf.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(hf["num_hidden_layers"])]
    if not isinstance(flags, list) or any(f not in (0, 1) for f in flags):
        raise ValueError(f"no_rope_layers {flags!r} is not a list of 0 and 1")
    return tuple(bool(f) for f in flags)


DECODER_FAMILIES = {f.name: f for f in (_GPT2, *_FAMILIES)}


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
