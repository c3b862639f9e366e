"""Independent NumPy float64 oracle, written from the math (ONNX `Attention`, opset 23).

Imports numpy, math and the project's torch-free format modules (a decoder config's features, the RoPE
frequencies' formulas): never torch or onnxruntime. Weights are a dict of arrays keyed
by the reference module's parameter names; every function computes in float64.
"""

import math
from collections.abc import Mapping

import numpy as np

from ..block import block_spec
from ..decoder_format import DECODER, feature, head_dim, layer_types
from ..rope import frequencies, switches


def _erf(x: np.ndarray) -> np.ndarray:
    """math.erf elementwise (the C library's erf, correctly rounded to ~1 ulp); a plain map over a list is
    about twice as fast as np.vectorize, with the same values."""
    x = np.asarray(x, dtype=np.float64)
    return np.fromiter(map(math.erf, x.ravel().tolist()), np.float64, x.size).reshape(x.shape)


def softmax(x, axis=-1):
    """Softmax; a slice that is all -inf (every key masked) gives 0, not NaN."""
    x = np.asarray(x, dtype=np.float64)
    top = np.max(x, axis=axis, keepdims=True)
    empty = np.isneginf(top)
    e = np.exp(x - np.where(empty, 0.0, top))
    total = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(empty, 1.0, total)


def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, probs=None, bias=None, softcap=0.0):
    """ONNX Attention on 4-D inputs: q (B, Hq, Lq, d), k and v (B, Hkv, Lk, d) -> (B, Hq, Lq, dv).

    attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, Lq, Lk); `bias`: one more
    additive float (a relative position bias) beside a bool mask.
    is_causal: query i sees keys j <= i (top-left aligned). `softcap` > 0: scores capped to (-cap, cap) by
    cap * tanh(score / cap) before the mask. Grouped-query attention when
    Hkv < Hq: q head h uses kv head h // (Hq / Hkv). `probs`: a list that receives the
    attention probabilities (B, Hq, Lq, Lk) with the largest |score| a query attends to.
    """
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    if hq % hkv:
        raise ValueError(f"q heads {hq} not divisible by kv heads {hkv}")
    k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # contiguous operands: numpy's batched matmul uses BLAS only then (~10x faster than its strided loop)
    q, k, v = np.ascontiguousarray(q), np.ascontiguousarray(np.swapaxes(k, -1, -2)), np.ascontiguousarray(v)
    scores = q @ k * scale  # (B, Hq, Lq, Lk)
    if softcap:  # the op's softcap: cap * tanh(scores / cap), before masks and biases
        scores = softcap * np.tanh(scores / softcap)
    lq, lk = scores.shape[-2:]
    allowed = np.ones(scores.shape, dtype=bool)
    if is_causal:
        allowed &= np.tril(np.ones((lq, lk), dtype=bool))
    if attn_mask is not None:
        attn_mask = np.asarray(attn_mask)
        if attn_mask.dtype == bool:
            allowed &= attn_mask
        else:
            scores = scores + attn_mask.astype(np.float64)
    if bias is not None:
        scores = scores + np.asarray(bias, dtype=np.float64)
    p = softmax(np.where(allowed, scores, -np.inf))
    if probs is not None:  # the probabilities, and the scale of the scores they contract (compare.py)
        probs.append((p, float(np.abs(scores[np.broadcast_to(allowed, scores.shape)]).max(initial=0.0))))
    return p @ v


