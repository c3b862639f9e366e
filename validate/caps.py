"""What an artifact may cost to validate, sized from its manifest's own model before any file is read.

The manifest's config implies the exact size of weights.npz (closed form, see
`artifact_format.weight_totals`), and through it bounds everything else: the graph cannot be much larger
than the parameters it holds, golden data is a few small batches no longer than the model's positions,
tokenizer files are small. A listed size outside its bound is refused from the manifest alone, so a
100 KB artifact cannot claim a model (or golden data) that takes gigabytes to check, and a large one costs
what its parameters cost.
"""

import math

from ..artifact_format import (
    ARCHITECTURES,
    MANIFEST,
    MODEL,
    TOKENIZER_DIR,
    WEIGHTS,
    file_role,
    golden_file,
    io_dtype,
    max_sequence,
    model_layers,
    np_dtype,
    stored_weight_dtype,
    weight_totals,
)
from ..errors import ArtifactError, show
from ..genai import GENAI_CONFIG, GENAI_TOKENIZER_FILES

MAX_GOLDEN_BATCH = 8  # export writes batches of 1-3 and one of 6 sentences
GOLDEN_TOKENS = 1024  # batch x sequence, summed over the golden sets (export writes ~150)
DEFAULT_MAX_SEQ = 512  # sequence cap of architectures without position embeddings
NPZ_MEMBER_BYTES = 1024  # zip local and central headers plus the .npy header, per member, at most
NPZ_END_BYTES = 22  # the zip's end-of-central-directory record
GRAPH_BYTES = 1 << 20  # model.onnx beyond its initializers: nodes, names, shapes, small constants
GRAPH_BYTES_PER_LAYER = 64 << 10
TENSOR_FILE_BYTES = 4096  # a golden TensorProto's name, dims and framing
GENAI_CONFIG_BYTES = 16 << 10  # what qkv_onnx/genai.py writes: about 1.5 KB
TOKENIZER_BYTES = 32 << 20  # all tokenizer files together (bert-base-uncased's tokenizer.json: 0.7 MB)
PROTO_BYTES_PER_ELEMENT = 10  # the largest encoding of one element in a TensorProto (an int64 varint)


def max_seq(manifest: dict) -> int:
    """Longest sequence (and key sequence, cache) golden data may have: the position table of a BERT or a
    decoder, else 512."""
    cfg, architecture = manifest["model"]["config"], manifest["model"]["architecture"]
    return max_sequence(cfg) if ARCHITECTURES[architecture].layered else DEFAULT_MAX_SEQ


def weights_bytes(manifest: dict) -> tuple[int, int]:
    """(least, most) bytes weights.npz can have for the manifest's config: the parameters' bytes, plus at
    most NPZ_MEMBER_BYTES of headers per tensor."""
    tensors, elements = weight_totals(manifest["model"]["architecture"], manifest["model"]["config"])
    data = elements * np_dtype(stored_weight_dtype(manifest["dtype"])).itemsize
    return data, data + tensors * NPZ_MEMBER_BYTES + NPZ_END_BYTES


def graph_bytes(manifest: dict) -> int:
    """Most bytes model.onnx (and its external data together) can have: the parameters in the artifact's
    dtype (int8: at most every product kept in float32 by the search) and the graph around them."""
    _, elements = weight_totals(manifest["model"]["architecture"], manifest["model"]["config"])
    layers = model_layers(manifest["model"]["architecture"], manifest["model"]["config"])
    itemsize = np_dtype(io_dtype(manifest["dtype"])).itemsize
    return elements * itemsize + GRAPH_BYTES + layers * GRAPH_BYTES_PER_LAYER


def _per_token(spec: dict) -> int:
    """Elements of one tensor per (batch x sequence) position: the product of its fixed dims."""
    return math.prod(d for d in spec["shape"] if isinstance(d, int))


def golden_bytes(manifest: dict) -> int:
    """Most bytes all golden files together can have: GOLDEN_TOKENS positions of every input and output."""
    specs = manifest["inputs"] + manifest["outputs"]
    files = manifest["golden_sets"] * len(specs)
    return (
        GOLDEN_TOKENS * PROTO_BYTES_PER_ELEMENT * sum(_per_token(s) for s in specs)
        + files * TENSOR_FILE_BYTES
    )


def _outside(rel: str) -> bool:
    parts = rel.split("/")
    return rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts)


def check_listed_sizes(directory, manifest: dict) -> None:
    """Every listed file is one an export writes, and its listed size is within what the manifest's own
    model allows. Runs on the manifest alone, before any other file is opened."""
    files = manifest["files"]
    where = directory / MANIFEST
    golden = {
        golden_file(n, kind, k)
        for n in range(manifest["golden_sets"])
        for kind in ("input", "output")
        for k in range(len(manifest["inputs" if kind == "input" else "outputs"]))
    }
    for rel in sorted(files):
        if _outside(rel):
            raise ArtifactError(f"{show(directory / rel)}: listed file lies outside the artifact directory")
        role = file_role(rel)
        if role == "unknown" or (role == "golden" and rel not in golden):
            raise ArtifactError(f"{show(where)}: lists {rel!r}, which is not a file an artifact holds")
        if role == "external-data" and rel != MODEL + ".data":
            raise ArtifactError(
                f"{show(where)}: lists {rel!r}; external data is kept in {MODEL + '.data'!r} only"
            )
        if role == "tokenizer" and rel.count("/") != 1 and rel not in GENAI_TOKENIZER_FILES:
            raise ArtifactError(
                f"{show(where)}: lists {rel!r}; tokenizer files lie directly in {TOKENIZER_DIR}/"
            )
    least, most = weights_bytes(manifest)
    size = files[WEIGHTS]["bytes"] if WEIGHTS in files else None
    if size is not None and not least <= size <= most:
        tensors, elements = weight_totals(manifest["model"]["architecture"], manifest["model"]["config"])
        raise ArtifactError(
            f"{show(where)}: weights.npz is {size} bytes, but the config implies {tensors} tensors of "
            f"{elements} parameters ({least}..{most} bytes as {stored_weight_dtype(manifest['dtype'])})"
        )
    checks = [
        ("model.onnx and its external data", [MODEL, MODEL + ".data"], graph_bytes(manifest)),
        ("the golden data", sorted(golden), golden_bytes(manifest)),
        ("the tokenizer files", [r for r in files if file_role(r) == "tokenizer"], TOKENIZER_BYTES),
        ("genai_config.json", [GENAI_CONFIG], GENAI_CONFIG_BYTES),
    ]
    for what, rels, most in checks:
        total = sum(files[r]["bytes"] for r in rels if r in files)
        if total > most:
            raise ArtifactError(
                f"{show(where)}: {what} are listed at {total} bytes, more than this model allows ({most}: "
                f"{manifest['model']['architecture']} with its config, {manifest['dtype']})"
            )
    if any(files[r]["bytes"] < 0 for r in files):
        raise ArtifactError(f"{show(where)}: a negative file size")
