"""Read an artifact directory and refuse anything that does not match its manifest.

Nothing from an artifact is executed or unpickled: it is read as JSON, protobuf and
`.npy` with pickles refused, and every check runs before a runtime sees the model.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

FORMAT = "qkv-onnx-artifact/1"
DTYPES = ("float32", "float16", "bfloat16")
INPUT_ROLES = ("hidden", "token_ids", "segment_ids", "padding_mask")
DIGEST_KEY = "manifest_sha256"
REQUIRED_KEYS = ("format", "model", "backend", "dtype", "inputs", "outputs", "files", "golden_sets")
ARCHITECTURES = ("attention", "encoder-block", "bert")
DIMS = ("batch", "seq", "kv_seq")  # the symbolic dims validation knows how to size
STANDARD_DOMAINS = ("", "ai.onnx")
BACKEND_DOMAINS = {"onnx-attention": (), "ort-contrib": ("com.microsoft",), "decomposed": ()}  # beyond standard ONNX
MAX_MANIFEST_BYTES = 1 << 24


def _positive_int(v) -> bool:
    return type(v) is int and v > 0


CONFIG_FIELDS = {  # what the oracle, the tolerance policy and the PyTorch rebuild read
    "num_layers": _positive_int, "hidden_size": _positive_int, "num_heads": _positive_int,
    "num_kv_heads": lambda v: v is None or _positive_int(v), "ffn_size": _positive_int,
    "vocab_size": _positive_int, "max_positions": _positive_int, "type_vocab_size": _positive_int,
    "layer_norm_eps": lambda v: type(v) is float and 0 < v < 1,
    "pre_layer_norm": lambda v: type(v) is bool, "with_pooler": lambda v: type(v) is bool,
}


class ArtifactError(Exception):
    """The artifact is unusable (exit code 2). The message names the file and the reason."""


@dataclass
class Artifact:
    path: Path
    manifest: dict
    weights: dict
    golden: list  # [(inputs, outputs)] per test_data_set_N, arrays in graph order
    foreign_ops: tuple = ()  # 'domain::Op' of the nodes outside standard ONNX, e.g. com.microsoft ones

    @property
    def model_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def name(self) -> str:
        return self.path.name


def np_dtype(name: str) -> np.dtype:
    """numpy dtype by name; bfloat16 is ml_dtypes' (what onnx's numpy_helper uses)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own digest: the manifest protects itself."""
    return hashlib.sha256(canonical_json(manifest).encode()).hexdigest()


def read_manifest(directory: Path) -> dict:
    """Parse manifest.json, check its self-digest, canonical bytes and structure."""
    path = directory / "manifest.json"
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: {path.stat().st_size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES})")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ArtifactError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: not a JSON object")
    digest = manifest.pop(DIGEST_KEY, None)
    if digest != manifest_digest(manifest):
        raise ArtifactError(f"{path}: content does not match its {DIGEST_KEY} (edited or corrupt)")
    if canonical_json({**manifest, DIGEST_KEY: digest}).encode() != raw:
        raise ArtifactError(f"{path}: not in the canonical form qkv-export writes (edited or corrupt)")
    problem = manifest_problem(manifest)
    if problem:
        raise ArtifactError(f"{path}: {problem}")
    return manifest


def manifest_problem(m: dict) -> str | None:
    """What is structurally wrong with a manifest, or None."""
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        return f"missing keys {missing}"
    if m["format"] != FORMAT:
        return f"format {m['format']!r}, expected {FORMAT!r}"
    model = m["model"]
    if not isinstance(model, dict) or not all(isinstance(model.get(k), dict) for k in ("config", "options")) \
            or not all(isinstance(model.get(k), str) for k in ("name", "architecture")):
        return "'model' must hold 'name', 'architecture', 'config' and 'options'"
    if model["architecture"] not in ARCHITECTURES:
        return f"unknown architecture {model['architecture']!r}; known: {', '.join(ARCHITECTURES)}"
    bad = [k for k, ok in CONFIG_FIELDS.items() if not ok(model["config"].get(k))]
    if bad:
        return f"model config {bad[0]} = {model['config'].get(bad[0])!r} is not valid"
    if not isinstance(m["backend"], str) or m["backend"] not in BACKEND_DOMAINS:
        return f"unknown backend {m['backend']!r}; known: {', '.join(BACKEND_DOMAINS)}"
    if m["dtype"] not in DTYPES:
        return f"unsupported dtype {m['dtype']!r}"
    for key in ("inputs", "outputs"):
        if not isinstance(m[key], list) or not m[key] or not all(
                isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("dtype"), str)
                and isinstance(v.get("shape"), list) for v in m[key]):
            return f"'{key}' must be a non-empty list of {{name, dtype, shape}}"
    if not all(v.get("role") in INPUT_ROLES for v in m["inputs"]):
        return f"every input needs a 'role' among {INPUT_ROLES}"
    problem = _io_problem(m)
    if problem:
        return problem
    files = m["files"]
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and type(e.get("bytes")) is int
            for e in files.values()):
        return "'files' must map each file to {sha256, bytes}"
    missing = [f for f in ("model.onnx", "weights.npz") if f not in files]
    if missing:
        return f"the file list does not name {missing[0]}"
    if type(m["golden_sets"]) is not int or not 0 <= m["golden_sets"] <= 64:
        return f"bad golden_sets {m['golden_sets']!r}"
    listed = sorted({rel.split("/")[0] for rel in files if rel.startswith("test_data_set_")})
    if listed != sorted(f"test_data_set_{n}" for n in range(m["golden_sets"])):
        return f"golden_sets is {m['golden_sets']} but the file list holds {listed}"
    return None


def _io_problem(m: dict) -> str | None:
    """Inputs and outputs the validator can feed and judge: float tensors in the artifact's dtype, int64 ids
    and masks, shapes (batch, ...) of positive ints and known symbolic dims, a 2-D padding mask."""
    for v in m["inputs"] + m["outputs"]:
        shape, role = v["shape"], v.get("role", "output")
        want = m["dtype"] if role in ("hidden", "output") else "int64"
        if v["dtype"] != want:
            return f"{v['name']!r} is {v['dtype']}, expected {want}"
        if not shape or shape[0] != "batch" or not all(d in DIMS or _positive_int(d) for d in shape) \
                or (role == "padding_mask" and len(shape) != 2):
            return f"{v['name']!r} has shape {shape}: expected ['batch', ...] of positive ints and {list(DIMS)}"
    return None


def verify_files(directory: Path, manifest: dict) -> None:
    """Only regular files, no symlinks; every listed file exists with its size and sha256; no file is unlisted."""
    present = set()
    for parent, dirs, names in os.walk(directory):
        for name in sorted(dirs + names):
            path = Path(parent, name)
            if path.is_symlink():
                raise ArtifactError(f"{path}: a symbolic link (an artifact holds only regular files)")
            if name in names:
                if not path.is_file():
                    raise ArtifactError(f"{path}: not a regular file")
                present.add(path.relative_to(directory).as_posix())
    files = manifest["files"]
    root = directory.resolve()
    for rel, entry in sorted(files.items()):
        path = directory / rel
        if root not in path.resolve().parents:
            raise ArtifactError(f"{path}: listed file lies outside the artifact directory")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"]:
            raise ArtifactError(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 does not match the manifest (file changed or corrupt)")
    extra = sorted(present - set(files) - {"manifest.json"})
    if extra:
        raise ArtifactError(f"{directory / extra[0]}: not listed in the manifest")


def first_line(e: Exception) -> str:
    """The first line of an exception's message (its type when it has none): error lines stay one line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_model(path: Path) -> onnx.ModelProto:
    """The graph, without loading any external data."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, onnx others
        raise ArtifactError(f"{path}: not an ONNX model ({first_line(e)})") from None
    if not model.HasField("graph"):
        raise ArtifactError(f"{path}: not an ONNX model (no graph)")
    return model


def _subgraphs(nodes):
    for node in nodes:
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield g
                yield from _subgraphs(g.node)


def _bodies(model: onnx.ModelProto) -> list:
    """The main graph, the model-local functions and every subgraph inside them."""
    tops = [model.graph, *model.functions]
    return tops + [g for top in tops for g in _subgraphs(top.node)]


def all_nodes(model: onnx.ModelProto):
    """Every node: main graph, model-local functions, and the subgraphs inside them."""
    for body in _bodies(model):
        yield from body.node


def _tensors(model: onnx.ModelProto):
    """Every TensorProto a runtime would load: initializers and tensor attributes, anywhere in the model."""
    for body in _bodies(model):
        yield from getattr(body, "initializer", ())
        for sparse in getattr(body, "sparse_initializer", ()):
            yield from (sparse.values, sparse.indices)
    for node in all_nodes(model):
        for a in node.attribute:
            yield from ([a.t] if a.HasField("t") else []) + list(a.tensors)
            for sparse in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                yield from (sparse.values, sparse.indices)


def check_external_data(directory: Path, model: onnx.ModelProto, manifest: dict) -> None:
    """Each external-data tensor names a file listed in the manifest, by a bare name inside the
    directory, and lies within that file. Run before anything reads the data."""
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.external_data:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"{directory / 'model.onnx'}: tensor {tensor.name!r} keeps its data in {location!r}"
        if location in ("", ".", "..") or os.path.basename(location) != location or "\\" in location:
            raise ArtifactError(f"{where}, not a file name inside the artifact directory")
        if location not in manifest["files"]:
            raise ArtifactError(f"{where}, which the manifest does not list")
        try:
            offset, length = int(info.get("offset", "0")), int(info["length"])
        except (KeyError, ValueError):
            raise ArtifactError(f"{where} without a valid offset and length") from None
        size = (directory / location).stat().st_size
        if offset < 0 or length < 0 or offset + length > size:
            raise ArtifactError(f"{directory / location}: {size} bytes, shorter than declared: tensor "
                                f"{tensor.name!r} is at bytes {offset}..{offset + length}")


def graph_io(values) -> list:
    """Name, element type and (symbolic) shape of graph inputs or outputs, as the manifest lists them."""
    out = []
    for v in values:
        t = v.type.tensor_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        except (KeyError, ValueError, TypeError):
            dtype = f"elem_type {t.elem_type}"
        out.append({"name": v.name, "dtype": dtype, "shape": [d.dim_param or d.dim_value for d in t.shape.dim]})
    return out


def _signature(values) -> str:
    return ", ".join(f"{v['name']} {v['dtype']}{v['shape']}" for v in values) or "nothing"


def check_graph(path: Path, model: onnx.ModelProto, manifest: dict) -> None:
    """The graph's inputs and outputs are the manifest's, and every op is standard ONNX, of a domain the
    artifact's backend emits (com.microsoft for ort-contrib), or a function defined in the model."""
    for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        got = graph_io(values)
        declared = [{k: v[k] for k in ("name", "dtype", "shape")} for v in manifest[kind]]
        if got != declared:
            raise ArtifactError(f"{path}: graph {kind} [{_signature(got)}] are not the manifest's "
                                f"[{_signature(declared)}]")
    local = {(f.domain, f.name) for f in model.functions}
    allowed = STANDARD_DOMAINS + BACKEND_DOMAINS[manifest["backend"]]
    for node in all_nodes(model):
        if node.domain not in allowed and (node.domain, node.op_type) not in local:
            raise ArtifactError(f"{path}: op {node.op_type!r} of domain {node.domain!r} (node {node.name!r}) is "
                                f"neither standard ONNX, nor emitted by backend {manifest['backend']}, nor a "
                                "function defined in the model")


