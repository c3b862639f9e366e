"""The artifact format: the contract between export/ (which writes it) and validate/ (which judges it).

Torch-free: numpy, onnx and the standard library only. What lives here: the format version, the file
names and their roles, canonical JSON and digests, the manifest schema, the backend table with the op
domains each backend emits, and the graph walks both halves need.
"""

import hashlib
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

from . import decoder_format
from .block import block_spec, block_weights
from .block import block_stages as stages_of
from .errors import first_line
from .genai import GENAI_CONFIG, GENAI_TOKENIZER_FILES, special_tokens_problem

FORMAT = "qkv-onnx-artifact/1"
MANIFEST = "manifest.json"
MODEL = "model.onnx"
WEIGHTS = "weights.npz"
TOKENIZER_DIR = "tokenizer"  # a checkpoint's tokenizer files, for qkv-validate --text
DIGEST_KEY = "manifest_sha256"
MAX_MANIFEST_BYTES = 1 << 24

DTYPES = ("float32", "float16", "bfloat16")  # float artifacts: weights, activations and IO in this dtype
QUANTIZED = ("int8",)  # quantized artifacts: int8 weights, activations quantized at run time, float32 IO
ARTIFACT_DTYPES = DTYPES + QUANTIZED
TEXT_GOLDEN_SET = 3  # golden set of real sentences (checkpoints with a tokenizer), after the seeded ones
INPUT_ROLES = ("hidden", "token_ids", "segment_ids", "padding_mask", "position_ids", "past_key", "past_value")
FLOAT_ROLES = ("hidden", "past_key", "past_value")  # in the artifact's float dtype; the other roles are int64
DIMS = ("batch", "seq", "kv_seq", "past", "total")  # the symbolic dims validation knows how to size
STANDARD_DOMAINS = ("", "ai.onnx")
REQUIRED_KEYS = ("format", "model", "backend", "dtype", "inputs", "outputs", "files", "golden_sets")
MAX_LAYERS = 128  # BERT-style encoders have 2 to 48; each layer costs nodes to export, check and run
MAX_GOLDEN_SETS = 8  # an export writes 3, plus 1 of real sentences for a checkpoint with a tokenizer
_GOLDEN = re.compile(r"test_data_set_(\d+)/(input|output)_(\d+)\.pb")


# --- the architectures an artifact may hold ------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """One architecture an artifact may hold, as the code reads it: no code asks for one by name."""

    name: str
    kind: str  # "attention" (an attention module alone), "block" (one block), "layers" (blocks.N, num_layers)
    cached: bool = False  # a decoder over its KV cache: prefill and decode in one graph (decoder_format)
    options: tuple[str, ...] = ()  # the module options its manifest's model takes, each a bool
    stitched: bool = False  # export: a deep model's graph stitched from its two-layer version's
    reweighted: bool = True  # export: its graph taken from a template of itself, its weights replaced

    @property
    def layered(self) -> bool:
        """Whether it repeats its block num_layers times (blocks.N)."""
        return self.kind == "layers"


ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("attention", "attention", options=("causal", "cross")),
        Architecture("encoder-block", "block"),
        Architecture("bert", "layers", stitched=True),
        # stitched: a 1B decoder exported whole holds its weights three times over; a one-layer one is
        # exported whole (its probe weights would cost more than they save)
        Architecture(decoder_format.DECODER, "layers", cached=True, stitched=True, reweighted=False),
    )
}


def architecture(name: str) -> Architecture:
    return ARCHITECTURES[name]