def _times_transposed(x, weight):
    """x W^T over the last axis, as one 2-D product (numpy's stacked 3-D matmul is ~25% slower)."""
    x = np.asarray(x, dtype=np.float64)
    return (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(*x.shape[:-1], weight.shape[0])


def linear(x, w, prefix):
    return _times_transposed(x, w[prefix + ".weight"]) + w[prefix + ".bias"]


def layer_norm(x, w, prefix, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w[prefix + ".weight"] + w[prefix + ".bias"]


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    """GELU's tanh approximation (Hendrycks and Gimpel): transformers' gelu_new."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def relu(x):
    return np.maximum(x, 0.0)


ACTIVATIONS = {"gelu": gelu, "gelu_tanh": gelu_tanh, "relu": relu}


def positions(input_ids, cfg):
    """Position ids: 0..L-1, or (from-ids) 1, 2, ... over the ids that are not pad_token_id, offset by it, and
    pad_token_id itself at padding."""
    ids = np.asarray(input_ids)
    if cfg["positions"] == "absolute":
        return np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    real = ids != cfg["pad_token_id"]
    return np.cumsum(real, axis=1) * real + cfg["pad_token_id"]


def relative_bucket(relative, num_buckets, max_distance=128):
    """MPNet's bucket of a relative position (key - query), from its definition: num_buckets / 2 buckets per
    direction (keys after the query in the upper half), exact distances below a quarter of the buckets, then
    logarithmic in the distance up to max_distance, beyond which all share the last bucket."""
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative)
    upper = np.where(relative > 0, half, 0)
    scaled = exact + np.floor(
        np.log(np.maximum(distance, 1) / exact) / math.log(max_distance / exact) * (half - exact)
    )
    return upper + np.where(distance < exact, distance, np.minimum(scaled, half - 1)).astype(np.int64)


def relative_bias(w, cfg, length):
    """The bias every layer adds to its scores: (1, H, L, L) from the learned (buckets, H) table."""
    position = np.arange(length)
    buckets = relative_bucket(position[None, :] - position[:, None], cfg["relative_attention_buckets"])
    return w["relative_bias.weight"][buckets].transpose(2, 0, 1)[None]


class Trace:
    """What a forward pass records when asked: the taps (values at sublayer boundaries, keyed by (tap,
    layer) as in the manifest) and each attention's probabilities (B, H, Lq, Lk), keyed by layer; `scales`:
    for an output that ends in a contraction (the pooler's tanh), the scale of the value before it."""

    def __init__(self, probs: bool = False):
        self.taps: dict[tuple[str, int | None], np.ndarray] = {}
        self.probs: dict[int, np.ndarray] | None = {} if probs else None
        self.score_scales: dict[int, float] = {}  # per layer with probs: max |score| over attended keys
        self.scales: dict[int, float] = {}

    def keep(self, tap: str, layer: int | None, value: np.ndarray) -> np.ndarray:
        self.taps[tap, layer] = value
        return value


def multi_head_attention(
    x,
    w,
    prefix,
    spec,
    context=None,
    allowed=None,
    is_causal=False,
    probs=None,
    bias=None,
    rotary=None,
    past=None,
):
    """Projections (biases where the weights have them), q and k normed where the block's `spec` says
    (qkv_onnx/block.py), RoPE (`rotary`: (position_ids, inv_freq, factor)), the cache `past` (key, value)
    that new keys and values are appended to, attention per head (scale, soft cap), output projection.
    `allowed`: bool broadcastable to (B, H, Lq, Lk), True = attend. `probs`: a list that receives the
    attention probabilities. Returns y, and with a cache (present key, present value) too."""
    context = x if context is None else context
    b, lq, _ = x.shape
    d = spec["head_dim"]

    def heads(t, n, norm=None):  # (B, L, n*d) -> (B, n, L, d), its q/k norm over the projection or each head
        if norm and spec["qk_norm"] == "projection":
            t = normalize(t, w, norm, spec["norm"], spec["eps"])
        t = t.reshape(b, -1, n, d).transpose(0, 2, 1, 3)
        return normalize(t, w, norm, spec["norm"], spec["eps"]) if norm and spec["qk_norm"] == "head" else t

    qk_norm = spec["qk_norm"] != "none"
    q = heads(dense(x, w, prefix + ".q_proj"), spec["heads"], qk_norm and prefix + ".q_norm")
    k = heads(dense(context, w, prefix + ".k_proj"), spec["kv_heads"], qk_norm and prefix + ".k_norm")
    v = heads(dense(context, w, prefix + ".v_proj"), spec["kv_heads"])
    if rotary is not None:
        q, k = rope(q, *rotary), rope(k, *rotary)
    if past is not None:
        k = np.concatenate([np.asarray(past[0], np.float64), k], axis=2)
        v = np.concatenate([np.asarray(past[1], np.float64), v], axis=2)
    y = attention(q, k, v, allowed, is_causal, spec["scale"], probs, bias, spec["softcap"])  # (B, H, Lq, d)
    y = dense(y.transpose(0, 2, 1, 3).reshape(b, lq, spec["heads"] * d), w, prefix + ".out_proj")
    return y if past is None else (y, (k, v))


def block(x, w, prefix, spec, trace, layer, allowed=None, bias=None, rotary=None, past=None):
    """One transformer block as its `spec` says (qkv_onnx/block.py): attention then feed-forward, each added
    to the residual stream with its norms where the placement puts them (BERT's post-LN: norm(x + f(x));
    pre: x + f(norm x); sandwich: x + norm(f(norm x)); post: x + norm(f(x))), times the residual multiplier.
    `trace` records its taps as `layer`. Returns x, and with a cache `past` the present (key, value) too."""
    placement, r = spec["placement"], spec["residual_multiplier"]
    probs = None if trace.probs is None else []

    def norm(t, name):
        return normalize(t, w, f"{prefix}.{name}", spec["norm"], spec["eps"])

    def added(t, name):  # what a sublayer adds to the residual stream
        return r * (norm(t, f"post_{name}_norm") if placement in ("sandwich", "post") else t)

    outside = placement in ("post-residual", "post")
    h = x if outside else norm(x, "attn_norm")
    y = multi_head_attention(
        h, w, prefix + ".attn", spec, allowed=allowed, probs=probs, bias=bias, rotary=rotary, past=past
    )
    y, present = (y, None) if past is None else y
    if probs:
        trace.probs[layer], trace.score_scales[layer] = probs[0]
    y = trace.keep("attention", layer, y)
    x = norm(x + y, "attn_norm") if placement == "post-residual" else x + added(y, "attn")
    x = trace.keep("attention_block", layer, x)
    h = x if outside else norm(x, "ffn_norm")
    act = DECODER_ACTIVATIONS[spec["act"]]
    if spec["gated"]:
        gated = act(dense(h, w, prefix + ".ffn.gate_proj")) * dense(h, w, prefix + ".ffn.up_proj")
        f = dense(gated, w, prefix + ".ffn.down_proj")
    else:
        f = dense(act(dense(h, w, prefix + ".ffn.fc1")), w, prefix + ".ffn.fc2")
    x = norm(x + f, "ffn_norm") if placement == "post-residual" else x + added(f, "ffn")
    x = trace.keep("block", layer, x)
    return x if past is None else (x, present)


def padding(key_padding_mask):
    """A padding mask (B, Lk), 1 = attend, as the boolean (B, 1, 1, Lk) attention broadcasts."""
    if key_padding_mask is None:
        return None
    m = np.asarray(key_padding_mask).astype(bool)
    return m.reshape(m.shape[0], 1, 1, m.shape[1])


def bert(w, cfg, *inputs, trace=None):
    """Embeddings, blocks, optional final LayerNorm and tanh pooler of a BERT-family encoder; inputs
    (input_ids, [token_type_ids,] attention_mask). Returns a tuple of outputs."""
    trace = trace or Trace()
    input_ids, attention_mask = inputs[0], inputs[-1]
    eps, length = cfg["layer_norm_eps"], input_ids.shape[1]
    x = w["embeddings.word.weight"][input_ids] + w["embeddings.position.weight"][positions(input_ids, cfg)]
    if cfg["type_vocab_size"]:
        x = x + w["embeddings.token_type.weight"][inputs[1]]
    x = layer_norm(x.astype(np.float64), w, "embeddings.norm", eps)
    if cfg["embedding_size"]:
        x = linear(x, w, "embeddings.project")
    x = trace.keep("embeddings", None, x)
    bias = relative_bias(w, cfg, length) if cfg["relative_attention_buckets"] else None
    spec = block_spec("bert", cfg)
    for i in range(cfg["num_layers"]):
        x = block(x, w, f"blocks.{i}", spec, trace, i, padding(attention_mask), bias)
    if cfg["pre_layer_norm"]:
        x = trace.keep("final_norm", None, layer_norm(x, w, "final_norm", eps))
    if not cfg["with_pooler"]:
        return (x,)
    pre = linear(x[:, 0], w, "pooler")
    trace.scales[1] = float(np.abs(pre).max()) if pre.size else 0.0
    return x, trace.keep("pooler", None, np.tanh(pre))


class Float64Weights(Mapping):
    """The weights in float64 one tensor at a time, as the model reads them: what the oracle holds is a
    layer's worth, not twice the model (a 1B model's float64 weights alone are 8.8 GB)."""

    def __init__(self, weights):
        self.weights = weights

    def __getitem__(self, name):
        return np.asarray(self.weights[name], dtype=np.float64)

    def __contains__(self, name):
        return name in self.weights

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)


def as_float64(weights, lazy: bool = False):
    """The weights in float64: converted once (no copy for arrays that already are), or `lazy`, on each
    read (Float64Weights)."""
    if isinstance(weights, Float64Weights):
        return weights
    if lazy:
        return Float64Weights(weights)
    return {name: np.asarray(a, dtype=np.float64) for name, a in weights.items()}


def forward(architecture, cfg, options, weights, inputs, trace=None):
    """Run the model an artifact's manifest describes; inputs and outputs in graph order. A `Trace` records
    the taps (and, when it asks for them, the attention probabilities) on the way."""
    if architecture not in MODELS:
        raise ValueError(f"the oracle does not know architecture {architecture!r}")
    return MODELS[architecture](as_float64(weights), cfg, options, inputs, trace or Trace())


def _attention_module(w, cfg, options, inputs, trace):
    x, *context, mask = inputs
    probs = None if trace.probs is None else []
    y = multi_head_attention(
        np.asarray(x, np.float64),
        w,
        "attn",
        block_spec("attention", cfg),
        context=np.asarray(context[0], np.float64) if context else None,
        allowed=padding(mask),
        is_causal=options.get("causal", False),
        probs=probs,
    )
    if probs:
        trace.probs[0], trace.score_scales[0] = probs[0]
    return (trace.keep("attention", 0, y),)


def _encoder_block(w, cfg, options, inputs, trace):
    x, mask = inputs
    spec = block_spec("encoder-block", cfg)
    return (block(np.asarray(x, np.float64), w, "block", spec, trace, 0, padding(mask)),)


def _decoder(w, cfg, options, inputs, trace):
    input_ids, attention_mask, position_ids, *cache = inputs
    past = [(cache[i], cache[i + 1]) for i in range(0, len(cache), 2)] or None
    logits, present = decoder(w, cfg, input_ids, attention_mask, position_ids, past, trace)
    return (logits, *(t for pair in present for t in pair))


# --- decoder-only language models (GPT-2 style and Llama style) with a KV cache -----------------------


def rms_norm(x, w, prefix, eps):
    """RMSNorm (Zhang and Sennrich): x / sqrt(mean(x^2) + eps) * weight; no centring, no bias."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w[prefix + ".weight"]


def silu(x):
    """SiLU (swish with beta 1): x * sigmoid(x), written as x / (1 + exp(-x))."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative x: x / inf = -0, the limit
        return x / (1.0 + np.exp(-x))


def rope(x, position_ids, frequency, factor=1.0):
    """Rotary position embedding (Su et al., RoFormer) of x (B, H, S, d) at position_ids (B, S), in the
    rotate-half layout over its first r dims (the rest pass unrotated): for i < r/2, the pair
    (x_i, x_{i + r/2}) is rotated in its plane by the angle position * inv_freq[i], and scaled by the
    scaling's attention `factor`. `frequency`: theta (r = d, inv_freq[i] = theta^(-2i/d)), or the inverse
    frequencies themselves (r = 2 len(inv_freq); qkv_onnx/rope.py: the scalings)."""
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1]
    if np.ndim(frequency) == 0:
        if d % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {d}")
        frequency = float(frequency) ** (-2.0 * np.arange(d // 2, dtype=np.float64) / d)
    inv_freq = np.asarray(frequency, dtype=np.float64)
    half = len(inv_freq)
    r = 2 * half
    if r > x.shape[-1]:
        raise ValueError(f"RoPE over {r} dims of a head of {x.shape[-1]}")
    angle = np.asarray(position_ids, dtype=np.float64)[:, None, :, None] * inv_freq  # (B, 1, S, r/2)
    cos, sin = factor * np.cos(angle), factor * np.sin(angle)
    first, second = x[..., :half], x[..., half:r]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin, x[..., r:]], axis=-1)


def dense(x, w, prefix):
    """`linear` whose bias may be absent from the weights (attention_bias / mlp_bias off)."""
    y = _times_transposed(x, w[prefix + ".weight"])
    return y + w[prefix + ".bias"] if prefix + ".bias" in w else y


DECODER_ACTIVATIONS = {**ACTIVATIONS, "silu": silu}


def normalize(x, w, prefix, kind, eps):
    """LayerNorm ("layer": its bias where the weights have one) or RMSNorm ("rms") over the last axis."""
    if kind == "rms":
        return rms_norm(x, w, prefix, eps)
    mean = x.mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps) * w[prefix + ".weight"]
    return y + w[prefix + ".bias"] if prefix + ".bias" in w else y


