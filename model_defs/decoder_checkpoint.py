"""Hugging Face decoder checkpoints (config.json + model.safetensors) -> our DecoderModel.

Only safetensors is read (no pickle). config.json's model_type picks the family (decoder_families.py), whose
record maps the config onto DecoderConfig and the weight names and layouts onto ours; every key must map or be
ignored, every parameter of our model must be present (a tied LM head may be left out), and every shape must
match the config, else CheckpointError with a one-line message naming the file and the key(s).
"""

import math
import re
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from ..decoder_format import FEATURES
from .checkpoint import (
    CheckpointError,
    _read_json,
    _safetensors,
    check_keys,
    map_hf_keys,
    ours_to_hf,
    read_headers,
    weight_files,
)
from .decoder import DecoderConfig, DecoderModel
from .decoder_families import (
    ACTIVATIONS,
    DECODER_FAMILIES,
    DecoderFamily,
    checkpoint_shapes,
    read_rope,
    read_sliding,
    to_our_layout,
)
from .families import FAMILIES

_ABSENT = object()
_INTS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_size", "vocab_size", "max_positions")
_OPTIONAL = ("num_kv_heads", "head_dim")  # null: derived from the others
_FLOATS = ("norm_eps", "rope_theta")
_BOOLS = ("attention_bias", "mlp_bias", "tie_word_embeddings")


def _config_path(path) -> Path:
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def _lookup(hf: dict, key: str):
    """config.json's value at `key` (`a.b`: key b of the object at a), or _ABSENT."""
    value = hf
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def _read_config(path: Path) -> dict:
    hf = _read_json(path)
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def _served(hf: dict) -> str | None:
    model_type = hf.get("model_type")
    return model_type if isinstance(model_type, str) and model_type in DECODER_FAMILIES else None


def decoder_model_type(config_json) -> str | None:
    """config.json's model_type if it is a decoder family we load (gpt2, llama), else None (an encoder family
    of families.FAMILIES, or anything else). `config_json`: the file or its checkpoint directory.
    CheckpointError if the file cannot be read as a JSON object."""
    return _served(_read_config(_config_path(config_json)))


def decoder_family_of(config_json) -> tuple[DecoderFamily, dict]:
    """(family, config.json as a dict) of a decoder checkpoint; CheckpointError for a model_type not
    served."""
    path = _config_path(config_json)
    hf = _read_config(path)
    model_type = _served(hf)
    if model_type is None:
        got = hf.get("model_type")
        kind = " (an encoder: checkpoint.load_hf_checkpoint loads it)" if got in FAMILIES else ""
        raise CheckpointError(
            f"{path}: model_type {got!r} is not a supported decoder{kind}; served: "
            + ", ".join(DECODER_FAMILIES)
        )
    return DECODER_FAMILIES[model_type], hf


