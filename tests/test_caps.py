"""The caps that bound what validation costs, before anything is parsed: closed-form sizes, the strict
npz reader, golden dims, strict JSON. Unit tests and hypothesis fuzz; no export needed (fast)."""

import io
import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from qkv_onnx.artifact_format import (
    FAMILY_DEFAULTS,
    FORMAT,
    JsonProblem,
    expected_weights,
    model_io,
    strict_json,
    weight_totals,
)
from qkv_onnx.errors import ArtifactError
from qkv_onnx.export.writer import save_weights_npz
from qkv_onnx.npz import read_weights
from qkv_onnx.validate.artifact import _read_tensor
from qkv_onnx.validate.caps import check_listed_sizes, golden_bytes, graph_bytes, weights_bytes

FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
MHA = {
    "num_layers": 1,
    "hidden_size": 64,
    "num_heads": 4,
    "num_kv_heads": None,
    "ffn_size": 256,
    "vocab_size": 30522,
    "max_positions": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pre_layer_norm": False,
    "with_pooler": True,
    **FAMILY_DEFAULTS,
}


def _manifest(cfg=MHA, architecture="attention", options=None, dtype="float32", golden_sets=0) -> dict:
    options = (
        {"causal": False, "cross": False}
        if options is None and architecture == "attention"
        else options or {}
    )
    inputs, outputs = model_io(architecture, cfg, options, dtype)
    least, _ = weights_bytes({"model": {"architecture": architecture, "config": cfg}, "dtype": dtype})
    return {
        "format": FORMAT,
        "model": {"name": "m", "architecture": architecture, "config": cfg, "options": options},
        "backend": "onnx-attention",
        "dtype": dtype,
        "opset": {"ai.onnx": 23},
        "inputs": inputs,
        "outputs": outputs,
        "files": {
            "model.onnx": {"sha256": "0" * 64, "bytes": least + 10_000},
            "weights.npz": {"sha256": "0" * 64, "bytes": least + 2_000},
        },
        "golden_sets": golden_sets,
    }


# --- closed forms -----------------------------------------------------------------------------------

CONFIGS = st.fixed_dictionaries(
    {
        "num_layers": st.integers(1, 6),
        "num_heads": st.sampled_from([1, 2, 4]),
        "head_dim": st.integers(1, 8),
        "kv": st.sampled_from([None, 1, 2]),
        "ffn_size": st.integers(1, 64),
        "vocab_size": st.integers(1, 100),
        "max_positions": st.integers(1, 64),
        "type_vocab_size": st.integers(0, 3),
        "pre_layer_norm": st.booleans(),
        "with_pooler": st.booleans(),
        "embedding_size": st.sampled_from([None, 1, 5]),
        "relative_attention_buckets": st.sampled_from([0, 2, 32]),
    }
)


def _config(c: dict) -> dict:
    kv = c["kv"] if c["kv"] is not None and c["num_heads"] % c["kv"] == 0 else None
    return {
        **MHA,
        **{k: v for k, v in c.items() if k not in ("head_dim", "kv")},
        "hidden_size": c["num_heads"] * c["head_dim"],
        "num_kv_heads": kv,
    }


@settings(max_examples=200, **FUZZ)
@given(c=CONFIGS, architecture=st.sampled_from(["attention", "encoder-block", "bert"]))
def test_closed_form_totals_are_the_enumerated_weights(c, architecture):
    """weight_totals (what caps size weights.npz by, before anything is enumerated) is exactly the count
    and size of expected_weights (what the npz reader then requires)."""
    cfg = _config(c)
    expected = expected_weights(architecture, cfg)
    assert weight_totals(architecture, cfg) == (
        len(expected),
        sum(int(np.prod(s)) for s in expected.values()),
    )