def decoder(w, cfg: dict, input_ids, attention_mask, position_ids, past: list | None = None, trace=None):
    """A decoder-only LM (model_defs/decoder.py's DecoderConfig as a dict, qkv_onnx/decoder_format's features)
    over its KV cache.

    input_ids, position_ids (B, S); attention_mask (B, P + S), 1 = a real token; past: a list of (key, value)
    per layer, each (B, kv_heads, P, head_dim), or None for P = 0. Query i sits at cache index P + i and
    attends key j iff j <= P + i and attention_mask[b, j] == 1 (on a sliding layer also j > P + i - window);
    a query with no such key gets 0. Per layer: norms before each sublayer, around it or after it, q/k
    RMS-normed over each head or the whole projection, RoPE (scaled, partial, a sliding layer's own theta, or
    none), scores scaled and soft-capped (cap tanh(s / cap)), each sublayer's output times the residual
    multiplier; embeddings times their multiplier; final norm, LM head (lm_head.weight, or embed.word.weight
    when absent: tied), logits divided and soft-capped.
    Returns (logits (B, S, V), present: a list of (key, value), each (B, kv_heads, P + S, head_dim))."""
    trace = trace or Trace()
    input_ids = np.asarray(input_ids)
    b, s = input_ids.shape
    kv_heads, d = cfg.get("num_kv_heads") or cfg["num_heads"], head_dim(cfg)
    past = past or [(np.zeros((b, kv_heads, 0, d)), np.zeros((b, kv_heads, 0, d)))] * cfg["num_layers"]
    p = past[0][0].shape[2]
    mask = np.asarray(attention_mask).astype(bool)
    if mask.shape != (b, p + s):
        raise ValueError(f"attention_mask {mask.shape} is not (batch, past + seq) = {(b, p + s)}")
    query, key = p + np.arange(s)[:, None], np.arange(p + s)[None, :]  # cache indices
    allowed = {
        "full": mask[:, None, None, :] & (key <= query)[None, None],
        "sliding": mask[:, None, None, :]
        & ((key <= query) & (key > query - (cfg.get("sliding_window") or 0)))[None, None],
    }
    positions = np.asarray(position_ids)
    longest = int(positions.max()) + 1 if positions.size else 0
    tables = {}  # layer type -> (inv_freq, attention factor) of the RoPE it reads
    if cfg["positions"] == "rope":
        original = switches(cfg)
        long = original is not None and longest > original
        local = {t: t == "sliding" and bool(cfg.get("rope_local_theta")) for t in allowed}  # its own theta
        tables = {t: frequencies(cfg, local=local[t], long=long and not local[t]) for t in allowed}

    x = w["embed.word.weight"][input_ids].astype(np.float64)
    if cfg["positions"] == "learned":
        x = x + w["embed.position.weight"][positions]
    x = trace.keep("embeddings", None, x * feature(cfg, "embedding_multiplier"))

    spec, present = block_spec(DECODER, cfg), []
    rotates = cfg.get("rope_layers") or [True] * cfg["num_layers"]
    for layer, kind in enumerate(layer_types(cfg)):
        rotary = (positions, *tables[kind]) if cfg["positions"] == "rope" and rotates[layer] else None
        x, cache = block(
            x, w, f"blocks.{layer}", spec, trace, layer, allowed[kind], rotary=rotary, past=past[layer]
        )
        present.append(cache)
    x = trace.keep("final_norm", None, normalize(x, w, "final_norm", cfg["norm"], cfg["norm_eps"]))
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["embed.word.weight"]
    logits = x @ head.T / feature(cfg, "logits_divisor")
    final_cap = feature(cfg, "final_softcap")
    return (final_cap * np.tanh(logits / final_cap) if final_cap else logits), present


# each architecture's model: (float64 weights, config, options, inputs, trace) -> outputs in graph order
MODELS = {
    "attention": _attention_module,
    "encoder-block": _encoder_block,
    "bert": lambda w, cfg, options, inputs, trace: bert(w, cfg, *inputs, trace=trace),
    DECODER: _decoder,
}
