"""A float artifact keeps its weights once: in the graph's initializers. The parameters are views of them
(memory-mapped from model.onnx.data, or on model.onnx's own bytes), placed by the manifest's map
`weights.in_graph` {parameter: place}, which export writes from what it knows of each initializer:

- ["as is", initializer], ["transposed", initializer] (a Linear weight in MatMul's layout);
- ["packed", initializer, start, stop]: rows start:stop of q, k and v concatenated (ORT's packed
  Attention; a weight's pack is stored transposed);
- ["zeros"]: an all-zero bias the exporter dropped; ["same as", parameter]: a small tensor the exporter
  merged into an equal one.

The map is a claim: every view is checked against the config's shape and the artifact's dtype here, and
validation then requires the graph to be the exporter's graph of exactly these parameters (the rebuild, or
the structural contract), so a map that places a parameter wrongly is a graph that is not the export of
its weights. Torch-free.
"""

import hashlib
import mmap
import os
from pathlib import Path

import numpy as np
import onnx

from .artifact_format import MODEL, QUANTIZED, WEIGHTS, expected_weights, np_dtype, stored_weight_dtype
from .errors import ArtifactError, first_line, show
from .npz import read_weights

PLACES = {"as is": 1, "transposed": 1, "packed": 3, "zeros": 0, "same as": 1}  # kind -> its arguments


def in_graph(dtype: str) -> bool:
    """Whether an artifact of `dtype` keeps its weights in the graph alone: a quantized one keeps its float32
    source weights in weights.npz (the graph holds int8 ones)."""
    return dtype not in QUANTIZED


def param_map(recipes: dict, shapes: dict, value) -> dict[str, list]:
    """{parameter: place} of every parameter of `shapes` (name -> shape, the state_dict's order) from
    `recipes` {initializer: (kind, parameters)}: kind 'param' (as is), 'transposed' or 'packed'. A parameter
    in no recipe must equal a placed one of its shape (merged) or be all zero (dropped): `value(name)` is its
    array, asked for only then. ValueError otherwise."""
    out = {}
    for init, (kind, parts) in recipes.items():
        if kind == "packed":
            start = 0
            for p in parts:
                stop = start + shapes[p][0]
                out[p] = ["packed", init, start, stop]
                start = stop
        elif kind in ("param", "transposed"):
            out[parts[0]] = ["as is" if kind == "param" else "transposed", init]
    placed = [p for p in shapes if p in out]
    for name, shape in shapes.items():
        if name in out:
            continue
        w = value(name)
        twin = next((p for p in placed if shapes[p] == shape and _equal(value(p), w)), None)
        if twin is not None:
            out[name] = ["same as", twin]
        elif not w.any():
            out[name] = ["zeros"]
        else:
            raise ValueError(f"parameter {name} is in no initializer of the graph")
    return {k: out[k] for k in shapes}


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and np.array_equal(a, b)


def read_graph_weights(directory: Path, shown: Path, manifest: dict) -> dict[str, np.ndarray]:
    """{parameter: read-only view} of every parameter the manifest's config implies, from the graph in
    `directory` (the private copy; errors name `shown`, the artifact's directory), as placed by the
    manifest's `weights.in_graph`. Raises ArtifactError for a map or a tensor that does not fit."""
    model = manifest["model"]
    expected = expected_weights(model["architecture"], model["config"])
    dtype = np_dtype(manifest["dtype"])
    places = manifest["weights"]["in_graph"]  # a dict: manifest_problem checked it
    where = f"{show(shown / 'manifest.json')}: weights.in_graph"
    if not isinstance(places, dict) or set(places) != set(expected):
        return _refuse(f"{where} must place exactly the {len(expected)} parameters the config implies")
    graph = _load(directory / MODEL, shown / MODEL)
    tensors = {}
    for t in graph.graph.initializer:
        if t.name in tensors:
            _refuse(f"{show(shown / MODEL)}: two initializers are named {t.name!r}")
        tensors[t.name] = t
    maps, bases, views = {}, {}, {}
    try:
        for name, place in places.items():
            if not _well_formed(place) or (place[0] == "same as" and place[1] not in places):
                _refuse(f"{where}: {name} has the place {place!r}")
            if place[0] in ("as is", "transposed", "packed"):
                if place[1] not in tensors:
                    _refuse(f"{where}: {name} is in initializer {place[1]!r}, which the graph does not have")
                if place[1] not in bases:
                    bases[place[1]] = _tensor(tensors[place[1]], dtype, directory, shown, maps)
                views[name] = _placed(bases[place[1]], place)
            elif place[0] == "zeros":
                views[name] = np.zeros(expected[name], dtype)
        for name, place in places.items():
            if place[0] == "same as":
                twin = places[place[1]]
                if twin[0] == "same as":
                    _refuse(f"{where}: {name} is the same as {place[1]}, which is itself placed elsewhere")
                views[name] = views[place[1]]
    finally:
        maps.clear()  # the views hold the map they need
    for name, shape in expected.items():
        v = views[name]
        if v is None or tuple(v.shape) != tuple(shape):
            got = f"{places[name][0]} it makes nothing" if v is None else f"gives {list(v.shape)}"
            _refuse(
                f"{show(shown / MODEL)}: holds no {name} ({dtype.name}{list(shape)} in the config) where "
                f"weights.in_graph places it ({places[name][:2]} {got})"
            )
        v.flags.writeable = False
    return {k: views[k] for k in expected}