def decoder_config_from_hf(config_json) -> DecoderConfig:
    """DecoderConfig from a Hugging Face config.json of a served decoder family (missing keys take the
    family's transformers defaults). Refuses, naming the key and its value, what our decoder does not
    compute: an activation outside ACTIVATIONS, and what the family's record requires or checks."""
    path = _config_path(config_json)
    family, hf = decoder_family_of(path)
    merged = {**family.defaults, **hf}

    def get(keys):
        keys = (keys,) if isinstance(keys, str) else keys
        values = [_lookup(merged, k) for k in keys]
        return next((v for v in values if v is not _ABSENT and v is not None), None)

    for key, allowed in family.requires.items():
        value = _lookup(merged, key)
        value = allowed[0] if value is _ABSENT else value
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise CheckpointError(
                f"{path}: {key} {value!r} is not supported for {family.name}; only "
                + " or ".join(repr(a) for a in allowed)
            )
    act_key = family.config["hidden_act"]
    act = get(act_key)
    activations = {**ACTIVATIONS, **family.activations}
    if not isinstance(act, str) or act not in activations:
        raise CheckpointError(
            f"{path}: {act_key} {act!r} is not supported; only " + ", ".join(repr(a) for a in activations)
        )
    values = {ours: get(theirs) for ours, theirs in family.config.items()}
    values["hidden_act"] = activations[act]
    for ours, (other, factor) in family.derived.items():
        if values[ours] is None and isinstance(values[other], int):
            values[ours] = factor * values[other]
    values = {**values, **family.fixed}
    bad = [
        k
        for k, v in values.items()
        if ((k in _INTS or k in _OPTIONAL) and not (v is None and k in _OPTIONAL) and not _positive_int(v))
        or (k in _FLOATS and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0))
        or (k in _BOOLS and not isinstance(v, bool))
    ]
    if bad:
        shown = ", ".join(f"{_key_name(family.config.get(k, k))} {values[k]!r}" for k in bad)
        raise CheckpointError(f"{path}: not a usable {family.name} config: {shown}")
    try:
        values.update(_features(merged, family, values))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e if isinstance(e, ValueError) else f'{e} is missing'}") from None
    try:
        cfg = DecoderConfig(**{k: float(v) if k in _FLOATS else v for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a usable {family.name} config: {e}") from None
    for key, attribute in family.checks.items():
        value = _lookup(hf, key)
        expected = getattr(cfg, attribute)
        if value not in (_ABSENT, None) and (value != expected or isinstance(value, bool)):
            raise CheckpointError(
                f"{path}: {key} {value!r} is not supported for {family.name}; only {expected!r}, "
                "as the other keys imply"
            )
    return cfg


def _features(merged: dict, family: DecoderFamily, values: dict) -> dict:
    """The DecoderConfig features config.json turns on for `family`: its own readers (multipliers, caps,
    scales), RoPE (read_rope) and sliding layers (read_sliding); ValueError naming a key we do not compute."""
    out = {k: f(merged) for k, f in family.read.items() if k in FEATURES}
    out.update(read_sliding(merged, family, values["num_layers"]))
    if family.rope != "none":
        d = values.get("head_dim") or (
            values["hidden_size"] // values["num_heads"] if values["num_heads"] else 0
        )
        out.update(read_rope(merged, family, d))
        if "sliding" not in out.get("layer_types", ()):
            out.pop("rope_local_theta", None)  # no layer reads it
    return {k: v for k, v in out.items() if v is not None}


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _key_name(keys) -> str:
    return keys if isinstance(keys, str) else keys[0]


def _expected_shapes(cfg: DecoderConfig) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DecoderModel(cfg).state_dict().items()}


@contextmanager
def _safe_open(path: Path):
    safe_open, _ = _safetensors()
    with safe_open(str(path), framework="pt") as st:
        yield st


READ_ELEMENTS = 1 << 24  # a checkpoint tensor is read this many elements at a time


class CheckpointTensors(Mapping):
    """Our name -> float32 tensor of a decoder checkpoint, read from its safetensors (memory-mapped there) and
    laid out as our module's (to_our_layout) when asked: a model's weights never all in memory at once. Each
    read refuses NaN, infinite values and a shape other than our module's (CheckpointError)."""

    def __init__(self, files: list, mapping: dict, family: DecoderFamily, ours: dict, where: Path):
        self.family, self.ours, self.where, self.mapping = family, ours, where, mapping
        self.home = {}  # checkpoint key -> its file
        for f in files:
            with _safe_open(f) as st:
                self.home.update({k: f for k in st.keys() if k in mapping})
        meta, held = {}, checkpoint_shapes(ours, family)
        for key, name in mapping.items():  # our names each checkpoint key becomes (a fused module: several)
            if name in held:  # not a tied head, which is no parameter of ours
                with torch.device("meta"):
                    laid = to_our_layout({name: torch.empty(held[name])}, family, ours)
                meta.update({ours_name: key for ours_name in laid})
        self.source = {k: meta[k] for k in ours if k in meta}

    def raw(self, key: str) -> torch.Tensor:
        """Checkpoint key -> its float32 tensor, refused when not finite; read in slices of rows, so that
        a bfloat16 embedding of 128k rows is never held in its own dtype and in float32 at once."""
        with _safe_open(self.home[key]) as st:
            part = st.get_slice(key)
            shape = part.get_shape()
            if not shape:
                tensor = st.get_tensor(key).to(torch.float32)
                chunks = [(tensor, tensor)]
            else:
                tensor = torch.empty(shape, dtype=torch.float32)
                step = max(1, READ_ELEMENTS // max(1, math.prod(shape[1:])))
                chunks = ((tensor[i : i + step], part[i : i + step]) for i in range(0, shape[0], step))
            for target, chunk in chunks:
                target.copy_(chunk)
                if not torch.isfinite(target).all():
                    raise CheckpointError(f"{self.home[key]}: tensor {key} holds NaN or infinite values")
        return tensor

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self.source[name]
        tensor = to_our_layout({self.mapping[key]: self.raw(key)}, self.family, self.ours)[name]
        if tuple(tensor.shape) != self.ours[name]:
            raise CheckpointError(f"{self.where}: {key} gives {name} the shape {list(tensor.shape)}")
        return tensor

    def __contains__(self, name) -> bool:
        return name in self.source

    def __iter__(self):
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)


def open_decoder_checkpoint(directory) -> tuple:
    """(DecoderConfig, CheckpointTensors: our name -> float32 tensor, read when asked) of a Hugging Face
    decoder checkpoint directory, its keys exactly those of DecoderModel(cfg).state_dict() (a tied head has
    none: a checkpoint's lm_head.weight must then equal the token embedding, and is dropped).

    Reads config.json and model.safetensors (or a sharded model.safetensors.index.json) with the
    safetensors library. Keys may carry the family's prefix ('transformer.', 'model.'). Known buffers
    (GPT-2's attn.bias) are ignored. CheckpointError, naming the file and the keys, on: unexpected keys,
    missing keys, a shape other than the config implies, a non-floating tensor, a tied LM head that differs
    from the embedding; and when a tensor is read, on NaN or infinite values.
    """
    directory = Path(directory)
    files, where = weight_files(directory)
    family, _ = decoder_family_of(directory / "config.json")
    cfg = decoder_config_from_hf(directory / "config.json")
    shapes, dtypes = read_headers(files, where)

    mapping, _, unexpected = map_hf_keys(shapes, family, str(where))
    buffer = re.compile(rf"({re.escape(family.prefix)})?{re.escape(family.layers)}\.\d+\.(.+)")
    unexpected = [  # a layer's buffers (<prefix><layers>.N.<buffer>) are ignored
        k for k in unexpected if not ((m := buffer.fullmatch(k)) and m.group(2) in family.buffers)
    ]
    ours = _expected_shapes(cfg)
    # a tied head is no parameter of ours, but a checkpoint may hold it: then it must be the embedding
    tied = {"lm_head.weight": "embed.word.weight"} if cfg.tie_word_embeddings else {}
    expected = checkpoint_shapes({**ours, **{k: ours[v] for k, v in tied.items()}}, family)  # their layout
    prefix = family.prefix if any(k.startswith(family.prefix) for k in mapping) else ""
    check_keys(
        where,
        family,
        cfg.num_layers,
        mapping,
        unexpected,
        expected,
        shapes,
        dtypes,
        lambda k: _hf_name(k, family, prefix),
        optional=tied,
    )
    tensors = CheckpointTensors(files, mapping, family, ours, where)
    for name, source in tied.items():
        key = next((k for k, v in mapping.items() if v == name), None)
        if key is not None and not torch.equal(tensors.raw(key), tensors[source]):
            raise CheckpointError(
                f"{where}: {key!r} differs from {_hf_name(source, family, prefix)!r}, "
                "but config.json ties them (tie_word_embeddings true)"
            )
    missing = sorted(set(ours) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: nothing in it gives {missing[0]} ({len(missing)} parameters)")
    return cfg, tensors


def load_decoder_checkpoint(directory) -> tuple:
    """(DecoderConfig, state dict in our names, float32 tensors) from a Hugging Face decoder checkpoint
    directory (open_decoder_checkpoint, every tensor read): the keys of DecoderModel(cfg).state_dict()."""
    cfg, tensors = open_decoder_checkpoint(directory)
    state = {k: tensors[k] for k in tensors}
    try:
        _module_from(cfg, state)  # the final word: strict load_state_dict into DecoderModel(cfg)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
        raise CheckpointError(f"{tensors.where}: load_state_dict refused it: {detail}") from None
    return cfg, state


def _hf_name(name: str, family: DecoderFamily, prefix: str) -> str:
    """The checkpoint key for one of our names (checkpoint layout), with the prefix the checkpoint uses."""
    hf = ours_to_hf(name, family)
    return hf if hf.startswith(family.unprefixed) else prefix + hf


def _module_from(cfg: DecoderConfig, state: dict) -> DecoderModel:
    with torch.device("meta"):  # no random init: every parameter is replaced by the checkpoint's tensor
        model = DecoderModel(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_decoder_model(directory) -> tuple:
    """(DecoderConfig, DecoderModel in eval mode holding the checkpoint's weights, float32 on CPU).
    The module's parameters share memory with load_decoder_checkpoint's tensors (no copy)."""
    cfg, state = load_decoder_checkpoint(directory)
    return cfg, _module_from(cfg, state).eval()
