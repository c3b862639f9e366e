"""What a decoder artifact (architecture 'decoder') is, as data: its config fields, its graph's inputs and
outputs (prefill and decode in one graph, the KV cache in and out), and the weights its config implies. The
manifest checks, the validator's bounds and the exporter read these, as they read artifact_format's for the
encoders. Torch-free."""

import math

from . import rope

DECODER = "decoder"
LOGITS = "logits"  # the output the int8 contract judges by next-token agreement too
NORMS = ("layer", "rms")
POSITIONS = ("learned", "rope")
FFNS = ("mlp", "gated")
ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")


# (batch, seq, real tokens per row over past + seq, past): left-padded prompts (a row of one real token), a
# decode step with a cache, a chunk read over a cache. No batch > 1 chunk over a cache: ORT's CPU
# GroupQueryAttention refuses it (batch_size must be 1 when sequence_length > 1 and past context is given).
GOLDEN_CASES = [(2, 8, [8, 5], 0), (2, 1, [9, 4], 8), (1, 4, [12], 8)]
VALIDATION_CASES = [
    (1, 1, [1], 0),
    (3, 9, [9, 5, 1], 0),
    (3, 1, [10, 6, 2], 9),
    (1, 7, [15], 8),
    (2, 64, [64, 40], 0),
]


def _positive_int(v) -> bool:
    return type(v) is int and v > 0


def _flag(v) -> bool:
    return type(v) is bool


CONFIG_FIELDS = {  # model_defs.decoder.DecoderConfig, field by field
    "num_layers": _positive_int,
    "hidden_size": _positive_int,
    "num_heads": _positive_int,
    "num_kv_heads": lambda v: v is None or _positive_int(v),
    "ffn_size": _positive_int,
    "vocab_size": _positive_int,
    "max_positions": _positive_int,
    "norm": lambda v: v in NORMS,
    "norm_eps": lambda v: type(v) is float and 0 < v < 1,
    "positions": lambda v: v in POSITIONS,
    "rope_theta": lambda v: type(v) is float and v > 1,
    "ffn": lambda v: v in FFNS,
    "hidden_act": lambda v: v in ACTIVATIONS,
    "attention_bias": _flag,
    "mlp_bias": _flag,
    "tie_word_embeddings": _flag,
}


def _scale(v) -> bool:
    return type(v) is float and 0 < v < 1e6


def _per_layer(allowed):
    return lambda v: (
        v is None or (isinstance(v, list) and 0 < len(v) <= 100_000 and all(x in allowed for x in v))
    )


MAX_POSITIONS = 1 << 24  # tokens: past every context a decoder is trained for (Llama 4's is 10M)
QK_NORMS = (
    "none",
    "head",
    "projection",
)  # RMSNorm of q and k: none, over each head, over the whole projection
PLACEMENTS = ("pre", "sandwich", "post")  # norms before each sublayer; before and after it; after it only
LAYER_TYPES = ("full", "sliding")
# The features of the current families (docs/decoders.md), each off by default: a manifest holds one only
# where it is on, so an artifact of the GPT-2 and Llama styles is written (and read) as before they existed.
FEATURES = {
    "head_dim": (None, lambda v: v is None or (_positive_int(v) and v <= 4096)),  # None: hidden / heads
    "out_bias": (None, lambda v: v is None or _flag(v)),  # the output projection's bias; None: attention_bias
    "qk_norm": ("none", lambda v: v in QK_NORMS),
    "norm_placement": ("pre", lambda v: v in PLACEMENTS),
    "embedding_multiplier": (1.0, _scale),  # Gemma: sqrt(hidden); Granite
    "residual_multiplier": (1.0, _scale),  # each sublayer's output, before it is added (Granite)
    "attention_scale": (None, lambda v: v is None or _scale(v)),  # None: 1 / sqrt(head_dim)
    "logits_divisor": (1.0, _scale),  # Granite's logits_scaling
    "attention_softcap": (0.0, lambda v: v == 0.0 or _scale(v)),  # cap * tanh(score / cap); 0: none
    "final_softcap": (0.0, lambda v: v == 0.0 or _scale(v)),  # the logits' cap
    "sliding_window": (None, lambda v: v is None or _positive_int(v)),  # a sliding layer sees this many keys
    "layer_types": (None, _per_layer(LAYER_TYPES)),  # None: every layer full
    "rope_scaling": (None, lambda v: rope.scaling_problem(v) is None),
    "rotary_dim": (None, lambda v: v is None or (_positive_int(v) and not v % 2)),  # None: head_dim
    "rope_local_theta": (None, lambda v: v is None or (type(v) is float and v > 1)),  # sliding layers' theta
    "rope_layers": (None, _per_layer((True, False))),  # per layer, whether it rotates; None: every layer
}


def feature(cfg: dict, name: str):
    """A config's feature field, its default where the manifest leaves it out."""
    return cfg.get(name, FEATURES[name][0])


def kv_heads(cfg: dict) -> int:
    return cfg["num_kv_heads"] or cfg["num_heads"]


def head_dim(cfg: dict) -> int:
    """The width of one attention head: explicit (Qwen3, Gemma), else hidden / heads."""
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_heads"]


def unverified(cfg: dict) -> list[str]:
    """What a decoder's manifest says that its graph does not encode, so that no check can prove it."""
    if cfg["positions"] == "rope":  # a RoPE graph has no position table: any length runs
        return [
            f"max_positions {cfg['max_positions']} (RoPE needs no table; it bounds the cases judged only)"
        ]
    return []


PAST, PRESENT = "past_key_values", "present"  # a layer's cache in and out: PAST.N.key, PRESENT.N.value
PER_LAYER = ("layer_types", "rope_layers")  # the fields that may make one layer unlike another


