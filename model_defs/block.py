"""The one transformer block every model repeats (qkv_onnx/block.py describes it as data): attention, then
feed-forward, each added to the residual stream with its norms where the block's placement puts them.
Causal or not, cached or not: the masks and the cache come from the model around it."""

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):  # in float32 at least, as Llama
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        y = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def make_norm(kind: str, width: int, eps: float) -> nn.Module:
    """LayerNorm ("layer") or RMSNorm ("rms") over the last `width` dims."""
    return RMSNorm(width, eps) if kind == "rms" else nn.LayerNorm(width, eps=eps)


ACTIVATION = {
    "gelu": F.gelu,  # exact (erf) GELU, as BERT
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # transformers' gelu_new / gelu_pytorch_tanh
    "silu": F.silu,
    "relu": F.relu,
}


class FeedForward(nn.Module):
    """fc2(act(fc1 x)), or gated: down(act(gate x) * up x) (SwiGLU, GeGLU)."""

    def __init__(self, hidden_size, ffn_size, act="gelu", gated=False, bias=True):
        super().__init__()
        self.act, self.gated = ACTIVATION[act], gated
        if gated:
            self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
            self.up_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
            self.down_proj = nn.Linear(ffn_size, hidden_size, bias=bias)
        else:
            self.fc1 = nn.Linear(hidden_size, ffn_size, bias=bias)
            self.fc2 = nn.Linear(ffn_size, hidden_size, bias=bias)

    def forward(self, x):  # (B, L, D) -> (B, L, D)
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Attention + feed-forward with residuals, as `spec` (qkv_onnx/block.py: block_spec) says: BERT's
    post-LN, pre-norm, sandwich or post norms, a residual multiplier, the attention's options. Its modules are
    made in the order its family lists them (`norm_first`): the state dict's, and seeded weights' order."""

    def __init__(self, spec: dict):
        super().__init__()
        self.placement, self.multiplier = spec["placement"], spec["residual_multiplier"]

        def norm(width=spec["hidden"]):
            return make_norm(spec["norm"], width, spec["eps"])

        attention = MultiHeadAttention(
            spec["hidden"],
            spec["heads"],
            spec["kv_heads"],
            scale=spec["scale"],
            head_dim=spec["head_dim"],
            bias=spec["bias"],
            out_bias=spec["out_bias"],
            qk_norm=spec["qk_norm"],
            norm=norm,
            softcap=spec["softcap"],
        )
        for name, make in (
            ("attn", lambda: attention),
            (
                "ffn",
                lambda: FeedForward(
                    spec["hidden"], spec["ffn"], spec["act"], spec["gated"], spec["mlp_bias"]
                ),
            ),
        ):
            before = [] if self.placement == "post" else [(f"{name}_norm", norm)]
            for module, build in (
                (before + [(name, make)]) if spec["norm_first"] else ([(name, make)] + before)
            ):
                setattr(self, module, build())
            if self.placement in ("sandwich", "post"):
                setattr(self, f"post_{name}_norm", norm())

    def forward(self, x, key_padding_mask=None, bias=None, *, allowed=None, rope=None, past=None):
        """An encoder's: x (B, L, D), key_padding_mask (B, L) bool, bias: additive scores (1, H, L, L) or
        None; returns x. A decoder's: `allowed` (B, 1, S, P + S), `rope` (cos, sin) or None, `past` (key,
        value); returns (x, present key, present value)."""
        outside = self.placement in ("post-residual", "post")  # the norm is not before the sublayer
        h = x if outside else self.attn_norm(x)
        y = self.attn(
            h, key_padding_mask=key_padding_mask, attn_mask=bias, allowed=allowed, rope=rope, past=past
        )
        y, *present = (y,) if past is None else y
        x = self.attn_norm(x + y) if self.placement == "post-residual" else x + self._added(y, "attn")
        h = x if outside else self.ffn_norm(x)
        f = self.ffn(h)
        x = self.ffn_norm(x + f) if self.placement == "post-residual" else x + self._added(f, "ffn")
        return x if past is None else (x, *present)

    def _added(self, y, name: str):
        """What a sublayer adds to the residual stream: its output, normed after it where the placement says,
        times the residual multiplier."""
        if self.placement in ("sandwich", "post"):
            y = getattr(self, f"post_{name}_norm")(y)
        return y * self.multiplier if self.multiplier != 1.0 else y