# --- the backend table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One way to write attention into the graph, and what the graph then promises."""

    name: str
    min_opset: int
    max_opset: int | None
    default_opset: int
    attention_ops: tuple[tuple[str, str], ...]  # fused attention ops (domain, op_type); empty: MatMul/Softmax
    ort_fusions: bool = False  # onnxscript's optimize_for_ort runs after the export
    zero_empty_rows: bool = False  # the graph writes "a query with no key outputs 0" itself
    summary: str = ""
    decoder: tuple = ()  # (opset, fused ops) of a decoder's graph, its cache read by the op; () no decoders
    stitched_decoder: bool = True  # export: a decoder's layers stitched (else its graph is exported whole)

    def for_architecture(self, architecture: str) -> "Backend":
        """The backend as it writes `architecture`: a decoder's graph has its own opset and attention ops
        (export/cache.py writes them, not onnxscript's fusions)."""
        if not ARCHITECTURES[architecture].cached:
            return self
        if not self.decoder:
            raise ValueError(f"backend {self.name} does not write decoders")
        opset, ops = self.decoder
        return replace(
            self, min_opset=opset, max_opset=opset, default_opset=opset, attention_ops=ops, ort_fusions=False
        )

    @property
    def domains(self) -> tuple[str, ...]:
        """Op domains beyond standard ONNX that this backend's graphs may use."""
        return tuple(sorted({d for d, _ in self.attention_ops if d not in STANDARD_DOMAINS}))

    def opset_problem(self, opset: int) -> str | None:
        if opset < self.min_opset or (self.max_opset is not None and opset > self.max_opset):
            if self.max_opset is None:
                span = f">= {self.min_opset}"
            elif self.min_opset == self.max_opset:
                span = f"{self.min_opset}"
            else:
                span = f"{self.min_opset}..{self.max_opset}"
            return f"backend {self.name} needs opset {span}, got {opset}"
        return None


BACKENDS = {
    b.name: b
    for b in [
        Backend(
            "onnx-attention",
            23,
            None,
            23,
            (("", "Attention"),),
            summary="ONNX Attention op (opset >= 23): portable runtimes",
            decoder=(23, (("", "Attention"),)),
        ),
        Backend(
            "ort-contrib",
            18,
            18,
            18,
            (("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention")),
            ort_fusions=True,
            zero_empty_rows=True,
            summary="ONNX Runtime com.microsoft Attention/MultiHeadAttention, SkipLayerNormalization, "
            "BiasGelu; decoders: GroupQueryAttention",
            decoder=(23, (("com.microsoft", "GroupQueryAttention"),)),
            stitched_decoder=False,  # its cache's rewrite leaves layer 1's nodes apart (export/cache.py)
        ),
        Backend(
            "decomposed",
            17,
            18,
            18,
            (),
            zero_empty_rows=True,
            summary="MatMul/Softmax at opset 17/18: runtimes without a fused attention op",
            decoder=(18, ()),
        ),
    ]
}


# --- files, digests, canonical JSON --------------------------------------------------------------


def golden_file(n: int, kind: str, k: int) -> str:
    """Relative path of golden tensor K of set N; kind 'input' or 'output' (ONNX's test-data layout)."""
    return f"test_data_set_{n}/{kind}_{k}.pb"


def file_role(rel: str) -> str:
    """What a listed file is for: model, external-data, weights, golden, tokenizer (or unknown)."""
    if rel == MODEL:
        return "model"
    if rel == WEIGHTS:
        return "weights"
    if rel == GENAI_CONFIG:
        return "genai"
    if _GOLDEN.fullmatch(rel):
        return "golden"
    if rel.startswith(TOKENIZER_DIR + "/") or rel in GENAI_TOKENIZER_FILES:
        return "tokenizer"
    if rel.startswith(MODEL) and "/" not in rel:
        return "external-data"
    return "unknown"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


class JsonProblem(ValueError):
    """Bytes that are not the strict JSON a manifest is written in."""


def _reject_constant(name: str):
    raise JsonProblem(f"{name} is not a JSON number")


