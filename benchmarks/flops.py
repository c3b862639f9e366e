"""Closed-form FLOP count of a BERT forward (matrix products only; 1 multiply-add = 2 FLOPs)."""


def bert_flops(cfg, batch: int, seq: int) -> dict:
    """FLOPs of `BertModel(cfg)` on (batch, seq) by part. Elementwise work (softmax, LayerNorm, GELU,
    embeddings) is left out: it is O(B·L·H) against the matmuls' O(B·L·H²) and O(B·L²·H).

    Per layer: Q, K, V, output projections 2·T·(2·H·H + 2·H·Hkv) with T = B·L tokens; attention QKᵀ and
    P·V 2·2·B·L²·H (= 4·B·L²·H); feed-forward 2·T·2·H·F. Pooler: 2·B·H·H."""
    t, h, f = batch * seq, cfg.hidden_size, cfg.ffn_size
    kv = cfg.head_dim * cfg.kv_heads
    per_layer = {
        "projections": 2 * t * (2 * h * h + 2 * h * kv),
        "attention": 4 * batch * seq * seq * h,
        "ffn": 4 * t * h * f,
    }
    parts = {k: cfg.num_layers * v for k, v in per_layer.items()}
    parts["pooler"] = 2 * batch * h * h if cfg.with_pooler else 0
    parts["total"] = sum(parts.values())
    return parts


def gemm_flops(m: int, k: int, n: int) -> int:
    return 2 * m * k * n
