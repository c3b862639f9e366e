"""Read an artifact directory and refuse anything that does not match its manifest.

Nothing from an artifact is executed or unpickled: it is read as JSON, protobuf and `.npy` (object arrays
refused), and every check runs before a runtime sees the model. The cost of each step is bounded before it
starts, by caps sized from the manifest's own model (caps.py); each file is read once into a private copy
(intake.py) that every later step reads; the graph is either rebuilt by the exporter and compared byte for
byte (rebuild.py) or held to the exporter's structural contract (`qkv_onnx.graph_contract`); onnx.checker
and the runtimes run in a sandbox with limits (sandbox.py). The format itself (schema, digests, backend
table) is `qkv_onnx.artifact_format`.
"""

import mmap
import os
from dataclasses import dataclass, field
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
    JsonProblem,
    all_nodes,
    bodies,
    golden_file,
    graph_io,
    manifest_digest,
    manifest_problem,
    signed,
    strict_json,
    with_defaults,
)
from ..errors import ArtifactError, BrokenEnvironment, first_line, show
from ..genai import GENAI_CONFIG, genai_config
from ..genai import encode as encode_genai
from ..graph_contract import ContractError, check_structure, check_vocabulary, unchecked
from ..graph_weights import artifact_weights
from ..scratch import ScratchDir
from ..stages import stage
from .budget import Plan, gib, needs, plan
from .caps import GOLDEN_TOKENS, MAX_GOLDEN_BATCH, check_listed_sizes, max_seq
from .intake import Intake, check_tree
from .rebuild import PendingRebuild, rebuild_problem, rebuild_stitched
from .sandbox import Limits, check_model_sandboxed

LINEAR_WEIGHTS = ("_proj.weight", ".fc1.weight", ".fc2.weight", "pooler.weight")