def strict_json(raw: bytes):
    """Parse manifest bytes: UTF-8 JSON without NaN/Infinity literals, integers of at most 4300 digits
    (Python's limit), every string valid Unicode (no lone surrogate from a \\ud800 escape). Raises
    JsonProblem with the reason, or RecursionError for nesting Python cannot follow."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise JsonProblem(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except JsonProblem:
        raise
    except ValueError as e:  # JSONDecodeError, and int() refusing a number too long to convert
        raise JsonProblem(first_line(e)) from None
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack += list(v.keys()) + list(v.values())
        elif isinstance(v, list):
            stack += v
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise JsonProblem(f"a string holds a lone surrogate: {ascii(v)[:80]}") from None
    return value


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own digest: the manifest protects itself."""
    return sha256_bytes(canonical_json(manifest).encode())


def signed(manifest: dict) -> str:
    """The bytes of manifest.json: canonical JSON with its own digest added."""
    return canonical_json({**manifest, DIGEST_KEY: manifest_digest(manifest)})


def np_dtype(name: str) -> np.dtype:
    """numpy dtype by name; bfloat16 is ml_dtypes' (what onnx's numpy_helper uses)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def io_dtype(dtype: str) -> str:
    """The dtype of an artifact's float inputs and outputs: its own, float32 for a quantized artifact."""
    return "float32" if dtype in QUANTIZED else dtype


def stored_weight_dtype(dtype: str) -> str:
    """weights.npz keeps bfloat16 as float32 (.npy has no bfloat16; float32 holds it exactly), and a quantized
    artifact's float32 source weights (what the oracle computes with)."""
    return "float32" if dtype == "bfloat16" or dtype in QUANTIZED else dtype


def side_files(manifest: dict) -> list[str]:
    """The listed external-data files of the model (model.onnx.data), named relative to it."""
    return [rel for rel in manifest["files"] if file_role(rel) == "external-data"]


# --- the manifest schema -------------------------------------------------------------------------


def _positive_int(v) -> bool:
    return type(v) is int and v > 0


def _buckets(v) -> bool:
    """A relative-bias bucket count: 0 (none), or an even count of at least 4 (half per direction, a quarter
    of them exact)."""
    return type(v) is int and (v == 0 or 4 <= v <= MAX_BUCKETS and not v % 2)


CONFIG_FIELDS = {  # what the oracle, the tolerance policy and the PyTorch rebuild read
    "num_layers": _positive_int,
    "hidden_size": _positive_int,
    "num_heads": _positive_int,
    "num_kv_heads": lambda v: v is None or _positive_int(v),
    "ffn_size": _positive_int,
    "vocab_size": _positive_int,
    "max_positions": _positive_int,
    "type_vocab_size": lambda v: type(v) is int and v >= 0,
    "layer_norm_eps": lambda v: type(v) is float and 0 < v < 1,
    "pre_layer_norm": lambda v: type(v) is bool,
    "with_pooler": lambda v: type(v) is bool,
    "hidden_act": lambda v: v in ACTIVATIONS,
    "positions": lambda v: v in POSITIONS,
    "pad_token_id": lambda v: type(v) is int and v >= 0,
    "embedding_size": lambda v: v is None or _positive_int(v),
    "relative_attention_buckets": _buckets,
}
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")  # exact erf GELU; its tanh approximation (gelu_new); ReLU
POSITIONS = ("absolute", "from-ids")  # 0..L-1; or counted over the non-padding ids from pad_token_id + 1
MAX_BUCKETS = 1024


# Config fields added with the BERT families (qkv-onnx 0.3), and the value an older manifest means by leaving
# them out: BERT's.
FAMILY_DEFAULTS = {
    "hidden_act": "gelu",
    "positions": "absolute",
    "pad_token_id": 0,
    "embedding_size": None,
    "relative_attention_buckets": 0,
}


def with_defaults(manifest: dict) -> None:
    """Give a manifest written before the families (its digest already checked) their BERT defaults."""
    model = manifest.get("model")
    architecture = model.get("architecture") if isinstance(model, dict) else None
    known = isinstance(architecture, str) and architecture in ARCHITECTURES
    if known and not ARCHITECTURES[model["architecture"]].cached and isinstance(model.get("config"), dict):
        model["config"] = {**FAMILY_DEFAULTS, **model["config"]}