def check_model(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # onnx raises several types for a bad file
        raise ArtifactError(f"{path}: onnx.checker failed: {first_line(e)}") from None


def load_weights(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except Exception as e:
        raise ArtifactError(f"{path}: unreadable weights ({e})") from None


def config_problem(manifest: dict, weights: dict) -> str | None:
    """Where the config disagrees with the weights: it sizes the tolerance and the PyTorch rebuild."""
    cfg, architecture = manifest["model"]["config"], manifest["model"]["architecture"]
    h = cfg["hidden_size"]
    shapes = {"attn.q_proj.weight": (h, h), "ffn.fc1.weight": (cfg["ffn_size"], h),
              "embeddings.word.weight": (cfg["vocab_size"], h),
              "embeddings.position.weight": (cfg["max_positions"], h),
              "embeddings.token_type.weight": (cfg["type_vocab_size"], h)}
    for name, array in sorted(weights.items()):
        for suffix, shape in shapes.items():
            if name.endswith(suffix) and array.shape != shape:
                return f"weights.npz {name} is {list(array.shape)}, the config implies {list(shape)}"
    layers = sum(name.endswith("attn.q_proj.weight") for name in weights)
    expected = cfg["num_layers"] if architecture == "bert" else 1
    if layers != expected:
        return f"weights.npz holds {layers} attention modules, the config implies {expected}"
    return None


def check_weights(directory: Path, manifest: dict, weights: dict) -> None:
    stored = "float32" if manifest["dtype"] == "bfloat16" else manifest["dtype"]  # .npy has no bfloat16
    odd = [name for name, a in sorted(weights.items()) if a.dtype.name != stored]
    if odd:
        raise ArtifactError(f"{directory / 'weights.npz'}: {odd[0]} is {weights[odd[0]].dtype.name}, "
                            f"the artifact is {manifest['dtype']} (weights stored as {stored})")
    problem = config_problem(manifest, weights)
    if problem:
        raise ArtifactError(f"{directory / 'manifest.json'}: {problem}")


def _fits(shape, declared, dims: dict) -> bool:
    """Shape matches the declared one, binding symbolic dims consistently across one golden set."""
    if len(shape) != len(declared):
        return False
    for n, d in zip(shape, declared):
        if n < 1 or (n != d if isinstance(d, int) else dims.setdefault(d, n) != n):
            return False
    return True


def _read_tensor(path: Path, spec: dict, dims: dict) -> np.ndarray:
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(path.read_bytes())
    except Exception as e:
        raise ArtifactError(f"{path}: not a TensorProto ({first_line(e)})") from None
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        raise ArtifactError(f"{path}: keeps its data in another file; golden tensors must hold their data")
    try:
        array = numpy_helper.to_array(tensor)
    except Exception as e:
        raise ArtifactError(f"{path}: not a readable tensor ({first_line(e)})") from None
    if tensor.name != spec["name"] or array.dtype.name != spec["dtype"]:
        raise ArtifactError(f"{path}: holds {tensor.name!r} {array.dtype.name}, "
                            f"expected {spec['name']!r} {spec['dtype']}")
    bound = dict(dims)
    if not _fits(array.shape, spec["shape"], dims):
        raise ArtifactError(f"{path}: shape {list(array.shape)} does not fit the manifest's {spec['shape']}"
                            + (f" with {bound}" if bound else ""))
    return array


def load_golden(directory: Path, manifest: dict) -> list:
    """Golden sets as [(inputs, outputs)]; symbolic dims agree across the tensors of a set."""
    sets = []
    for n in range(manifest["golden_sets"]):
        dims = {}
        tensors = []
        for kind, specs in (("input", manifest["inputs"]), ("output", manifest["outputs"])):
            rel = [f"test_data_set_{n}/{kind}_{k}.pb" for k in range(len(specs))]
            missing = [r for r in rel if r not in manifest["files"]]
            if missing:
                raise ArtifactError(f"{directory / missing[0]}: golden file missing from the manifest's file list")
            tensors.append([_read_tensor(directory / r, spec, dims) for r, spec in zip(rel, specs)])
        sets.append(tuple(tensors))
    return sets


def load_artifact(directory) -> Artifact:
    """Verify and load an artifact; raises ArtifactError naming the first problem."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    model = read_model(directory / "model.onnx")
    check_external_data(directory, model, manifest)
    check_graph(directory / "model.onnx", model, manifest)
    foreign = tuple(sorted({f"{n.domain}::{n.op_type}" for n in all_nodes(model) if n.domain not in STANDARD_DOMAINS}))
    del model  # the checker reads its own copy: never two of bert-large's 1.3 GB graph at once
    check_model(directory / "model.onnx")
    weights = load_weights(directory / "weights.npz")
    check_weights(directory, manifest, weights)
    return Artifact(directory, manifest, weights, load_golden(directory, manifest), foreign)
