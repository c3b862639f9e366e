"""What a decoder artifact (architecture 'decoder') is, as data: its config fields, its graph's inputs and
outputs (prefill and decode in one graph, the KV cache in and out), and the weights its config implies. The
manifest checks, the validator's bounds and the exporter read these, as they read artifact_format's for the
encoders. NumPy-free and torch-free."""

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


def kv_heads(cfg: dict) -> int:
    return cfg["num_kv_heads"] or cfg["num_heads"]


def head_dim(cfg: dict) -> int:
    return cfg["hidden_size"] // cfg["num_heads"]


def config_problem(cfg: dict) -> str | None:
    """What is wrong with a decoder config read from a manifest, or None."""
    unknown = sorted(set(cfg) - set(CONFIG_FIELDS))
    if unknown:
        return f"model config has unknown field {unknown[0]!r}"
    absent = [k for k in CONFIG_FIELDS if k not in cfg]
    if absent:
        return f"model config lacks {absent[0]!r}"
    bad = [k for k, ok in CONFIG_FIELDS.items() if not ok(cfg[k])]
    if bad:
        return f"model config {bad[0]} = {cfg[bad[0]]!r} is not valid"
    if cfg["hidden_size"] % cfg["num_heads"] or cfg["num_heads"] % kv_heads(cfg):
        layout = f"{cfg['hidden_size']}/{cfg['num_heads']}/{kv_heads(cfg)}"
        return f"model config has an impossible head layout: {layout}"
    if cfg["positions"] == "rope" and head_dim(cfg) % 2:
        return f"model config: RoPE needs an even head_dim, got {head_dim(cfg)}"
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
            inputs.append(value(f"past_key_values.{i}.{t}", ("batch", kvh, "past", d), f"past_{t}"))
            outputs.append(value(f"present.{i}.{t}", ("batch", kvh, "total", d)))
    return inputs, outputs


def expected_weights(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape of model_defs.decoder.DecoderModel(cfg)'s state_dict (a tied LM head
    is not stored twice: weights.npz holds embed.word.weight only)."""
    h, f, v = cfg["hidden_size"], cfg["ffn_size"], cfg["vocab_size"]
    kv = kv_heads(cfg) * head_dim(cfg)

    def linear(prefix, out_f, in_f, bias):
        return {f"{prefix}.weight": (out_f, in_f), **({f"{prefix}.bias": (out_f,)} if bias else {})}

    def norm(prefix):
        return {f"{prefix}.weight": (h,), **({f"{prefix}.bias": (h,)} if cfg["norm"] == "layer" else {})}

    out = {"embed.word.weight": (v, h)}
    if cfg["positions"] == "learned":
        out["embed.position.weight"] = (cfg["max_positions"], h)
    ab, mb = cfg["attention_bias"], cfg["mlp_bias"]
    for i in range(cfg["num_layers"]):
        p = f"blocks.{i}"
        out.update(norm(f"{p}.attn_norm"))
        out.update(linear(f"{p}.attn.q_proj", h, h, ab))
        out.update(linear(f"{p}.attn.k_proj", kv, h, ab))
        out.update(linear(f"{p}.attn.v_proj", kv, h, ab))
        out.update(linear(f"{p}.attn.out_proj", h, h, ab))
        out.update(norm(f"{p}.ffn_norm"))
        if cfg["ffn"] == "gated":
            out.update(linear(f"{p}.ffn.gate_proj", f, h, mb))
            out.update(linear(f"{p}.ffn.up_proj", f, h, mb))
            out.update(linear(f"{p}.ffn.down_proj", h, f, mb))
        else:
            out.update(linear(f"{p}.ffn.fc1", f, h, mb))
            out.update(linear(f"{p}.ffn.fc2", h, f, mb))
    out.update(norm("final_norm"))
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def weight_totals(cfg: dict) -> tuple[int, int]:
    """(tensors, elements) of expected_weights(cfg) in closed form, before anything is enumerated."""
    h, f, v, layers = cfg["hidden_size"], cfg["ffn_size"], cfg["vocab_size"], cfg["num_layers"]
    kv = kv_heads(cfg) * head_dim(cfg)
    norm = (2, 2 * h) if cfg["norm"] == "layer" else (1, h)
    ab, mb, gated = cfg["attention_bias"], cfg["mlp_bias"], cfg["ffn"] == "gated"
    attn = (4 * (1 + ab), 2 * h * h + 2 * kv * h + ab * (2 * h + 2 * kv))
    ffn = ((3 if gated else 2) * (1 + mb), (3 if gated else 2) * h * f + mb * ((2 * f if gated else f) + h))
    tensors = 1 + (cfg["positions"] == "learned") + layers * (attn[0] + ffn[0] + 2 * norm[0]) + norm[0]
    elements = v * h + (cfg["positions"] == "learned") * cfg["max_positions"] * h
    elements += layers * (attn[1] + ffn[1] + 2 * norm[1]) + norm[1]
    if not cfg["tie_word_embeddings"]:
        tensors, elements = tensors + 1, elements + v * h
    return tensors, elements