# Seeded input cases, (batch, seq, real tokens per row, past): the golden sets an export writes and the cases
# validation runs (an encoder's have no past; decoder_format has the decoder's).
GOLDEN_CASES = [(2, 16, [16, 11], 0), (3, 7, [7, 3, 0], 0), (1, 1, [1], 0)]
VALIDATION_CASES = [
    (1, 1, [1], 0),
    (2, 1, [1, 0], 0),
    (1, 7, [7], 0),
    (3, 7, [7, 4, 0], 0),
    (2, 128, [128, 77], 0),
]
# int8: the search's seeded token batches, and with other seeds its held-out ones. An encoder's: a long batch
# and every shape validation judges, so that the held-out check at export sees what validation will. A
# decoder's: long batches only (next-token agreement on a one-token case is 0 or 1: no margin to measure).
CALIBRATION_LONG = [(4, 64, [64, 41, 17, 64], 0), (2, 128, [128, 90], 0)]


def seeded_cases(kind: str, architecture: str) -> list[tuple]:
    """The seeded cases of `kind` (golden, validation or calibration) for an architecture."""
    if ARCHITECTURES[architecture].cached:
        cases = {"golden": decoder_format.GOLDEN_CASES, "calibration": CALIBRATION_LONG}
        return {**cases, "validation": decoder_format.VALIDATION_CASES}[kind]
    calibration = CALIBRATION_LONG[:1] + VALIDATION_CASES
    return {"golden": GOLDEN_CASES, "validation": VALIDATION_CASES, "calibration": calibration}[kind]


def model_layers(architecture: str, cfg: dict) -> int:
    """How many times a model repeats its block (1 for a model without blocks)."""
    return cfg["num_layers"] if ARCHITECTURES[architecture].layered else 1


def max_sequence(cfg: dict) -> int:
    """The longest sequence a config's position table covers (from-ids positions start after the pad id;
    a decoder's past + seq)."""
    return cfg["max_positions"] - (cfg["pad_token_id"] + 1 if cfg["positions"] == "from-ids" else 0)