def test_a_manifest_claiming_a_huge_model_costs_nothing(tmp_path):
    """10^12 layers, or a vocabulary of 10^15: refused from the listed size alone, in constant time and
    memory (nothing enumerated)."""
    for change in ({"num_layers": 10**12}, {"hidden_size": 4 * 10**9, "num_heads": 4}, {"ffn_size": 10**15}):
        m = _manifest(architecture="bert")  # the listed sizes of bert with the small config
        m["model"]["config"] = {**MHA, **change}
        m["inputs"], m["outputs"] = model_io("bert", m["model"]["config"], {}, "float32")
        tracemalloc.start()
        with pytest.raises(ArtifactError, match="weights.npz is"):
            check_listed_sizes(tmp_path, m)
        assert tracemalloc.get_traced_memory()[1] < 4 << 20
        tracemalloc.stop()


@settings(max_examples=300, **FUZZ)
@given(
    field=st.sampled_from(
        ["num_layers", "hidden_size", "ffn_size", "vocab_size", "max_positions", "num_heads"]
    ),
    value=st.integers(1, 2**62),
    rel=st.sampled_from(["weights.npz", "model.onnx", "model.onnx.data", "tokenizer/vocab.txt"]),
    size=st.integers(0, 2**62),
    architecture=st.sampled_from(["attention", "encoder-block", "bert"]),
)
def test_fuzz_listed_sizes(field, value, rel, size, architecture, tmp_path_factory):
    """Any config number and any listed size: check_listed_sizes accepts or raises ArtifactError, never
    anything else, and never allocates for what the manifest claims."""
    m = _manifest(architecture=architecture)
    m["model"]["config"] = {**m["model"]["config"], field: value}
    m["files"][rel] = {"sha256": "0" * 64, "bytes": size}
    tracemalloc.start()
    try:
        check_listed_sizes(tmp_path_factory.getbasetemp(), m)
    except ArtifactError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 4 << 20  # a few MB of bookkeeping, nothing sized by the claim


def test_honest_sizes_pass_and_bounds_grow_with_the_model(tmp_path):
    check_listed_sizes(tmp_path, _manifest())
    small = _manifest()
    big = _manifest({**MHA, "hidden_size": 128})
    assert graph_bytes(big) > graph_bytes(small) and golden_bytes(big) > golden_bytes(small)


# --- the npz reader -----------------------------------------------------------------------------------


def _npz(tmp_path: Path) -> tuple[Path, dict]:
    expected = expected_weights("attention", MHA)
    rng = np.random.default_rng(0)
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in expected.items()}
    path = tmp_path / "weights.npz"
    save_weights_npz(path, arrays)
    return path, arrays


def test_npz_reader_reads_what_the_exporter_writes(tmp_path):
    """...as read-only memory maps of the file: the page cache holds a model's weights, not the heap."""
    path, arrays = _npz(tmp_path)
    got = read_weights(path, path, expected_weights("attention", MHA), np.dtype("float32"))
    assert got.keys() == arrays.keys() and all(np.array_equal(got[k], arrays[k]) for k in arrays)
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in got.values())


def test_npz_members_sharing_bytes_are_refused(tmp_path):
    """A directory entry pointed at another member's local header: one tensor's bytes read as two."""
    path, _ = _npz(tmp_path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        first = z.infolist()[0]
    entries = [i for i in range(len(data)) if data[i : i + 4] == b"PK\x01\x02"]
    data[entries[1] + 42 : entries[1] + 46] = first.header_offset.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        read_weights(path, path, expected_weights("attention", MHA), np.dtype("float32"))


@settings(max_examples=300, **FUZZ)
@given(
    edits=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 2**31),
    tail=st.binary(max_size=64),
)
def test_fuzz_npz_bytes(edits, cut, tail, tmp_path_factory):
    """Bytes of weights.npz changed anywhere (sizes, names, flags, headers, data), truncated or extended:
    the reader returns exactly the expected tensors or raises ArtifactError, and never holds more than
    about the file in memory (no member is inflated or allocated from a header's claim)."""
    base = tmp_path_factory.getbasetemp() / "npz-base"
    if not base.exists():
        base.mkdir()
        _npz(base)
    data = bytearray((base / "weights.npz").read_bytes())
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    data += tail
    path = tmp_path_factory.getbasetemp() / "npz-fuzz.npz"
    path.write_bytes(bytes(data))
    expected = expected_weights("attention", MHA)
    tracemalloc.start()
    try:
        got = read_weights(path, path, expected, np.dtype("float32"))
        assert {k: v.shape for k, v in got.items()} == expected
    except ArtifactError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 4 * len(data) + (1 << 20)


