"""Read an artifact directory and refuse anything that does not match its manifest.

Nothing from an artifact is executed or unpickled: it is read as JSON, protobuf and
`.npy` with pickles refused, and every check runs before a runtime sees the model.
The format itself (schema, digests, backend table) is `qkv_onnx.artifact_format`.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..artifact_format import (
    BACKENDS,
    DIGEST_KEY,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MODEL,
    STANDARD_DOMAINS,
    WEIGHTS,
    all_nodes,
    bodies,
    expected_weights,
    golden_file,
    graph_io,
    manifest_digest,
    manifest_problem,
    sha256_file,
    signed,
    stored_weight_dtype,
)
from ..errors import ArtifactError, first_line
from ..stages import stage


@dataclass
class Artifact:
    path: Path
    manifest: dict
    weights: dict[str, np.ndarray]
    golden: list[
        tuple[list[np.ndarray], list[np.ndarray]]
    ]  # (inputs, outputs) per test_data_set_N, graph order
    foreign_ops: tuple[
        str, ...
    ] = ()  # 'domain::Op' of the nodes outside standard ONNX, e.g. com.microsoft ones

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    @property
    def name(self) -> str:
        return self.path.name


def read_manifest(directory: Path) -> dict:
    """Parse manifest.json, check its self-digest, canonical bytes and structure."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(
            f"{path}: {path.stat().st_size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES})"
        )
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
    if signed(manifest).encode() != raw:
        raise ArtifactError(f"{path}: not in the canonical form qkv-export writes (edited or corrupt)")
    problem = manifest_problem(manifest)
    if problem:
        raise ArtifactError(f"{path}: {problem}")
    return manifest


def verify_files(directory: Path, manifest: dict) -> None:
    """Only regular files, no symlinks; every listed file exists with its size and sha256; no file is
    unlisted."""
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
    extra = sorted(present - set(files) - {MANIFEST})
    if extra:
        raise ArtifactError(f"{directory / extra[0]}: not listed in the manifest")


def read_model(path: Path) -> onnx.ModelProto:
    """The graph, without loading any external data."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, onnx others
        raise ArtifactError(f"{path}: not an ONNX model ({first_line(e)})") from None
    if not model.HasField("graph"):
        raise ArtifactError(f"{path}: not an ONNX model (no graph)")
    return model


def _tensors(model: onnx.ModelProto):
    """Every TensorProto a runtime would load: initializers and tensor attributes, anywhere in the model."""
    for body in bodies(model):
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
        where = f"{directory / MODEL}: tensor {tensor.name!r} keeps its data in {location!r}"
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
            raise ArtifactError(
                f"{directory / location}: {size} bytes, shorter than declared: tensor "
                f"{tensor.name!r} is at bytes {offset}..{offset + length}"
            )


def _signature(values) -> str:
    return ", ".join(f"{v['name']} {v['dtype']}{v['shape']}" for v in values) or "nothing"


def check_graph(path: Path, model: onnx.ModelProto, manifest: dict) -> None:
    """The graph's inputs and outputs are the manifest's, and every op is standard ONNX, of a domain the
    artifact's backend emits (com.microsoft for ort-contrib), or a function defined in the model."""
    for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        got = graph_io(values)
        declared = [{k: v[k] for k in ("name", "dtype", "shape")} for v in manifest[kind]]
        if got != declared:
            raise ArtifactError(
                f"{path}: graph {kind} [{_signature(got)}] are not the manifest's [{_signature(declared)}]"
            )
    local = {(f.domain, f.name) for f in model.functions}
    allowed = STANDARD_DOMAINS + BACKENDS[manifest["backend"]].domains
    for node in all_nodes(model):
        if node.domain not in allowed and (node.domain, node.op_type) not in local:
            raise ArtifactError(
                f"{path}: op {node.op_type!r} of domain {node.domain!r} (node {node.name!r}) is "
                f"neither standard ONNX, nor emitted by backend {manifest['backend']}, nor a "
                "function defined in the model"
            )


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