def manifest_problem(m: dict) -> str | None:
    """What is structurally wrong with a manifest (its digest already checked), or None."""
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        return f"missing keys {missing}"
    if m["format"] != FORMAT:
        return f"format {m['format']!r}, expected {FORMAT!r}"
    model = m["model"]
    if (
        not isinstance(model, dict)
        or not all(isinstance(model.get(k), dict) for k in ("config", "options"))
        or not all(isinstance(model.get(k), str) for k in ("name", "architecture"))
    ):
        return "'model' must hold 'name', 'architecture', 'config' and 'options'"
    if model["architecture"] not in ARCHITECTURES:
        return f"unknown architecture {model['architecture']!r}; known: {', '.join(ARCHITECTURES)}"
    problem = _config_problem(model)
    if problem:
        return problem
    cfg = model["config"]
    if not isinstance(m["backend"], str) or m["backend"] not in BACKENDS:
        return f"unknown backend {m['backend']!r}; known: {', '.join(BACKENDS)}"
    if m["dtype"] not in ARTIFACT_DTYPES:
        return f"unsupported dtype {m['dtype']!r}"
    opset = m.get("opset")
    version = opset.get("ai.onnx") if isinstance(opset, dict) else None
    if type(version) is not int:
        return f"'opset' must give the ai.onnx version, got {opset!r}"
    problem = BACKENDS[m["backend"]].for_architecture(model["architecture"]).opset_problem(version)
    if problem:
        return problem
    for key in ("inputs", "outputs"):
        if (
            not isinstance(m[key], list)
            or not m[key]
            or not all(
                isinstance(v, dict)
                and isinstance(v.get("name"), str)
                and isinstance(v.get("dtype"), str)
                and isinstance(v.get("shape"), list)
                for v in m[key]
            )
        ):
            return f"'{key}' must be a non-empty list of {{name, dtype, shape}}"
    if not all(v.get("role") in INPUT_ROLES for v in m["inputs"]):
        return f"every input needs a 'role' among {INPUT_ROLES}"
    quantized = m["dtype"] in QUANTIZED
    if quantized != isinstance(m.get("quantization"), dict):
        return "a quantized artifact needs its 'quantization' record, and only it has one"
    problem = (
        _io_problem(m)
        or (_taps_problem(m) if "taps" in m else None)
        or (_quantization_problem(m["quantization"]) if quantized else None)
    )
    if problem:
        return problem
    if model_layers(model["architecture"], cfg) > MAX_LAYERS:
        return f"model config num_layers = {cfg['num_layers']}, more than {MAX_LAYERS}"
    inputs, outputs = model_io(model["architecture"], cfg, model["options"], io_dtype(m["dtype"]))
    for kind, want in (("inputs", inputs), ("outputs", outputs)):
        if m[kind] != want:
            return (
                f"{kind} {_listing(m[kind])} are not those of the {model['architecture']} model this "
                f"config describes: {_listing(want)} (symbolic batch and sequence)"
            )
    files = m["files"]
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and type(e.get("bytes")) is int
        for e in files.values()
    ):
        return "'files' must map each file to {sha256, bytes}"
    missing = [f for f in ((MODEL, WEIGHTS) if quantized else (MODEL,)) if f not in files]
    if missing:
        return f"the file list does not name {missing[0]}"
    cached = ARCHITECTURES[model["architecture"]].cached
    beside = [f for f in (GENAI_CONFIG, *GENAI_TOKENIZER_FILES) if f in files]
    if beside and not cached:
        return f"{beside[0]} is listed, but only a decoder carries one beside its graph"
    if "special_tokens" in m:
        problem = (
            special_tokens_problem(m["special_tokens"], cfg["vocab_size"])
            if cached
            else "'special_tokens' of a model that is no decoder"
        )
        if problem:
            return problem
    weights = m.get("weights")
    if WEIGHTS not in files and not (isinstance(weights, dict) and isinstance(weights.get("in_graph"), dict)):
        return "weights.npz is not listed, and 'weights.in_graph' does not place the weights in the graph"
    if type(m["golden_sets"]) is not int or not 0 <= m["golden_sets"] <= MAX_GOLDEN_SETS:
        return f"bad golden_sets {m['golden_sets']!r}"
    listed = sorted({rel.split("/")[0] for rel in files if rel.startswith("test_data_set_")})
    if listed != sorted(f"test_data_set_{n}" for n in range(m["golden_sets"])):
        return f"golden_sets is {m['golden_sets']} but the file list holds {listed}"
    return None


def _config_problem(model: dict) -> str | None:
    """What is wrong with a manifest model's config and options, or None."""
    cfg, arch = model["config"], ARCHITECTURES[model["architecture"]]
    if arch.cached:
        problem = decoder_format.config_problem(cfg)
        options = f"model options {model['options']!r}: a decoder takes none" if model["options"] else None
        return problem or options
    unknown = sorted(set(cfg) - set(CONFIG_FIELDS))
    if unknown:
        return f"model config has unknown field {unknown[0]!r}"
    absent = [k for k in CONFIG_FIELDS if k not in cfg]
    if absent:
        return f"model config lacks {absent[0]!r}"
    bad = [k for k, ok in CONFIG_FIELDS.items() if not ok(cfg.get(k))]
    if bad:
        return f"model config {bad[0]} = {model['config'].get(bad[0])!r} is not valid"
    wanted = arch.options
    options = model["options"]
    if sorted(options) != sorted(wanted) or not all(type(v) is bool for v in options.values()):
        return f"model options {options!r}: architecture {model['architecture']} takes " + (
            " and ".join(f"{k!r}" for k in wanted) + " (true or false)" if wanted else "none"
        )
    kv = cfg["num_kv_heads"] or cfg["num_heads"]
    if cfg["hidden_size"] % cfg["num_heads"] or cfg["num_heads"] % kv:
        return f"model config has an impossible head layout: {cfg['hidden_size']}/{cfg['num_heads']}/{kv}"
    if max_sequence(cfg) < 1 or cfg["pad_token_id"] >= cfg["vocab_size"]:
        return (
            f"model config pad_token_id {cfg['pad_token_id']} does not fit its vocab_size "
            f"{cfg['vocab_size']} and max_positions {cfg['max_positions']}"
        )
    return None


