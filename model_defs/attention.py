"""Multi-head attention through `F.scaled_dot_product_attention`."""

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


class MultiHeadAttention(nn.Module):
    """Q/K/V projections, scaled dot-product attention per head, output projection.

    Self-attention when `context` is None, cross-attention otherwise. Grouped-query
    attention when num_kv_heads < num_heads: q head h reads kv head h // (Hq / Hkv).

    A query whose keys are all masked attends to nothing and gets 0 (before out_proj), as SDPA
    and the ONNX `Attention` op give. `zero_empty_rows` writes that rule into the graph as an
    explicit Where, for backends whose fused kernel has another convention (com.microsoft
    attention averages V).
    """

    zero_empty_rows = False

    def __init__(self, hidden_size, num_heads, num_kv_heads=None, kv_input_size=None, scale=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"bad head layout: hidden {hidden_size}, heads {num_heads}, kv heads {num_kv_heads}"
            )
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.scale = scale
        kv_width = self.head_dim * num_kv_heads
        kv_input_size = kv_input_size or hidden_size
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(kv_input_size, kv_width)
        self.v_proj = nn.Linear(kv_input_size, kv_width)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, context=None, key_padding_mask=None, attn_mask=None, is_causal=False):
        B, Lq, D = x.shape  # (batch, query length, hidden)
        context = x if context is None else context  # (B, Lk, Dkv)
        Lk = context.shape[1]
        q = self.q_proj(x).view(B, Lq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, Lq, d)
        k = (
            self.k_proj(context).view(B, Lk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        )  # (B, Hkv, Lk, d)
        v = (
            self.v_proj(context).view(B, Lk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        )  # (B, Hkv, Lk, d)
        mask, is_causal, allowed = combine_masks(key_padding_mask, attn_mask, is_causal, B, Lq, Lk, x.device)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, Hq, Lq, d)
        y = y.transpose(1, 2).reshape(B, Lq, D)
        if self.zero_empty_rows and allowed is not None:
            y = torch.where(allowed.any(-1).transpose(1, 2), y, 0)  # (B, Lq, 1): query has a key to attend to
        return self.out_proj(y)
