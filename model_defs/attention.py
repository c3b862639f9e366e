"""Multi-head attention through `F.scaled_dot_product_attention`: every model's attention (an encoder's, an
attention layer's, a decoder's over its KV cache)."""

import torch
import torch.nn.functional as F
from torch import nn


def combine_masks(key_padding_mask, attn_mask, is_causal, batch, q_len, kv_len, device):
    """Fold padding, causal and explicit masks into one SDPA mask (or None).

    key_padding_mask: (B, Lk) bool, True = attend. attn_mask: bool (True = attend) or
    additive float (a position bias), broadcastable to (B, H, Lq, Lk). Returns (mask, is_causal,
    allowed) for SDPA, which does not take a mask and is_causal together; `allowed` is the bool
    (B, 1, Lq, Lk) of keys a query may attend to, or None. A padding mask is expanded to the full
    (B, 1, Lq, Lk): some runtimes reject the broadcast form (B, 1, 1, Lk).
    """
    masks = []
    if key_padding_mask is not None:
        masks.append(key_padding_mask[:, None, None, :].expand(batch, 1, q_len, kv_len))
    if is_causal and (key_padding_mask is not None or attn_mask is not None):
        masks.append(torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril())
        is_causal = False
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        masks.append(attn_mask)
    allowed = None
    for m in masks:
        allowed = m if allowed is None else allowed & m
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        if allowed is None:
            return attn_mask, is_causal, None
        return attn_mask.masked_fill(~allowed, float("-inf")), is_causal, allowed
    return allowed, is_causal, allowed


def rotate(x, cos, sin):
    """RoPE: x (B, H, S, d) rotated in its first cos.shape[-1] dims, rotate-half layout (partial rotary: the
    rest pass through)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([rotate(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class MultiHeadAttention(nn.Module):
    """Q/K/V projections, scaled dot-product attention per head, output projection.

    Self-attention when `context` is None, cross-attention otherwise. Grouped-query attention when
    num_kv_heads < num_heads: q head h reads kv head h // (Hq / Hkv). A decoder's options: an explicit head
    width, biases on q/k/v and the output apart, q and k normed (`qk_norm`: over each head or the whole
    projection, by `norm(width)`) before RoPE, scores scaled by `scale` (default 1/sqrt(head_dim)) and
    soft-capped (cap * tanh(score / cap)).

    Masks come in two forms. An encoder's: a padding mask (B, Lk), an additive float or boolean `attn_mask`,
    `is_causal` (combine_masks folds them). A decoder's: `allowed` (B, 1, Lq, P + Lq), the keys each query
    may read over the cache `past` = (key, value) of (B, Hkv, P, d) that new keys and values are appended to;
    it then returns (y, present key, present value).

    A query whose keys are all masked attends to nothing and gets 0 (before out_proj), as SDPA and the ONNX
    `Attention` op give. With a cache that rule is always written into the graph (SDPA gives NaN there, which
    the next layer would spread over the whole row); `zero_empty_rows` writes it for an encoder too, for
    backends whose fused kernel has another convention (com.microsoft attention averages V).
    `fused_softcap`: set by the exporter where the fused op caps the scores itself (the `softcap` of ONNX
    `Attention` and of GroupQueryAttention): the graph then traces SDPA and export/cache.py sets the op's cap;
    otherwise (eager, decomposed) the cap is computed here.
    """

    zero_empty_rows = False
    fused_softcap = False

    def __init__(
        self,
        hidden_size,
        num_heads,
        num_kv_heads=None,
        kv_input_size=None,
        scale=None,
        *,
        head_dim=None,
        bias=True,
        out_bias=None,
        qk_norm="none",
        norm=None,
        softcap=0.0,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        uneven = head_dim is None and hidden_size % num_heads
        if num_heads < 1 or num_kv_heads < 1 or uneven or num_heads % num_kv_heads:
            raise ValueError(
                f"bad head layout: hidden {hidden_size}, heads {num_heads}, kv heads {num_kv_heads}"
            )
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.scale, self.softcap, self.qk_norm = scale, softcap, qk_norm
        q_width, kv_width = self.head_dim * num_heads, self.head_dim * num_kv_heads
        kv_input_size = kv_input_size or hidden_size
        self.q_proj = nn.Linear(hidden_size, q_width, bias=bias)
        self.k_proj = nn.Linear(kv_input_size, kv_width, bias=bias)
        self.v_proj = nn.Linear(kv_input_size, kv_width, bias=bias)
        if qk_norm != "none":
            per_head = qk_norm == "head"
            self.q_norm = norm(self.head_dim if per_head else q_width)
            self.k_norm = norm(self.head_dim if per_head else kv_width)
        self.out_proj = nn.Linear(q_width, hidden_size, bias=bias if out_bias is None else out_bias)

    def forward(
        self,
        x,
        context=None,
        key_padding_mask=None,
        attn_mask=None,
        is_causal=False,
        *,
        allowed=None,
        rope=None,
        past=None,
    ):
        B, Lq, _ = x.shape  # (batch, query length, hidden)
        context = x if context is None else context  # (B, Lk, Dkv)
        Lk = context.shape[1]
        q = self._heads(self.q_proj(x), self.num_heads, getattr(self, "q_norm", None))  # (B, Hq, Lq, d)
        k = self._heads(
            self.k_proj(context), self.num_kv_heads, getattr(self, "k_norm", None)
        )  # (B, Hkv, Lk, d)
        v = self._heads(self.v_proj(context), self.num_kv_heads, None)  # (B, Hkv, Lk, d)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if past is not None:  # the cache: (B, Hkv, P + Lk, d)
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if allowed is None:
            mask, is_causal, allowed = combine_masks(
                key_padding_mask, attn_mask, is_causal, B, Lq, Lk, x.device
            )
        else:
            mask = allowed
        if self.softcap and not self.fused_softcap:
            y = self._capped(q, k, v, allowed)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=is_causal,
                scale=self.scale,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )  # (B, Hq, Lq, d)
        if past is not None:
            y = torch.where(allowed.any(-1, keepdim=True), y, 0)
        y = y.transpose(1, 2).reshape(B, Lq, self.num_heads * self.head_dim)
        if self.zero_empty_rows and allowed is not None and past is None:
            y = torch.where(allowed.any(-1).transpose(1, 2), y, 0)  # (B, Lq, 1): query has a key to attend to
        y = self.out_proj(y)
        return y if past is None else (y, k, v)

    def _heads(self, t, n: int, qk_norm):
        """(B, L, n * d) -> (B, n, L, d), normed over the projection or each head where q/k norms are on."""
        B, L, _ = t.shape
        if qk_norm is not None and self.qk_norm == "projection":
            t = qk_norm(t)
        t = t.view(B, L, n, self.head_dim).transpose(1, 2)
        return qk_norm(t) if qk_norm is not None and self.qk_norm == "head" else t

    def _capped(self, q, k, v, allowed):
        """Attention with soft-capped scores, written out: softmax(cap tanh(q k^T scale / cap)) v."""
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scale = self.head_dim**-0.5 if self.scale is None else self.scale
        scores = torch.tanh(q @ k.transpose(-1, -2) * scale / self.softcap) * self.softcap
        if allowed is not None:  # per layer, as the SDPA it stands for (no mask op shared by layers)
            scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1) @ v