def _taps_problem(m: dict) -> str | None:
    """Taps (optional: 0.1 artifacts have none): a list of {tap, layer, value, add} in computation order."""
    taps, cfg, arch = m["taps"], m["model"]["config"], m["model"]["architecture"]
    if not isinstance(taps, list) or not taps:
        return "'taps' must be a non-empty list"
    layers = model_layers(arch, cfg)
    for t in taps:
        if not isinstance(t, dict) or set(t) != {"tap", "layer", "value", "add"}:
            return "every tap must be {tap, layer, value, add}"
        if (
            t["tap"] not in TAPS
            or not isinstance(t["value"], str)
            or not isinstance(t["add"], (str, type(None)))
        ):
            return f"tap {t['tap']!r} is not one of {TAPS} with a value name"
        layered = t["tap"] in LAYER_TAPS
        if (t["layer"] is None) == layered or (
            layered and not (type(t["layer"]) is int and 0 <= t["layer"] < layers)
        ):
            return f"tap {t['tap']!r} has layer {t['layer']!r}, outside the model's {layers} layer(s)"
    return None


def _quantization_problem(q: dict) -> str | None:
    """What a rebuild reads of the int8 record: the float32 graph's sha256, the onnxruntime that quantized
    it, and the products the search kept in float32."""
    digest = q.get("float32_graph_sha256")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        return "quantization.float32_graph_sha256 must be a sha256 in hex"
    if not isinstance(q.get("onnxruntime"), str):
        return "quantization.onnxruntime must name the onnxruntime version that quantized the graph"
    nodes = q.get("float_nodes")
    if not isinstance(nodes, list) or not all(
        isinstance(n, dict) and isinstance(n.get("node"), str) for n in nodes
    ):
        return "quantization.float_nodes must be a list of {node, ...}"
    return None


def _listing(values: list) -> str:
    return "[" + ", ".join(f"{v['name']} {v['dtype']}{v['shape']}" for v in values) + "]"


def _io_problem(m: dict) -> str | None:
    """Inputs and outputs the validator can feed and judge: float tensors in the artifact's dtype, int64 ids
    and masks, shapes (batch, ...) of positive ints and known symbolic dims, a 2-D padding mask."""
    for v in m["inputs"] + m["outputs"]:
        shape, role = v["shape"], v.get("role", "output")
        want = io_dtype(m["dtype"]) if role in (*FLOAT_ROLES, "output") else "int64"
        if v["dtype"] != want:
            return f"{v['name']!r} is {v['dtype']}, expected {want}"
        if (
            not shape
            or shape[0] != "batch"
            or not all(d in DIMS or _positive_int(d) for d in shape)
            or (role == "padding_mask" and len(shape) != 2)
        ):
            return (
                f"{v['name']!r} has shape {shape}: expected ['batch', ...] of positive ints and {list(DIMS)}"
            )
    return None


# --- taps: values at the sublayer boundaries, for locating where a model diverges --------------------

TAPS = ("embeddings", "attention", "attention_block", "block", "final_norm", "pooler")
LAYER_TAPS = ("attention", "attention_block", "block")


def tap_label(tap: str, layer: int | None) -> str:
    """'layer 5 attention', 'embeddings': how a report names a tap."""
    return tap if layer is None else f"layer {layer} {tap}"


def block_stages(architecture: str, cfg: dict) -> tuple[int, int]:
    """The rounding stages of a block's attention and feed-forward sublayers (qkv_onnx/block.py)."""
    return stages_of(block_spec(architecture, cfg))


