"""PyTorch reference modules. Knows nothing about ONNX."""

from .attention import MultiHeadAttention
from .config import PRESETS, EncoderConfig, param_count
from .encoder import BertModel, EncoderBlock
from .registry import MODELS, ModelSpec, get_model

__all__ = [
    "MultiHeadAttention",
    "EncoderBlock",
    "BertModel",
    "EncoderConfig",
    "PRESETS",
    "param_count",
    "MODELS",
    "ModelSpec",
    "get_model",
]