def check_weights(directory: Path, manifest: dict, weights: dict) -> None:
    """weights.npz holds exactly the parameters the manifest's config implies, with their shapes, in the
    artifact's dtype: the config sizes the tolerance and the rebuilds, so it must be the weights' own."""
    path = directory / WEIGHTS
    stored = stored_weight_dtype(manifest["dtype"])
    odd = [name for name, a in sorted(weights.items()) if a.dtype.name != stored]
    if odd:
        raise ArtifactError(
            f"{path}: {odd[0]} is {weights[odd[0]].dtype.name}, the artifact is {manifest['dtype']} "
            f"(weights stored as {stored})"
        )
    expected = expected_weights(manifest["model"]["architecture"], manifest["model"]["config"])
    missing, extra = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or extra:
        what = (
            f"lacks {missing[0]!r}, which the config implies"
            if missing
            else f"holds {extra[0]!r}, which the config does not imply"
        )
        raise ArtifactError(
            f"{directory / MANIFEST}: weights.npz {what} ({len(missing)} missing, {len(extra)} unexpected)"
        )
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise ArtifactError(
                f"{directory / MANIFEST}: weights.npz {name} is {list(weights[name].shape)}, "
                f"the config implies {list(shape)}"
            )


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
        raise ArtifactError(
            f"{path}: holds {tensor.name!r} {array.dtype.name}, expected {spec['name']!r} {spec['dtype']}"
        )
    bound = dict(dims)
    if not _fits(array.shape, spec["shape"], dims):
        raise ArtifactError(
            f"{path}: shape {list(array.shape)} does not fit the manifest's {spec['shape']}"
            + (f" with {bound}" if bound else "")
        )
    return array


def load_golden(directory: Path, manifest: dict) -> list:
    """Golden sets as [(inputs, outputs)]; symbolic dims agree across the tensors of a set."""
    sets = []
    for n in range(manifest["golden_sets"]):
        dims = {}
        tensors = []
        for kind, specs in (("input", manifest["inputs"]), ("output", manifest["outputs"])):
            rel = [golden_file(n, kind, k) for k in range(len(specs))]
            missing = [r for r in rel if r not in manifest["files"]]
            if missing:
                raise ArtifactError(
                    f"{directory / missing[0]}: golden file missing from the manifest's file list"
                )
            tensors.append([_read_tensor(directory / r, spec, dims) for r, spec in zip(rel, specs)])
        sets.append(tuple(tensors))
    return sets


STAGES = {
    "manifest": "read manifest",
    "files": "sha256 of files",
    "graph": "onnx.load + graph checks",
    "checker": "onnx.checker (full)",
    "weights": "load weights.npz",
    "golden": "load golden data",
}


def load_artifact(directory) -> Artifact:
    """Verify and load an artifact; raises ArtifactError naming the first problem."""
    directory = Path(directory)
    with stage(STAGES["manifest"]):
        manifest = read_manifest(directory)
    with stage(STAGES["files"]):
        verify_files(directory, manifest)
    with stage(STAGES["graph"]):
        model = read_model(directory / MODEL)
        check_external_data(directory, model, manifest)
        check_graph(directory / MODEL, model, manifest)
        foreign = tuple(
            sorted({f"{n.domain}::{n.op_type}" for n in all_nodes(model) if n.domain not in STANDARD_DOMAINS})
        )
        del model  # the checker reads its own copy: never two of bert-large's 1.3 GB graph at once
    with stage(STAGES["checker"]):
        check_model(directory / MODEL)
    with stage(STAGES["weights"]):
        weights = load_weights(directory / WEIGHTS)
        check_weights(directory, manifest, weights)
    with stage(STAGES["golden"]):
        golden = load_golden(directory, manifest)
    return Artifact(directory, manifest, weights, golden, foreign)