def tap_stages(architecture: str, cfg: dict, tap: str, layer: int | None) -> int:
    """S of the tolerance policy up to a tap: the sequential stages computed before and in it (embeddings 1,
    each block its attention's and feed-forward's (block_stages), pooler 1), as for the model's outputs."""
    kind = ARCHITECTURES[architecture].kind
    if kind == "attention":
        return 2
    if kind == "block":
        return 2 if tap == "block" else 1
    attention, ffn = block_stages(architecture, cfg)
    before = 1 + (attention + ffn) * (layer or 0)
    blocks = (attention + ffn) * cfg["num_layers"]
    return {
        "embeddings": 1,
        "attention": before + attention,
        "attention_block": before + attention,
        "block": before + attention + ffn,
        "final_norm": blocks + 1,
        "pooler": blocks + 2,
    }[tap]


# --- graph walks ---------------------------------------------------------------------------------


def _subgraphs(nodes):
    for node in nodes:
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield g
                yield from _subgraphs(g.node)


def bodies(model: onnx.ModelProto) -> list:
    """The main graph, the model-local functions, the training graphs (training_info) and every subgraph
    inside them or in a function's attribute defaults."""
    training = [g for t in model.training_info for g in (t.initialization, t.algorithm) if g.ByteSize()]
    defaults = [
        g
        for f in model.functions
        for a in f.attribute_proto
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)
    ]
    tops = [model.graph, *model.functions, *training, *defaults]
    return tops + [g for top in tops for g in _subgraphs(top.node)]


def every_attention_op() -> set[str]:
    """'domain::Op' of every fused attention op any backend writes, for encoders or decoders."""
    return {
        op_key(*op) for b in BACKENDS.values() for op in b.attention_ops + (b.decoder[1] if b.decoder else ())
    }


def all_nodes(model: onnx.ModelProto):
    """Every node: main graph, model-local functions, and the subgraphs inside them."""
    for body in bodies(model):
        yield from body.node


def op_key(domain: str, op: str) -> str:
    """'domain::Op', or 'Op' for standard ONNX: how op counts are keyed in the manifest."""
    return f"{domain}::{op}" if domain not in STANDARD_DOMAINS else op


