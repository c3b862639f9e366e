"""Read an artifact directory and refuse anything that does not match its manifest."""
import hashlib
import json
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


class ArtifactError(Exception):
    """The artifact is unusable (exit code 2). The message names the file and the reason."""


@dataclass
class Artifact:
    path: Path
    manifest: dict
    weights: dict
    golden: list  # [(inputs, outputs)] per test_data_set_N, arrays in graph order

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
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
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
            or not isinstance(model.get("architecture"), str):
        return "'model' must hold 'architecture', 'config' and 'options'"
    if m["dtype"] not in DTYPES:
        return f"unsupported dtype {m['dtype']!r}"
    for key in ("inputs", "outputs"):
        if not isinstance(m[key], list) or not m[key] or not all(
                isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("dtype"), str)
                and isinstance(v.get("shape"), list) for v in m[key]):
            return f"'{key}' must be a non-empty list of {{name, dtype, shape}}"
    if not all(v.get("role") in INPUT_ROLES for v in m["inputs"]):
        return f"every input needs a 'role' among {INPUT_ROLES}"
    files = m["files"]
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
            for e in files.values()):
        return "'files' must map each file to {sha256, bytes}"
    if "model.onnx" not in files:
        return "the file list does not name model.onnx"
    if not isinstance(m["golden_sets"], int) or not 0 <= m["golden_sets"] <= 64:
        return f"bad golden_sets {m['golden_sets']!r}"
    return None


def verify_files(directory: Path, manifest: dict) -> None:
    """Every listed file exists with its size and sha256; no file is unlisted."""
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
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    extra = sorted(present - set(files) - {"manifest.json"})
    if extra:
        raise ArtifactError(f"{directory / extra[0]}: not listed in the manifest")


def check_model(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # onnx raises several types for a bad file
        raise ArtifactError(f"{path}: onnx.checker failed: {str(e).strip().splitlines()[0]}") from None


def load_weights(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except Exception as e:
        raise ArtifactError(f"{path}: unreadable weights ({e})") from None


def _read_tensor(path: Path, name: str, dtype: str) -> np.ndarray:
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(path.read_bytes())
        array = numpy_helper.to_array(tensor)
    except Exception as e:
        raise ArtifactError(f"{path}: not a TensorProto ({e})") from None
    if tensor.name != name or array.dtype.name != dtype:
        raise ArtifactError(f"{path}: holds {tensor.name!r} {array.dtype.name}, expected {name!r} {dtype}")
    return array


def load_golden(directory: Path, manifest: dict) -> list:
    sets = []
    for n in range(manifest["golden_sets"]):
        d = directory / f"test_data_set_{n}"
        ins = [_read_tensor(d / f"input_{k}.pb", v["name"], v["dtype"]) for k, v in enumerate(manifest["inputs"])]
        outs = [_read_tensor(d / f"output_{k}.pb", v["name"], v["dtype"]) for k, v in enumerate(manifest["outputs"])]
        sets.append((ins, outs))
    return sets


def load_artifact(directory) -> Artifact:
    """Verify and load an artifact; raises ArtifactError naming the first problem."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    check_model(directory / "model.onnx")
    weights = load_weights(directory / "weights.npz")
    return Artifact(directory, manifest, weights, load_golden(directory, manifest))
