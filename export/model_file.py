"""model.onnx written straight from the weights: the protobuf encoding of a ModelProto whose initializers keep
their bytes outside it (`data`: name -> a contiguous tensor), streamed to the file and hashed on the way.

Serializing a 440 MB ModelProto builds the whole message in memory first, and on these machines fresh
memory costs about a second per 400 MB: more than the stitching itself. The encoding here is protobuf's own
(fields in field-number order, as `SerializeToString` writes them; the tests compare the two byte for byte),
with each initializer's raw_data taken from the tensor's memory.
"""

import hashlib
import os

import onnx
import torch

_RAW_DATA = 9  # TensorProto.raw_data
_INITIALIZER = 5  # GraphProto.initializer
_GRAPH = 7  # ModelProto.graph
EXTERNAL_MIN_BYTES = 1024  # with external data, initializers of at least this many bytes go to the side file


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited field."""
    return _varint(number << 3 | 2) + _varint(length)


def _split(message, number: int) -> tuple[bytes, bytes]:
    """The encoding of `message`'s fields before and after field `number` (which is left out)."""
    before, after = type(message)(), type(message)()
    for field, value in message.ListFields():
        if field.number == number:
            continue
        target = before if field.number < number else after
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
    return before.SerializeToString(), after.SerializeToString()


class Lazy:
    """An initializer's bytes made only when they are written (`make()` -> a contiguous tensor): what a
    stitched model's weights are, so that one of them at a time is ever in memory."""

    def __init__(self, size: int, make):
        self.size, self.make = size, make

    def __len__(self) -> int:
        return self.size

    def view(self) -> memoryview:
        view = tensor_view(self.make())
        if len(view) != self.size:
            raise ValueError(f"an initializer of {self.size} bytes was made with {len(view)}")
        return view


def tensor_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, without a copy."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def _pieces(model: onnx.ModelProto, data: dict, side: list | None) -> list:
    """The model's encoding as a list of bytes-like pieces; with `side` (external data), the tensors of at
    least EXTERNAL_MIN_BYTES go to that list instead, referenced from the model."""
    location = None if side is None else side[0]
    offset = 0
    tensors = []
    for t in model.graph.initializer:
        raw = data.get(t.name)
        size = len(raw) if raw is not None else len(t.raw_data)
        if side is not None and size >= EXTERNAL_MIN_BYTES:
            header = onnx.TensorProto()
            header.CopyFrom(t)
            header.ClearField("raw_data")
            header.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(size))):
                header.external_data.add(key=key, value=value)
            side.append(raw if raw is not None else t.raw_data)
            offset += size
            tensors.append([header.SerializeToString()])
        elif raw is None:
            tensors.append([t.SerializeToString()])
        else:
            head, tail = _split(t, _RAW_DATA)
            tensors.append([head, _field(_RAW_DATA, size), raw, tail])
    graph_head, graph_tail = _split(model.graph, _INITIALIZER)
    body = [graph_head]
    for pieces in tensors:
        body += [_field(_INITIALIZER, sum(len(p) for p in pieces)), *pieces]
    body.append(graph_tail)
    model_head, model_tail = _split(model, _GRAPH)
    return [model_head, _field(_GRAPH, sum(len(p) for p in body)), *body, model_tail]


def write_model(
    model: onnx.ModelProto, data: dict, path, external_data: bool = False, keep_data: bool = True
) -> dict:
    """Write `model` (initializers named in `data` take their bytes from there) at `path`, with external data
    in `<path>.data` (without `keep_data`: only hashed, never stored: a rebuild that compares); returns the
    file-table entries {name: {sha256, bytes}} of what it wrote."""
    data = {k: tensor_view(v) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    side = [path.name + ".data"] if external_data else None
    written = {path.name: _stream(path, _pieces(model, data, side))}
    if side is not None:
        written[side[0]] = _stream(path.with_name(side[0]) if keep_data else None, side[1:])
    return written


def encode(model: onnx.ModelProto, data: dict) -> bytes:
    """The bytes write_model writes (no external data), in memory: for tests and small graphs."""
    data = {k: tensor_view(v) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    return b"".join(bytes(p.view() if isinstance(p, Lazy) else p) for p in _pieces(model, data, None))


def _stream(path, pieces) -> dict:
    h, n = hashlib.sha256(), 0
    with open(path or os.devnull, "wb") as f:
        for p in pieces:
            p = p.view() if isinstance(p, Lazy) else p
            h.update(p)
            if path is not None:
                f.write(p)
            n += len(p)
    return {"sha256": h.hexdigest(), "bytes": n}