@dataclass
class Artifact:
    path: Path  # the directory as given: what messages name
    manifest: dict
    weights: dict[str, np.ndarray]
    golden: list[
        tuple[list[np.ndarray], list[np.ndarray]]
    ]  # (inputs, outputs) per test_data_set_N, graph order
    foreign_ops: tuple[
        str, ...
    ] = ()  # 'domain::Op' of the nodes outside standard ONNX, e.g. com.microsoft ones
    private: Path | None = None  # the verified copy of the files: what every later step reads
    graph_check: str = ""  # how the graph was judged: a line for the report
    limits: Limits | None = None  # the sandbox limits of this artifact's checker and runtimes
    _scratch: object = field(default=None, repr=False)  # the ScratchDir holding `private`
    _intake: Intake | None = field(default=None, repr=False)  # the leases that guard `private`'s links
    _pending: PendingRebuild | None = field(default=None, repr=False)  # a rebuild still running
    plan: Plan = field(default_factory=Plan)  # how its stages share the memory budget (budget.py)

    def verify_graph(self) -> None:
        """Wait for a rebuild started in the background (load_artifact(background=True)) and require the
        graph to be its bytes; ArtifactError otherwise. Nothing may open the model before this returns."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                counts = pending.verify()
            except BrokenEnvironment as e:  # the exporter cannot run here: the structural contract judges
                self.foreign_ops = check_structural(
                    self.path, self.private, self.manifest, self.weights, self.limits
                )
                self.graph_check = structural_check(
                    f"the exporter cannot run here ({e})", unchecked(self.manifest)
                )
                return
            self.foreign_ops = tuple(sorted(k for k in counts if "::" in k))

    @property
    def model_path(self) -> Path:
        """The model runtimes open: the verified private copy (waiting for a background rebuild first)."""
        self.verify_graph()
        return (self.private or self.path) / MODEL

    @property
    def screened_model_path(self) -> Path:
        """The private copy's model before a background rebuild has proven it: screened already (no op an
        export never writes, external data inside the artifact, the manifest's inputs and outputs), so
        sandboxed runtimes may open it meanwhile; what they compute counts only once verify_graph passes."""
        return (self.private or self.path) / MODEL

    @property
    def shown_model_path(self) -> Path:
        """The model as messages name it: the artifact's file."""
        return self.path / MODEL

    @property
    def name(self) -> str:
        return self.path.name

    def check_unchanged(self) -> None:
        """ArtifactError if a file the private directory links to was opened for writing meanwhile."""
        if self._intake is not None:
            self._intake.check_unchanged()

    def close(self) -> None:
        """Stop a pending rebuild; remove the private copy."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._intake is not None:
            self._intake.close()
            self._intake = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


def structural_check(why: str, values: list[str] = ()) -> str:
    """The report's line for a graph judged by the structural contract, why it was not rebuilt, and the
    config values it does not read off the graph (graph_contract.unchecked)."""
    line = (
        "graph: structural contract (vocabulary, op counts, inputs and outputs, initializers = the weights) "
        f"and onnx.checker; not rebuilt: {why}"
    )
    return line + ("; not checked without a rebuild: " + ", ".join(values) if values else "")


def read_manifest(directory: Path) -> dict:
    """Parse manifest.json (read once, at most MAX_MANIFEST_BYTES), check its self-digest, canonical bytes
    and structure."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{show(directory)}: not a directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ArtifactError(f"{show(path)}: missing") from None
    except OSError as e:
        raise ArtifactError(f"{show(path)}: cannot be opened as a regular file ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not os.path.stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArtifactError(f"{show(path)}: not a regular file")
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{show(path)}: more bytes than a manifest can be ({MAX_MANIFEST_BYTES})")
    try:
        manifest = strict_json(raw)
    except JsonProblem as e:
        raise ArtifactError(f"{show(path)}: not valid JSON ({e})") from None
    except RecursionError:
        raise ArtifactError(f"{show(path)}: not valid JSON (nested too deeply)") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{show(path)}: not a JSON object")
    digest = manifest.pop(DIGEST_KEY, None)
    if digest != manifest_digest(manifest):
        raise ArtifactError(f"{show(path)}: content does not match its {DIGEST_KEY} (edited or corrupt)")
    if signed(manifest).encode() != raw:
        raise ArtifactError(f"{show(path)}: not in the canonical form qkv-export writes (edited or corrupt)")
    with_defaults(manifest)
    problem = manifest_problem(manifest)
    if problem:
        raise ArtifactError(f"{show(path)}: {problem}")
    return manifest


def read_model(path: Path, shown: Path, weights: bool = True) -> onnx.ModelProto:
    """The graph of the private copy `path` (its size bounded by the caps), without loading any external
    data; errors name `shown`. Without `weights`, the main graph's initializers come without their bytes
    (raw_data): what the screen reads, at the cost of the graph's structure only."""
    try:
        if weights:
            model = onnx.load(str(path), load_external_data=False)
        else:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                model = onnx.ModelProto.FromString(without_raw_data(data))
    except Exception as e:  # protobuf raises DecodeError, onnx others, without_raw_data ValueError
        raise ArtifactError(f"{show(shown)}: not an ONNX model ({first_line(e)})") from None
    if not model.HasField("graph"):
        raise ArtifactError(f"{show(shown)}: not an ONNX model (no graph)")
    return model


def _varint(data, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("a truncated or overlong varint")
        byte = data[at]
        value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
        if not byte & 0x80:
            return value, at


def _fields(data, start: int, end: int):
    """(field number, wire type, the field's bytes, its payload's start and end) of a protobuf message."""
    at = start
    while at < end:
        key, body = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, stop = _varint(data, body)
            begin = body
        elif wire == 1 or wire == 5:
            begin, stop = body, body + (8 if wire == 1 else 4)
        elif wire == 2:
            length, begin = _varint(data, body)
            stop = begin + length
        else:
            raise ValueError(f"wire type {wire} (groups) is not in the ONNX format")
        if stop > end:
            raise ValueError("a field runs past its message")
        yield number, wire, data[at:stop], begin, stop
        at = stop


def _tag(number: int, length: int) -> bytes:
    out, value = bytearray(), number << 3 | 2
    for v in (value, length):
        while True:
            low, v = v & 0x7F, v >> 7
            out.append(low | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def without_raw_data(data) -> bytes:
    """The bytes of a ModelProto with every main-graph initializer's raw_data left out (wire format, nothing
    else parsed or copied): ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.raw_data = 9."""
    data, out = memoryview(data), []
    for number, wire, chunk, begin, stop in _fields(data, 0, len(data)):
        if number != 7 or wire != 2:
            out.append(bytes(chunk))
            continue
        graph = []
        for n, w, f, b, e in _fields(data, begin, stop):
            if n == 5 and w == 2:
                tensor = b"".join(bytes(x[2]) for x in _fields(data, b, e) if x[0] != 9)
                graph.append(_tag(5, len(tensor)) + tensor)
            else:
                graph.append(bytes(f))
        body = b"".join(graph)
        out.append(_tag(7, len(body)) + body)
    return b"".join(out)


def _attribute_tensors(attributes):
    for a in attributes:
        yield from ([a.t] if a.HasField("t") else []) + list(a.tensors)
        for sparse in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
            yield from (sparse.values, sparse.indices)


def _tensors(model: onnx.ModelProto):
    """Every TensorProto in the model: initializers and tensor attributes of the main graph, local
    functions (their attribute defaults too), training graphs and every subgraph inside them."""
    for body in bodies(model):
        yield from getattr(body, "initializer", ())
        for sparse in getattr(body, "sparse_initializer", ()):
            yield from (sparse.values, sparse.indices)
    for node in all_nodes(model):
        yield from _attribute_tensors(node.attribute)
    for function in model.functions:
        yield from _attribute_tensors(function.attribute_proto)


def check_external_data(
    directory: Path, model: onnx.ModelProto, manifest: dict, files: Path | None = None
) -> None:
    """Each external-data tensor (anywhere: see _tensors) names a file listed in the manifest, by a bare
    name inside the directory, and lies within that file (as found in `files`, the private copy, or the
    directory). Run before anything reads the data."""
    files = directory if files is None else files
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.external_data:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"{show(directory / MODEL)}: tensor {tensor.name!r} keeps its data in {location!r}"
        if location in ("", ".", "..") or os.path.basename(location) != location or "\\" in location:
            raise ArtifactError(f"{where}, not a file name inside the artifact directory")
        if location not in manifest["files"]:
            raise ArtifactError(f"{where}, which the manifest does not list")
        try:
            offset, length = int(info.get("offset", "0")), int(info["length"])
        except (KeyError, ValueError):
            raise ArtifactError(f"{where} without a valid offset and length") from None
        size = (files / location).stat().st_size
        if offset < 0 or length < 0 or offset + length > size:
            raise ArtifactError(
                f"{show(directory / location)}: {size} bytes, shorter than declared: tensor "
                f"{tensor.name!r} is at bytes {offset}..{offset + length}"
            )


def _signature(values) -> str:
    return ", ".join(f"{v['name']} {v['dtype']}{v['shape']}" for v in values) or "nothing"


def check_graph(path: Path, model: onnx.ModelProto, manifest: dict) -> None:
    """The graph's inputs and outputs are the manifest's (which are the format's for its model), and every
    op is standard ONNX or of a domain the artifact's backend emits (com.microsoft for ort-contrib)."""
    for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        got = graph_io(values)
        declared = [{k: v[k] for k in ("name", "dtype", "shape")} for v in manifest[kind]]
        if got != declared:
            raise ArtifactError(
                f"{show(path)}: graph {kind} [{_signature(got)}] are not the manifest's "
                f"[{_signature(declared)}]"
            )
    allowed = STANDARD_DOMAINS + BACKENDS[manifest["backend"]].domains
    for node in all_nodes(model):
        if node.domain not in allowed:
            raise ArtifactError(
                f"{show(path)}: op {node.op_type!r} of domain {node.domain!r} (node {node.name!r}) is "
                f"neither standard ONNX nor emitted by backend {manifest['backend']}"
            )


def load_weights(private: Path, directory: Path, manifest: dict) -> dict[str, np.ndarray]:
    """The parameters (from the private copy: the graph's initializers as the manifest places them, or
    weights.npz) as exactly those the manifest's config implies, with their shapes, in the artifact's
    stored dtype: the config sizes the tolerance and the rebuild, so it must be the weights' own. No linear
    layer may hold an all-zero row or column: padding that leaves the function unchanged while widening the
    config (an FFN padded with dead units, a layer that adds 0)."""
    weights = artifact_weights(private, directory, manifest)
    shown = directory / (WEIGHTS if WEIGHTS in manifest["files"] else MODEL)
    for name, a in weights.items():
        if name.endswith(LINEAR_WEIGHTS):
            for axis, what in ((1, "row"), (0, "column")):
                dead = np.flatnonzero(~a.any(axis=axis))
                if dead.size:
                    raise ArtifactError(
                        f"{show(shown)}: {name} has an all-zero {what} ({what} {dead[0]}, "
                        f"{dead.size} in all): padding an export never writes (it would widen the config, "
                        "and the tolerance with it, without changing the function)"
                    )
    return weights


def check_genai_config(private: Path, directory: Path, manifest: dict) -> None:
    """A decoder's genai_config.json, where it has one, is exactly what the exporter derives from the
    manifest (qkv_onnx/genai.py): onnxruntime-genai reads it to find the model file, its inputs and sizes."""
    if GENAI_CONFIG in manifest["files"] and (private / GENAI_CONFIG).read_bytes() != encode_genai(
        genai_config(manifest)
    ):
        raise ArtifactError(
            f"{show(directory / GENAI_CONFIG)}: not the genai_config.json the exporter writes for this "
            "manifest (the model file, its inputs and outputs, its sizes and special tokens)"
        )


EMPTY_DIMS = ("past",)  # symbolic dims that may be 0: a prefill's cache


def _fits(shape, declared, dims: dict) -> bool:
    """Shape matches the declared one, binding symbolic dims consistently across one golden set (only a
    decoder's cache may be empty)."""
    if len(shape) != len(declared):
        return False
    for n, d in zip(shape, declared):
        least = 0 if d in EMPTY_DIMS else 1
        if n < least or (n != d if isinstance(d, int) else dims.setdefault(d, n) != n):
            return False
    return True


def _read_tensor(path: Path, shown: Path, spec: dict, dims: dict, caps: dict, config: dict) -> np.ndarray:
    """One golden TensorProto from the private copy `path` (errors name `shown`): its dims checked against
    the caps before its data is turned into an array."""
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(path.read_bytes())
    except Exception as e:
        raise ArtifactError(f"{show(shown)}: not a TensorProto ({first_line(e)})") from None
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        raise ArtifactError(
            f"{show(shown)}: keeps its data in another file; golden tensors must hold their data"
        )
    declared = spec["shape"]
    if len(tensor.dims) != len(declared) or any(
        n > caps.get(d, d if isinstance(d, int) else 0) for n, d in zip(tensor.dims, declared)
    ):
        raise ArtifactError(
            f"{show(shown)}: dims {list(tensor.dims)} exceed {spec['shape']} with at most {caps} "
            "(a small batch, no longer than the model's positions)"
        )
    try:
        array = numpy_helper.to_array(tensor)
    except Exception as e:
        raise ArtifactError(f"{show(shown)}: not a readable tensor ({first_line(e)})") from None
    if tensor.name != spec["name"] or array.dtype.name != spec["dtype"]:
        raise ArtifactError(
            f"{show(shown)}: holds {tensor.name!r} {array.dtype.name}, "
            f"expected {spec['name']!r} {spec['dtype']}"
        )
    bound = dict(dims)
    if not _fits(array.shape, spec["shape"], dims):
        raise ArtifactError(
            f"{show(shown)}: shape {list(array.shape)} does not fit the manifest's {spec['shape']}"
            + (f" with {bound}" if bound else "")
        )
    problem = input_problem(array, spec, config) if "role" in spec else None
    if problem:
        raise ArtifactError(f"{show(shown)}: {problem}")
    return array


def input_problem(x: np.ndarray, spec: dict, config: dict) -> str | None:
    """Why `x` is not a valid value of the input `spec` (by its role), or None: ids inside the model's
    vocabularies, a padding mask of 0 and 1, finite hidden states."""
    role = spec["role"]
    for ids, size in (("token_ids", "vocab_size"), ("segment_ids", "type_vocab_size")):
        if role == ids and x.size and (x.min() < 0 or x.max() >= config[size]):
            return f"{ids} {int(x.min())}..{int(x.max())} outside 0..{config[size] - 1} ({size})"
    if role == "padding_mask" and not np.isin(x, (0, 1)).all():
        return "a padding mask holds values other than 0 and 1"
    if role == "hidden" and not np.isfinite(x.astype(np.float32)).all():
        return "hidden states hold NaN or Inf"
    return None


def load_golden(private: Path, directory: Path, manifest: dict) -> list:
    """Golden sets as [(inputs, outputs)] from the private copy; symbolic dims agree across the tensors of
    a set, each within the caps (batch at most MAX_GOLDEN_BATCH, sequences at most the model's positions,
    GOLDEN_TOKENS positions over all sets); inputs hold valid values for their roles."""
    sets, tokens = [], 0
    seq = max_seq(manifest)
    caps = {"batch": MAX_GOLDEN_BATCH, "seq": seq, "kv_seq": seq, "past": seq, "total": seq}
    config = manifest["model"]["config"]
    for n in range(manifest["golden_sets"]):
        dims = {}
        tensors = []
        for kind, specs in (("input", manifest["inputs"]), ("output", manifest["outputs"])):
            rel = [golden_file(n, kind, k) for k in range(len(specs))]
            missing = [r for r in rel if r not in manifest["files"]]
            if missing:
                raise ArtifactError(
                    f"{show(directory / missing[0])}: golden file missing from the manifest's file list"
                )
            tensors.append(
                [
                    _read_tensor(private / r, directory / r, spec, dims, caps, config)
                    for r, spec in zip(rel, specs)
                ]
            )
        if "total" in dims and dims["total"] != dims.get("past", 0) + dims["seq"]:
            raise ArtifactError(
                f"{show(directory / golden_file(n, 'input', 0))}: a cache of {dims.get('past', 0)} and "
                f"{dims['seq']} new tokens under a mask of {dims['total']}"
            )
        tokens += dims.get("batch", 1) * max(dims.get(d, 1) for d in ("seq", "kv_seq", "total"))
        if tokens > GOLDEN_TOKENS:
            raise ArtifactError(
                f"{show(directory / golden_file(n, 'input', 0))}: the golden sets hold more than "
                f"{GOLDEN_TOKENS} positions (batch x sequence) in all"
            )
        sets.append(tuple(tensors))
    return sets


STAGES = {
    "manifest": "read manifest",
    "files": "sha256 of files (read once; private copies and leased links)",
    "weights": "load weights (memory-mapped)",
    "golden": "load golden data",
    "graph": "onnx.load + structural contract",
    "checker": "onnx.checker (full, sandboxed)",
}


def load_artifact(
    directory,
    rebuild: bool = True,
    memory: int | None = None,
    seconds: float | None = None,
    background: bool = False,
    budget: int | None = None,
    runtimes: int = 1,
    tokens: int = 256,
) -> Artifact:
    """Verify and load an artifact; raises ArtifactError naming the first problem. With `rebuild` (and
    torch and the manifest's exporter versions here) the graph must be the exporter's rebuild, byte for
    byte; otherwise, or with rebuild=False, the structural contract judges it. `memory` and `seconds`
    override the sandbox limits sized from the model. With `background`, the rebuild runs in a child
    process while the caller goes on (computing the oracle): Artifact.verify_graph() waits for it, and
    model_path does too, so no runtime opens an unproven graph. With a `budget` (bytes), the stages are
    planned to fit it (budget.py: `runtimes` sessions, the oracle on `tokens` positions): the rebuild may
    start only when verify_graph is called, or not at all (the structural contract instead)."""
    directory = Path(directory)
    with stage(STAGES["manifest"]):
        manifest = read_manifest(directory)
        check_listed_sizes(directory, manifest)
        check_tree(directory, manifest)
    scratch = ScratchDir("qkv-validate-")  # removed even if this process is killed
    pending = intake = None
    try:
        private = Path(scratch.name) / "artifact"
        private.mkdir(mode=0o700)
        with stage(STAGES["files"]):
            intake = Intake(directory, manifest, private)
        model_bytes = sum(e["bytes"] for r, e in manifest["files"].items() if r.startswith(MODEL))
        limits = Limits.for_model(model_bytes, memory, seconds)
        why = rebuild_problem(manifest) if rebuild else "disabled (--no-rebuild or --no-torch)"
        stitched = why is None and budget is not None and rebuild_stitched(manifest)
        planned = plan(needs(manifest, tokens, stitched), budget, runtimes, why is None)
        if why is None and planned.rebuild == "skip":
            why = f"not run within the memory budget of {gib(budget)} (--max-memory)"
        if why is None:  # started first: the exporter runs in its child while the rest is read
            pending = PendingRebuild(
                directory,
                private,
                manifest,
                Path(scratch.name) / "rebuild",
                model_bytes,
                start=planned.rebuild == "beside",
            )
        screened = None
        if WEIGHTS not in manifest["files"]:  # the weights are the graph's initializers: screened first
            with stage(STAGES["graph"]):
                _, screened = screen_graph(directory, private, manifest)
        with stage(STAGES["weights"]):
            weights = load_weights(private, directory, manifest)
        with stage(STAGES["golden"]):
            golden = load_golden(private, directory, manifest)
        if pending is not None:
            if screened is None:
                with stage(STAGES["graph"]):
                    _, screened = screen_graph(directory, private, manifest)
            foreign = screened
            graph_check = "graph: byte-identical to the exporter's rebuild from the manifest and the weights"
        else:
            foreign = check_structural(directory, private, manifest, weights, limits)
            graph_check = structural_check(why, unchecked(manifest))
        check_genai_config(private, directory, manifest)  # last: what else is wrong is said first
    except BaseException as e:
        if pending is not None:
            pending.cancel()
        try:
            if intake is not None and isinstance(e, ArtifactError):
                intake.check_unchanged()  # a file opened for writing meanwhile is the cause
        finally:
            if intake is not None:
                intake.close()
            scratch.cleanup()
        raise
    artifact = Artifact(
        directory,
        manifest,
        weights,
        golden,
        foreign,
        private,
        graph_check,
        limits,
        scratch,
        intake,
        pending,
        planned,
    )
    if not background:
        try:
            artifact.verify_graph()
        except BaseException:
            artifact.close()
            raise
    return artifact


def screen_graph(
    directory: Path, private: Path, manifest: dict, weights: bool = False
) -> tuple[onnx.ModelProto, tuple]:
    """The graph (no external data loaded) after the refusals every mode makes before a runtime sees it: no
    op an export never writes, external data inside the artifact, the manifest's inputs and outputs. Returns
    it (without `weights`, its initializers without their bytes) and its foreign ops ('domain::Op')."""
    shown = directory / MODEL
    model = read_model(private / MODEL, shown, weights)
    check_external_data(directory, model, manifest, private)
    try:
        check_vocabulary(model, STANDARD_DOMAINS + BACKENDS[manifest["backend"]].domains)
    except ContractError as e:
        raise ArtifactError(f"{show(shown)}: not what the exporter writes: {e}") from None
    check_graph(shown, model, manifest)
    foreign = {f"{n.domain}::{n.op_type}" for n in all_nodes(model) if n.domain not in STANDARD_DOMAINS}
    return model, tuple(sorted(foreign))


def check_structural(directory: Path, private: Path, manifest: dict, weights: dict, limits: Limits) -> tuple:
    """The graph screened, held to the exporter's structural contract, then onnx.checker in a sandbox;
    returns the foreign ops ('domain::Op')."""
    shown = directory / MODEL
    with stage(STAGES["graph"]):
        model, foreign = screen_graph(directory, private, manifest, weights=True)
        if model.graph.initializer and any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
        ):
            try:
                onnx.external_data_helper.load_external_data_for_model(model, str(private))
            except Exception as e:  # onnx raises several types for unreadable external data
                raise ArtifactError(f"{show(shown)}: external data unreadable ({first_line(e)})") from None
        try:
            check_structure(model, manifest, weights)
        except ContractError as e:
            raise ArtifactError(f"{show(shown)}: not what the exporter writes: {e}") from None
        del model  # the checker reads its own copy: never two of bert-large's 1.3 GB graph at once
    with stage(STAGES["checker"]):
        check_model_sandboxed(private / MODEL, shown, limits)
    return foreign