def graph_io(values) -> list[dict]:
    """Name, element type and (symbolic) shape of graph inputs or outputs, as the manifest lists them."""
    out = []
    for v in values:
        t = v.type.tensor_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        except (KeyError, ValueError, TypeError):
            dtype = f"elem_type {t.elem_type}"
        out.append(
            {"name": v.name, "dtype": dtype, "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
        )
    return out


# --- the inputs and outputs a model has ----------------------------------------------------------


def model_io(architecture: str, cfg: dict, options: dict, dtype: str) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of the reference module of `architecture`, as the manifest lists them: inputs
    {name, role, dtype, shape}, outputs {name, dtype, shape}, symbolic 'batch', 'seq' and 'kv_seq'. What
    the exporter writes for it (model_defs' registry is built from it; the tests compare real exports)."""
    arch = ARCHITECTURES[architecture]
    if arch.cached:
        return decoder_format.model_io(cfg, dtype)
    h = cfg["hidden_size"]

    def value(name, shape, role=None):
        record = {"name": name, "dtype": dtype if role in (None, "hidden") else "int64", "shape": list(shape)}
        return {**record, "role": role} if role else record

    if arch.layered:
        ids = ("batch", "seq")
        inputs = [
            value("input_ids", ids, "token_ids"),
            *([value("token_type_ids", ids, "segment_ids")] if cfg["type_vocab_size"] else []),
            value("attention_mask", ids, "padding_mask"),
        ]
        outputs = [value("last_hidden_state", ("batch", "seq", h))]
        if cfg["with_pooler"]:
            outputs.append(value("pooler_output", ("batch", h)))
        return inputs, outputs
    cross = options.get("cross", False)  # an attention module's option
    inputs = [value("hidden_states", ("batch", "seq", h), "hidden")]
    if cross:
        inputs.append(value("context", ("batch", "kv_seq", h), "hidden"))
    inputs.append(value("attention_mask", ("batch", "kv_seq" if cross else "seq"), "padding_mask"))
    return inputs, [value("output", ("batch", "seq", h))]


# --- the weights a config implies ----------------------------------------------------------------


def _linear(prefix: str, out_features: int, in_features: int) -> dict:
    return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.bias": (out_features,)}


def _norm(prefix: str, width: int) -> dict:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def _block_weights(prefix: str, architecture: str, cfg: dict) -> dict:
    """One block's parameters named under `prefix` (qkv_onnx/block.py); an attention model's: its
    attention's."""
    shapes = block_weights(block_spec(architecture, cfg))
    alone = ARCHITECTURES[architecture].kind == "attention"
    return {f"{prefix}{k}": v for k, v in shapes.items() if not alone or k.startswith("attn.")}


def _count(shapes: dict) -> tuple[int, int]:
    return len(shapes), sum(math.prod(s) for s in shapes.values())


def weight_totals(architecture: str, cfg: dict) -> tuple[int, int]:
    """(tensors, elements) of expected_weights(architecture, cfg), from one block's and the model's own,
    before any layer is enumerated: how big weights.npz must be (a manifest may claim 10^12 layers)."""
    arch = ARCHITECTURES[architecture]
    if arch.cached:
        return decoder_format.weight_totals(cfg)
    block = _count(_block_weights("", architecture, cfg))
    if not arch.layered:
        return block
    outside = _count(_encoder_weights(cfg))
    return outside[0] + cfg["num_layers"] * block[0], outside[1] + cfg["num_layers"] * block[1]


def largest_weight(architecture: str, cfg: dict) -> int:
    """The elements of the largest parameter, from one block's and the model's own (no layer enumerated)."""
    arch = ARCHITECTURES[architecture]
    if arch.cached:
        shapes = {**decoder_format.layer_weights(cfg), **decoder_format.model_weights(cfg)}
    else:
        shapes = {**_block_weights("", architecture, cfg), **(_encoder_weights(cfg) if arch.layered else {})}
    return max((math.prod(s) for s in shapes.values()), default=0)


def expected_weights(architecture: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape the reference module of `architecture` has under `cfg`: the exact
    content of weights.npz (the state_dict of model_defs' module, checked against it in the tests)."""
    arch = ARCHITECTURES[architecture]
    if arch.cached:
        return decoder_format.expected_weights(cfg)
    if not arch.layered:
        return _block_weights("block." if arch.kind == "block" else "", architecture, cfg)
    outside = _encoder_weights(cfg)
    first = {k: v for k, v in outside.items() if k.startswith(("embeddings.", "relative_bias."))}
    blocks = {}
    for i in range(cfg["num_layers"]):
        blocks.update(_block_weights(f"blocks.{i}.", architecture, cfg))
    return {**first, **blocks, **{k: v for k, v in outside.items() if k not in first}}


def _encoder_weights(cfg: dict) -> dict[str, tuple[int, ...]]:
    """A BERT-family encoder's parameters outside its blocks: embeddings, relative bias, final norm,
    pooler."""
    h = cfg["hidden_size"]
    e = cfg["embedding_size"] or h
    out = {
        "embeddings.word.weight": (cfg["vocab_size"], e),
        "embeddings.position.weight": (cfg["max_positions"], e),
        **({"embeddings.token_type.weight": (cfg["type_vocab_size"], e)} if cfg["type_vocab_size"] else {}),
        **_norm("embeddings.norm", e),
        **(_linear("embeddings.project", h, e) if cfg["embedding_size"] else {}),
    }
    if cfg["relative_attention_buckets"]:
        out["relative_bias.weight"] = (cfg["relative_attention_buckets"], cfg["num_heads"])
    if cfg["pre_layer_norm"]:
        out.update(_norm("final_norm", h))
    if cfg["with_pooler"]:
        out.update(_linear("pooler", h, h))
    return out
