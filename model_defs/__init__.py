"""PyTorch reference modules. Knows nothing about ONNX."""

from .attention import MultiHeadAttention
from .block import Block
from .config import PRESETS, EncoderConfig, param_count
from .encoder import BertModel, encoder_block
from .registry import MODELS, ModelSpec, get_model

__all__ = [
    "MultiHeadAttention",
    "Block",
    "encoder_block",
    "BertModel",
    "EncoderConfig",
    "PRESETS",
    "param_count",
    "MODELS",
    "ModelSpec",
    "get_model",
]