def layer_types(cfg: dict) -> list[str]:
    return list(cfg.get("layer_types") or ["full"] * cfg["num_layers"])


def config_problem(cfg: dict) -> str | None:
    """What is wrong with a decoder config read from a manifest, or None."""
    unknown = sorted(set(cfg) - set(CONFIG_FIELDS) - set(FEATURES))
    if unknown:
        return f"model config has unknown field {unknown[0]!r}"
    absent = [k for k in CONFIG_FIELDS if k not in cfg]
    if absent:
        return f"model config lacks {absent[0]!r}"
    checks = {**CONFIG_FIELDS, **{k: ok for k, (_, ok) in FEATURES.items()}}
    bad = [k for k, ok in checks.items() if k in cfg and not ok(cfg[k])]
    if bad:
        problem = rope.scaling_problem(cfg[bad[0]]) if bad[0] == "rope_scaling" else None
        return f"model config {problem or f'{bad[0]} = {cfg[bad[0]]!r} is not valid'}"
    d = head_dim(cfg)
    if (not cfg.get("head_dim") and cfg["hidden_size"] % cfg["num_heads"]) or cfg["num_heads"] % kv_heads(
        cfg
    ):
        layout = f"{cfg['hidden_size']}/{cfg['num_heads']}/{kv_heads(cfg)}"
        return f"model config has an impossible head layout: {layout}"
    rotary = cfg.get("rotary_dim") or d
    if cfg["positions"] == "rope" and (rotary % 2 or rotary > d):
        return f"model config: RoPE needs an even rotary_dim of at most head_dim {d}, got {rotary}"
    rotating = cfg["positions"] == "rope"
    if not rotating and any(
        k in cfg for k in ("rope_scaling", "rotary_dim", "rope_local_theta", "rope_layers")
    ):
        return "model config: RoPE settings on a model with learned positions"
    for key in ("layer_types", "rope_layers"):
        if key in cfg and len(cfg[key]) != cfg["num_layers"]:
            return f"model config {key} has {len(cfg[key])} entries for {cfg['num_layers']} layers"
    if ("sliding" in layer_types(cfg)) != ("sliding_window" in cfg):
        return "model config: a sliding_window exactly when some layer type is sliding"
    if "rope_local_theta" in cfg and "sliding" not in layer_types(cfg):
        return "model config: rope_local_theta without a sliding layer to read it"
    if "rope_layers" in cfg and not any(cfg["rope_layers"]):
        return "model config: rope_layers turn RoPE off on every layer"
    if cfg["max_positions"] > MAX_POSITIONS:
        return f"model config max_positions {cfg['max_positions']} is past any model's ({MAX_POSITIONS})"
    scaling = cfg.get("rope_scaling") or {}
    if any(len(scaling.get(k, [0] * (rotary // 2))) != rotary // 2 for k in ("short_factor", "long_factor")):
        return f"model config: longrope needs rotary_dim / 2 = {rotary // 2} factors of each kind"
    return None


def model_io(cfg: dict, dtype: str) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) as the manifest lists them. Symbolic dims: batch, seq (new tokens), past (cached
    tokens, may be 0) and total (past + seq)."""
    kvh, d = kv_heads(cfg), head_dim(cfg)

    def value(name, shape, role=None):
        record = {"name": name, "dtype": dtype if role in (None, "past_key", "past_value") else "int64"}
        record["shape"] = list(shape)
        return {**record, "role": role} if role else record

    inputs = [
        value("input_ids", ("batch", "seq"), "token_ids"),
        value("attention_mask", ("batch", "total"), "padding_mask"),
        value("position_ids", ("batch", "seq"), "position_ids"),
    ]
    outputs = [value("logits", ("batch", "seq", cfg["vocab_size"]))]
    for i in range(cfg["num_layers"]):
        for t in ("key", "value"):
            inputs.append(value(f"{PAST}.{i}.{t}", ("batch", kvh, "past", d), f"past_{t}"))
            outputs.append(value(f"{PRESENT}.{i}.{t}", ("batch", kvh, "total", d)))
    return inputs, outputs


def layer_weights(cfg: dict) -> dict[str, tuple[int, ...]]:
    """One block's parameters (names relative to blocks.N) and shapes: every block has the same."""
    from .block import block_spec, block_weights

    return block_weights(block_spec(DECODER, cfg))


def model_weights(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The parameters outside the blocks: embeddings, final norm, an untied LM head."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    out = {"embed.word.weight": (v, h)}
    if cfg["positions"] == "learned":
        out["embed.position.weight"] = (cfg["max_positions"], h)
    out["final_norm.weight"] = (h,)
    if cfg["norm"] == "layer":
        out["final_norm.bias"] = (h,)
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def expected_weights(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape of model_defs.decoder.DecoderModel(cfg)'s state_dict, in its order (a
    tied LM head is not stored twice: weights.npz holds embed.word.weight only)."""
    outside = model_weights(cfg)
    first = {k: v for k, v in outside.items() if k.startswith("embed.")}
    block = layer_weights(cfg)
    layers = {f"blocks.{i}.{k}": v for i in range(cfg["num_layers"]) for k, v in block.items()}
    return {**first, **layers, **{k: v for k, v in outside.items() if k not in first}}


def weight_totals(cfg: dict) -> tuple[int, int]:
    """(tensors, elements) of expected_weights(cfg), from one block's, before any layer is enumerated."""

    def size(shapes):
        return len(shapes), sum(math.prod(s) for s in shapes.values())

    (bt, be), (mt, me) = size(layer_weights(cfg)), size(model_weights(cfg))
    return mt + cfg["num_layers"] * bt, me + cfg["num_layers"] * be