def test_npz_directory_of_a_million_entries_is_refused_unparsed(tmp_path):
    """An end record that claims 10^6 members: refused from the 22-byte record, no entry parsed."""
    path, _ = _npz(tmp_path)
    data = bytearray(path.read_bytes())
    data[-12:-10] = (0xFFFE).to_bytes(2, "little")  # entries on this disk
    data[-10:-8] = (0xFFFE).to_bytes(2, "little")  # entries in all
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="65534 members"):
        read_weights(path, path, expected_weights("attention", MHA), np.dtype("float32"))


def test_npz_member_with_a_pickle_is_refused_before_its_data(tmp_path):
    path, arrays = _npz(tmp_path)
    members = {}
    with zipfile.ZipFile(path) as z:
        for i in z.infolist():
            members[i.filename] = z.read(i)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([object()] * 2, dtype=object), allow_pickle=True)
    members["attn.q_proj.bias.npy"] = buf.getvalue()
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    with pytest.raises(ArtifactError):
        read_weights(path, path, expected_weights("attention", MHA), np.dtype("float32"))


# --- golden dims -----------------------------------------------------------------------------------


@settings(max_examples=200, **FUZZ)
@given(dims=st.lists(st.integers(0, 2**40), min_size=0, max_size=4), fill=st.integers(0, 64))
def test_fuzz_golden_dims(dims, fill, tmp_path_factory):
    """A golden tensor declaring any dims over a few bytes of data: refused from its dims (batch at most 8,
    sequence at most the model's positions) before any array is made, or read as it is."""
    tensor = onnx.TensorProto(name="hidden_states", data_type=onnx.TensorProto.FLOAT, dims=dims)
    tensor.raw_data = bytes(4 * fill)
    path = tmp_path_factory.getbasetemp() / "golden.pb"
    path.write_bytes(tensor.SerializeToString())
    spec = {"name": "hidden_states", "dtype": "float32", "shape": ["batch", "seq", 64], "role": "hidden"}
    tracemalloc.start()
    try:
        array = _read_tensor(path, path, spec, {}, {"batch": 8, "seq": 512, "kv_seq": 512}, MHA)
        assert array.shape == tuple(dims)
    except ArtifactError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1 << 20


def test_golden_reader_refuses_a_huge_declared_shape_before_allocating(tmp_path):
    tensor = numpy_helper.from_array(np.zeros((1, 4, 64), np.float32), "hidden_states")
    tensor.dims[:] = [1, 6000, 64]
    path = tmp_path / "g.pb"
    path.write_bytes(tensor.SerializeToString())
    spec = {"name": "hidden_states", "dtype": "float32", "shape": ["batch", "seq", 64], "role": "hidden"}
    with pytest.raises(ArtifactError, match=r"dims \[1, 6000, 64\] exceed"):
        _read_tensor(path, path, spec, {}, {"batch": 8, "seq": 512, "kv_seq": 512}, MHA)


# --- strict JSON -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": -Infinity}', "-Infinity is not a JSON number"),
        ('{"a": ' + "9" * 5000 + "}", "digits"),
        ('{"a": "\\ud800"}', "lone surrogate"),
        ('{"\\udfff": 1}', "lone surrogate"),
        ("\xff", "not UTF-8"),
    ],
)
def test_strict_json_refuses(text, reason):
    raw = text.encode("utf-8", "surrogateescape") if text != "\xff" else b"\xff"
    with pytest.raises(JsonProblem, match=reason):
        strict_json(raw)


def test_strict_json_reads_a_manifest():
    assert strict_json(json.dumps({"a": [1, 2.5, "x", None, True]}).encode()) == {
        "a": [1, 2.5, "x", None, True]
    }