def _refuse(message: str):
    raise ArtifactError(message)


def _well_formed(place) -> bool:
    if not isinstance(place, list) or not place or not isinstance(place[0], str) or place[0] not in PLACES:
        return False
    args = place[1:]
    if len(args) != PLACES[place[0]] or (args and not isinstance(args[0], str)):
        return False
    return all(type(a) is int and a >= 0 for a in args[1:])


def _placed(base: np.ndarray, place: list) -> np.ndarray | None:
    """The parameter `place` makes of its initializer `base`, or None when it cannot (wrong rank, range)."""
    kind = place[0]
    if kind == "as is":
        return base
    if kind == "transposed":
        return base.T if base.ndim == 2 else None
    start, stop = place[2:]
    rows = base.T if base.ndim == 2 else base
    return rows[start:stop] if base.ndim in (1, 2) and start < stop <= len(rows) else None


def _load(path: Path, shown: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf and onnx raise several types for a mangled file
        _refuse(f"{show(shown)}: not an ONNX model ({first_line(e)})")


def _tensor(t: onnx.TensorProto, dtype: np.dtype, directory: Path, shown: Path, maps: dict) -> np.ndarray:
    """Initializer `t` as a read-only array of `dtype` on its bytes: model.onnx's (raw_data) or a memory map
    of its external data, its offset and length checked against the file first."""
    where = f"{show(shown / MODEL)}: initializer {t.name!r}"
    if t.data_type != onnx.helper.np_dtype_to_tensor_dtype(dtype):  # ml_dtypes' bfloat16 included
        _refuse(f"{where} is not {dtype.name}")
    shape = tuple(t.dims)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if t.data_location != onnx.TensorProto.EXTERNAL and not t.external_data:
        if len(t.raw_data) != size:
            _refuse(f"{where} does not hold its {size} bytes as raw data")
        return np.frombuffer(t.raw_data, dtype).reshape(shape)
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    if location != MODEL + ".data":
        _refuse(f"{where} keeps its data in {location!r}, not {MODEL}.data")
    try:
        offset, length = int(info.get("offset", "0")), int(info["length"])
    except (KeyError, ValueError):
        _refuse(f"{where} keeps its data without a valid offset and length")
    if location not in maps:
        with open(directory / location, "rb") as f:
            empty = os.fstat(f.fileno()).st_size == 0
            maps[location] = b"" if empty else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = maps[location]
    if length != size or offset < 0 or offset + length > len(data):
        _refuse(
            f"{where} is at bytes {offset}..{offset + length} of a {len(data)}-byte file; it takes {size}"
        )
    if not size:
        return np.empty(shape, dtype)
    return np.frombuffer(data, dtype, size // dtype.itemsize, offset).reshape(shape)


def artifact_weights(directory: Path, shown: Path, manifest: dict) -> dict[str, np.ndarray]:
    """The parameters of the artifact in `directory` (a private copy; errors name `shown`): from the graph,
    or from weights.npz where the artifact keeps one (a quantized artifact's float32 source weights)."""
    if WEIGHTS not in manifest["files"]:
        return read_graph_weights(directory, shown, manifest)
    model = manifest["model"]
    expected = expected_weights(model["architecture"], model["config"])
    dtype = np_dtype(stored_weight_dtype(manifest["dtype"]))
    return read_weights(directory / WEIGHTS, shown / WEIGHTS, expected, dtype)


def weights_sha256(weights: dict) -> str:
    """One digest of the parameters (names, shapes, dtypes and bytes, in their order), however stored."""
    h = hashlib.sha256()
    for name, w in weights.items():
        h.update(f"{name} {w.dtype.name} {list(w.shape)}\n".encode())
        h.update(np.ascontiguousarray(w).view(np.uint8).data)
    return h.hexdigest()
