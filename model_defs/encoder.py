"""BERT-style encoder: embeddings, encoder blocks, pooler."""

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention
from .config import EncoderConfig


class FeedForward(nn.Module):
    def __init__(self, hidden_size, ffn_size):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_size)
        self.fc2 = nn.Linear(ffn_size, hidden_size)

    def forward(self, x):  # (B, L, D) -> (B, L, D)
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as BERT


class EncoderBlock(nn.Module):
    """Attention + feed-forward with residuals; post-LN (BERT) or pre-LN."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.pre_layer_norm = cfg.pre_layer_norm
        self.attn = MultiHeadAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.hidden_size, cfg.ffn_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, key_padding_mask=None):  # x (B, L, D), key_padding_mask (B, L) bool
        if self.pre_layer_norm:
            x = x + self.attn(self.attn_norm(x), key_padding_mask=key_padding_mask)
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.attn(x, key_padding_mask=key_padding_mask))
        return self.ffn_norm(x + self.ffn(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, token_type_ids):  # (B, L) int64 each -> (B, L, D)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.norm(self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids))


class BertModel(nn.Module):
    """Embeddings -> N encoder blocks -> (final LayerNorm if pre-LN) -> optional tanh pooler."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_layer_norm else None
        )
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if cfg.with_pooler else None

    def forward(self, input_ids, token_type_ids, attention_mask):
        """(B, L) int64 each; attention_mask 1 = token, 0 = padding.
        Returns hidden (B, L, D)[, pooled (B, D)]."""
        x = self.embeddings(input_ids, token_type_ids)
        key_padding_mask = attention_mask.bool()
        for block in self.blocks:
            x = block(x, key_padding_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.pooler is None:
            return (x,)
        return x, torch.tanh(self.pooler(x[:, 0]))
