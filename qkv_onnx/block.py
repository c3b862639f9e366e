"""The one transformer block every model repeats, as data: which parts it has, read off any config (an
encoder's or a decoder's manifest config). The PyTorch block (model_defs/block.py), the oracle's, the weights
a config implies and the tolerance's stages all read this record; none asks which architecture or family a
block came from. Torch-free.

A block is attention then feed-forward, each a sublayer added to the residual stream:
- placement "post-residual" (BERT's post-LN): x = norm(x + sublayer(x));
- "pre": x = x + sublayer(norm(x)); "sandwich": x = x + norm(sublayer(norm(x)));
- "post": x = x + norm(sublayer(x));
each sublayer's output times `residual_multiplier` before it is added (1: none).
"""

from . import decoder_format

PLACEMENTS = ("post-residual", "pre", "sandwich", "post")


def block_spec(architecture: str, cfg: dict) -> dict:
    """The block of a model of `architecture` under its manifest `cfg`."""
    from .artifact_format import ARCHITECTURES  # it reads this module's records: imported when first asked

    if ARCHITECTURES[architecture].cached:
        bias = cfg["attention_bias"]
        out_bias = decoder_format.feature(cfg, "out_bias")
        return {
            "hidden": cfg["hidden_size"],
            "heads": cfg["num_heads"],
            "kv_heads": decoder_format.kv_heads(cfg),
            "head_dim": decoder_format.head_dim(cfg),
            "ffn": cfg["ffn_size"],
            "act": cfg["hidden_act"],
            "gated": cfg["ffn"] == "gated",
            "norm": cfg["norm"],
            "eps": cfg["norm_eps"],
            "placement": decoder_format.feature(cfg, "norm_placement"),
            "bias": bias,
            "out_bias": bias if out_bias is None else out_bias,
            "mlp_bias": cfg["mlp_bias"],
            "qk_norm": decoder_format.feature(cfg, "qk_norm"),
            "scale": decoder_format.feature(cfg, "attention_scale"),
            "softcap": decoder_format.feature(cfg, "attention_softcap"),
            "residual_multiplier": decoder_format.feature(cfg, "residual_multiplier"),
            "norm_first": True,  # a decoder's state dict lists a sublayer's norm before it (GPT-2, Llama)
        }
    return {
        "hidden": cfg["hidden_size"],
        "heads": cfg["num_heads"],
        "kv_heads": cfg["num_kv_heads"] or cfg["num_heads"],
        "head_dim": cfg["hidden_size"] // cfg["num_heads"],
        "ffn": cfg["ffn_size"],
        "act": cfg.get("hidden_act", "gelu"),
        "gated": False,
        "norm": "layer",
        "eps": cfg["layer_norm_eps"],
        "placement": "pre" if cfg["pre_layer_norm"] else "post-residual",
        "bias": True,
        "out_bias": True,
        "mlp_bias": True,
        "qk_norm": "none",
        "scale": None,
        "softcap": 0.0,
        "residual_multiplier": 1.0,
        "norm_first": False,  # an encoder's lists the sublayer first (BERT)
    }


def block_weights(spec: dict) -> dict[str, tuple[int, ...]]:
    """One block's parameters (names relative to the block) and shapes, in its state dict's order."""
    h, f, d = spec["hidden"], spec["ffn"], spec["head_dim"]
    q, kv = spec["heads"] * d, spec["kv_heads"] * d

    def linear(prefix, out_f, in_f, bias):
        return {f"{prefix}.weight": (out_f, in_f), **({f"{prefix}.bias": (out_f,)} if bias else {})}

    def norm(prefix, width=h):
        return {
            f"{prefix}.weight": (width,),
            **({f"{prefix}.bias": (width,)} if spec["norm"] == "layer" else {}),
        }

    attention = {
        **linear("attn.q_proj", q, h, spec["bias"]),
        **linear("attn.k_proj", kv, h, spec["bias"]),
        **linear("attn.v_proj", kv, h, spec["bias"]),
    }
    if spec["qk_norm"] != "none":
        attention.update(norm("attn.q_norm", d if spec["qk_norm"] == "head" else q))
        attention.update(norm("attn.k_norm", d if spec["qk_norm"] == "head" else kv))
    attention.update(linear("attn.out_proj", h, q, spec["out_bias"]))
    if spec["gated"]:
        ffn = {
            **linear("ffn.gate_proj", f, h, spec["mlp_bias"]),
            **linear("ffn.up_proj", f, h, spec["mlp_bias"]),
            **linear("ffn.down_proj", h, f, spec["mlp_bias"]),
        }
    else:
        ffn = {**linear("ffn.fc1", f, h, spec["mlp_bias"]), **linear("ffn.fc2", h, f, spec["mlp_bias"])}
    out = {}
    for name, sublayer in (("attn", attention), ("ffn", ffn)):
        before = norm(f"{name}_norm") if spec["placement"] != "post" else {}
        after = norm(f"post_{name}_norm") if spec["placement"] in ("sandwich", "post") else {}
        out.update({**before, **sublayer} if spec["norm_first"] else {**sublayer, **before})
        out.update(after)
    return out


def block_stages(spec: dict) -> tuple[int, int]:
    """The sequential rounding stages of the attention and feed-forward sublayers (tolerance policy): one
    each, its norm included; q/k norms add one to the attention, a norm after a sublayer as well as before it
    (sandwich) one to each."""
    after = spec["placement"] == "sandwich"
    return 1 + after + (spec["qk_norm"] != "none"), 1 + after
