"""BERT-family encoder: embeddings, encoder blocks, pooler. What a family changes is in its config
(model_defs/families.py): the activation, how positions are counted, an embedding projection, token types or
none, a relative position bias."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..block import block_spec
from .block import Block
from .config import EncoderConfig

RELATIVE_MAX_DISTANCE = 128  # MPNet's: distances past it share the last bucket


def encoder_block(cfg: EncoderConfig) -> Block:
    """The block of a BERT-family encoder (qkv_onnx/block.py: post-LN or pre-LN, LayerNorm, biases)."""
    return Block(block_spec("bert", cfg.to_dict()))


def positions(input_ids, cfg: EncoderConfig):
    """Position ids (B, L): 0..L-1, or (from-ids) each non-padding id's count so far plus pad_token_id, and
    pad_token_id itself at padding (transformers' create_position_ids_from_input_ids)."""
    if cfg.positions == "absolute":
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    real = input_ids.ne(cfg.pad_token_id).long()
    return torch.cumsum(real, dim=1) * real + cfg.pad_token_id


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg, width = cfg, cfg.embedding_width
        self.word = nn.Embedding(cfg.vocab_size, width)
        self.position = nn.Embedding(cfg.max_positions, width)
        self.token_type = nn.Embedding(cfg.type_vocab_size, width) if cfg.type_vocab_size else None
        self.norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.project = nn.Linear(width, cfg.hidden_size) if cfg.embedding_size else None

    def forward(self, input_ids, token_type_ids=None):  # (B, L) int64 each -> (B, L, D)
        x = self.word(input_ids) + self.position(positions(input_ids, self.cfg))
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids)
        x = self.norm(x)
        return x if self.project is None else self.project(x)


def relative_buckets(relative, num_buckets: int, max_distance: int = RELATIVE_MAX_DISTANCE):
    """MPNet's bucket of each relative position (key - query): half the buckets for each direction, exact
    below a quarter of them, then logarithmic up to max_distance."""
    half = num_buckets // 2
    n = -relative
    bucket = (n < 0).long() * half
    n = n.abs()
    exact = half // 2
    log = torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    large = torch.clamp(exact + log.long(), max=half - 1)
    return bucket + torch.where(n < exact, n, large)


class RelativePositionBias(nn.Module):
    """A learned bias per (bucketed key - query distance, head), shared by every layer (MPNet)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.num_buckets = cfg.relative_attention_buckets
        self.weight = nn.Parameter(torch.empty(cfg.relative_attention_buckets, cfg.num_heads))

    def forward(self, length: int, device):  # -> (1, H, L, L)
        position = torch.arange(length, device=device)
        buckets = relative_buckets(position[None, :] - position[:, None], self.num_buckets)
        return F.embedding(buckets, self.weight).permute(2, 0, 1).unsqueeze(0)


class BertModel(nn.Module):
    """Embeddings -> N encoder blocks -> (final LayerNorm if pre-LN) -> optional tanh pooler."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.relative_bias = RelativePositionBias(cfg) if cfg.relative_attention_buckets else None
        self.blocks = nn.ModuleList(encoder_block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_layer_norm else None
        )
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if cfg.with_pooler else None

    def forward(self, input_ids, token_type_ids, attention_mask):
        """(B, L) int64 each; attention_mask 1 = token, 0 = padding.
        Returns hidden (B, L, D)[, pooled (B, D)]."""
        x = self.embeddings(input_ids, token_type_ids)
        key_padding_mask = attention_mask.bool()
        bias = None if self.relative_bias is None else self.relative_bias(input_ids.shape[1], x.device)
        for block in self.blocks:
            x = block(x, key_padding_mask, bias)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.pooler is None:
            return (x,)
        return x, torch.tanh(self.pooler(x[:, 0]))


class BertModelWithoutTokenTypes(BertModel):
    """A family without token types (DistilBERT, MPNet): its inputs are input_ids and attention_mask."""

    def forward(self, input_ids, attention_mask):
        return super().forward(input_ids, None, attention_mask)


def encoder_class(cfg: EncoderConfig) -> type[BertModel]:
    return BertModel if cfg.type_vocab_size else BertModelWithoutTokenTypes
