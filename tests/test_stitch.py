"""A deep model's graph is stitched from its two-layer export (export/stitch.py): the tests hold it to the
bytes of the whole export in canonical form, on weights that make the exporter's value-dependent rewrites
fire (all-zero biases merged or dropped, as a transformers checkpoint's random init has them), and check
the pieces: the canonical names, the streamed model file, the fallback to the whole export."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from helpers import rotation
from onnx import helper, numpy_helper

from qkv_onnx.export import graph as export_graph
from qkv_onnx.export.canonical import canonicalize, modules
from qkv_onnx.export.model_file import encode, write_model
from qkv_onnx.export.stitch import StitchError, shift
from qkv_onnx.model_defs.config import EncoderConfig
from qkv_onnx.model_defs.registry import bert_spec, get_model

SMALL = EncoderConfig(
    num_layers=3, hidden_size=64, num_heads=2, ffn_size=128, vocab_size=100, max_positions=64
)
BASE_VOCAB = 300  # tests/test_decoder_families.py's
OPSET = {"onnx-attention": 23, "ort-contrib": 18, "decomposed": 18}


def weights(kind: str):
    """How a test's weights differ from seeded random ones: 'random'; 'transformers' (every bias 0 and every
    norm weight 1, as a random-init checkpoint has them: the exporter merges equal small initializers);
    'some zeros' (a few biases of the stitched layers and the pooler's 0: a Gemm bias dropped, merges that
    cross layers)."""

    def edit(module):
        with torch.no_grad():
            for name, p in module.state_dict().items():
                if kind == "transformers" and name.endswith("bias"):
                    p.zero_()
                if kind == "transformers" and "norm" in name and name.endswith("weight"):
                    p.fill_(1)
                if kind == "some zeros" and name in (
                    "blocks.2.attn.q_proj.bias",
                    "blocks.2.ffn.fc2.bias",
                    "blocks.1.attn_norm.bias",
                    "pooler.bias",
                ):
                    p.zero_()
        return module

    return edit


def both_ways(cfg: EncoderConfig, backend: str, dtype: str, edit) -> tuple[bytes, bytes]:
    """(whole export, what export_model writes) of the BERT of `cfg`, in canonical form."""
    spec = bert_spec("bert", cfg)
    module = edit(spec.random(0).eval().to(getattr(torch, dtype)))
    graph, data, _ = export_graph.build_graph(spec, module, backend, dtype, OPSET[backend])
    whole = export_graph._export(spec, module, backend, dtype, OPSET[backend])
    canonicalize(whole, dict(module.state_dict()))
    return encode(whole, {}), encode(graph, data)


# The default run keeps every backend, every kind of weights and a two-layer model; -m matrix the rest (and
# MATRIX below, every combination).
IN_MATRIX = {"marks": pytest.mark.matrix}
CASES = [
    pytest.param("onnx-attention", "float32", SMALL, "random", **IN_MATRIX),  # the template test's first
    pytest.param("onnx-attention", "float32", replace(SMALL, num_layers=5), "some zeros", **IN_MATRIX),
    ("onnx-attention", "bfloat16", replace(SMALL, pre_layer_norm=True), "transformers"),
    ("ort-contrib", "float32", SMALL, "some zeros"),
    pytest.param(
        "ort-contrib",
        "float32",
        replace(SMALL, pre_layer_norm=True, num_layers=4),
        "transformers",
        **IN_MATRIX,
    ),
    pytest.param("ort-contrib", "float16", replace(SMALL, with_pooler=False), "random", **IN_MATRIX),
    ("decomposed", "float32", replace(SMALL, pre_layer_norm=True), "some zeros"),
    # two layers: the template's own shape, its probe weights replaced (bert-tiny, the families' checkpoints)
    pytest.param("onnx-attention", "float32", replace(SMALL, num_layers=2), "some zeros", **IN_MATRIX),
    ("ort-contrib", "float16", replace(SMALL, num_layers=2), "transformers"),
    pytest.param(
        "decomposed", "float32", replace(SMALL, num_layers=2, pre_layer_norm=True), "random", **IN_MATRIX
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "dtype", "cfg", "kind"), CASES, ids=lambda v: str(v)[:40])
def test_stitched_graph_is_the_whole_export(backend, dtype, cfg, kind):
    whole, stitched = both_ways(cfg, backend, dtype, weights(kind))
    assert stitched == whole


MATRIX = [
    (backend, dtype, replace(SMALL, pre_layer_norm=pre, with_pooler=pool), kind)
    for backend in OPSET
    for dtype in ("float32", "float16", "bfloat16")
    for pre in (False, True)
    for pool in (True, False)
    for kind in ("random", "transformers", "some zeros")
]


@pytest.mark.matrix
@pytest.mark.parametrize(("backend", "dtype", "cfg", "kind"), MATRIX, ids=lambda v: str(v)[:60])
def test_stitched_graph_is_the_whole_export_everywhere(backend, dtype, cfg, kind):
    whole, stitched = both_ways(cfg, backend, dtype, weights(kind))
    assert stitched == whole


@pytest.mark.matrix
def test_bert_base_stitched_is_the_whole_export():
    whole, stitched = both_ways(
        EncoderConfig(num_layers=12, hidden_size=768, num_heads=12, ffn_size=3072),
        "onnx-attention",
        "float32",
        weights("random"),
    )
    assert stitched == whole


def decoder_both_ways(
    family: str, layers: int, backend: str, dtype: str, tmp_path, **more
) -> tuple[bytes, bytes]:
    """(whole export, what export_model writes) of `family`'s transformers checkpoint (tests/
    test_decoder_families.py's config, norms and biases off their 1 and 0 but for the 'plain' families'
    norms, all 1 there: equal small initializers the exporter merges) at `layers` layers."""
    import transformers as t
    from helpers import trained_vectors
    from test_decoder_families import BASE, FAMILIES

    from qkv_onnx.artifact_format import BACKENDS
    from qkv_onnx.decoder_format import DECODER
    from qkv_onnx.model_defs.decoder_checkpoint import load_decoder_model
    from qkv_onnx.model_defs.registry import spec_for

    t.logging.set_verbosity_error()
    name, kwargs, _ = FAMILIES[family]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("layer_types", "max_window_layers")} | more
    torch.manual_seed(3)
    hf = t.AutoModelForCausalLM.from_config(
        getattr(t, name)(**{**BASE, "num_hidden_layers": layers}, **kwargs)
    )
    if family != "llama":
        trained_vectors(hf, 4)
    hf.save_pretrained(tmp_path)
    cfg, module = load_decoder_model(tmp_path)
    spec = spec_for(family, DECODER, cfg)
    module = module.to(getattr(torch, dtype))
    opset = BACKENDS[backend].for_architecture(DECODER).default_opset
    graph, data, _ = export_graph.build_graph(spec, module, backend, dtype, opset)
    whole = export_graph._export(spec, module, backend, dtype, opset)
    canonicalize(whole, dict(module.state_dict()))
    return encode(whole, {}), encode(graph, data)


DECODER_CELLS = [
    ("llama", "onnx-attention", "float32"),
    ("qwen2", "decomposed", "float32"),
    ("gemma2", "onnx-attention", "float16"),  # its cap and sandwich norms
    ("qwen3", "ort-contrib", "float32"),  # not stitched (GroupQueryAttention's graph): exported whole
    *(
        pytest.param(f, b, "float32", marks=pytest.mark.matrix)
        for f in ("mistral", "phi3", "gemma", "gemma3_text", "olmo2", "granite", "smollm3")
        for b in ("onnx-attention", "decomposed")
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "backend", "dtype"), DECODER_CELLS)
def test_a_stitched_decoder_is_the_whole_export(family, backend, dtype, tmp_path, monkeypatch):
    """A decoder of four alike layers is stitched from its two-layer export (its cache's inputs and outputs
    repeated per layer): the whole export's bytes. Layers unlike each other (gemma2, gemma3, smollm3) and
    ort-contrib's graphs are exported whole."""
    stitched_ones = []

    resized = []

    def spy(*args):
        resized.append(args[-1])
        stitched_ones.append(real(*args))
        return stitched_ones[-1]

    real = export_graph.stitch
    monkeypatch.setattr(export_graph, "stitch", spy)
    more = {"head_dim": 40} if family == "llama" else {}  # RoPE's table of 20 frequencies: a large constant
    whole, stitched = decoder_both_ways(family, 4, backend, dtype, tmp_path, **more)
    assert stitched == whole
    unlike = ("gemma2", "gemma3_text", "smollm3")  # alternating windows; smollm3: RoPE off every 4th layer
    assert bool(stitched_ones) == (backend != "ort-contrib" and family not in unlike)
    if stitched_ones:  # from a template of a small vocabulary, its shapes resized
        [(small, vocab)] = resized[0].items()
        assert vocab == BASE_VOCAB and small < vocab


def reweighted_spec(model: str):
    return bert_spec("bert", replace(SMALL, num_layers=1)) if model == "bert-1-layer" else get_model(model)


def generic_weights(kind: str):
    """weights(kind) for any module: 'some zeros' zeroes its first and its last bias."""
    if kind != "some zeros":
        return weights(kind)

    def edit(module):
        biases = [p for k, p in module.state_dict().items() if k.endswith("bias")]
        with torch.no_grad():
            biases[0].zero_()
            biases[-1].zero_()
        return module

    return edit


# The default run keeps the first three (one of each architecture; between them every backend, kind and
# dtype), -m matrix every cell of every model.
REWEIGHTED_MODELS = [
    *("mha", "encoder-block", "bert-1-layer"),
    *("mha-causal", "mha-cross", "mha-gqa", "encoder-block-prenorm"),
]
DTYPES = ("float32", "float16", "bfloat16")
REWEIGHTED_CELLS = [
    cell if cell.values[0] in REWEIGHTED_MODELS[:3] else pytest.param(*cell.values, marks=pytest.mark.matrix)
    for cell in rotation(REWEIGHTED_MODELS, list(OPSET), ["transformers", "some zeros", "random"])
]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "backend", "kind"), REWEIGHTED_CELLS)
def test_reweighted_graph_is_the_whole_export(model, backend, kind, monkeypatch):
    """Attention, encoder blocks and one-layer BERTs are built from the export of the model itself with probe
    weights, its weights replaced: the whole export's bytes, value-dependent rewrites included."""
    monkeypatch.setattr(export_graph, "_templates", {})
    dtype = DTYPES[REWEIGHTED_MODELS.index(model) % len(DTYPES)]
    spec = reweighted_spec(model)
    module = generic_weights(kind)(spec.random(0).eval().to(getattr(torch, dtype)))
    graph, data, _ = export_graph.build_graph(spec, module, backend, dtype, OPSET[backend])
    assert data, "built from the template"  # the whole export keeps its bytes in the graph: no data
    whole = export_graph._export(spec, module, backend, dtype, OPSET[backend])
    canonicalize(whole, dict(module.state_dict()))
    assert encode(graph, data) == encode(whole, {})


@pytest.mark.slow
def test_weights_the_stitching_cannot_place_fall_back_to_the_whole_export(monkeypatch):
    """A parameter equal to a weight the exporter derived (the pooler's matrix, used as is, and a transposed
    projection, all zero and small enough to merge): where the exporter puts the derived one in its order is
    not known to the stitcher, so it raises StitchError and the model is exported whole."""
    calls = []
    real = export_graph.stitch

    def watched(*args):
        try:
            return real(*args)
        except StitchError as e:
            calls.append(str(e))
            raise

    monkeypatch.setattr(export_graph, "stitch", watched)
    cfg = EncoderConfig(
        num_layers=3, hidden_size=16, num_heads=2, ffn_size=32, vocab_size=50, max_positions=32
    )

    def zero_projections(module):
        with torch.no_grad():
            for k in range(3):
                module.blocks[k].attn.q_proj.weight.zero_()
            module.pooler.weight.zero_()
        return module

    whole, written = both_ways(cfg, "onnx-attention", "float32", zero_projections)
    assert calls and "equal" in calls[0]
    assert written == whole


@pytest.mark.slow
def test_canonical_names_say_where_a_node_comes_from():
    spec = bert_spec("bert", SMALL)
    graph, _, _ = export_graph.build_graph(spec, spec.random(0).eval(), "onnx-attention", "float32", 23)
    names = [n.name for n in graph.graph.node]
    assert "blocks.2.attn/Attention" in names and "blocks.0.attn.q_proj/MatMul" in names
    assert len(set(names)) == len(names)
    for node in graph.graph.node:
        assert node.name.split("/")[0] == (modules(node) or ["model"])[-1]
        assert [p.key for p in node.metadata_props] == ["pkg.torch.onnx.name_scopes"]
    assert not graph.graph.metadata_props
    params = set(spec.random(0).state_dict())
    for t in graph.graph.initializer:
        assert t.name in params or "/input_" in t.name


def test_shift_moves_only_the_layer_index():
    assert shift("blocks.1.attn.q_proj/MatMul", 3) == "blocks.4.attn.q_proj/MatMul"
    assert shift("blocks.1", 2) == "blocks.3"
    assert shift("blocks.12.ffn.fc1.bias", -2) == "blocks.10.ffn.fc1.bias"
    assert shift("embeddings.word.weight", 5) == "embeddings.word.weight"
    assert shift("blocks.1x/Add", 1) == "blocks.1x/Add"


def _small_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.arange(3, dtype=np.float16), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="m/MatMul"),
            helper.make_node("Add", ["y", "b"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["batch", 3])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_the_streamed_model_file_is_protobufs_own_encoding(tmp_path):
    model = _small_model()
    expected = model.SerializeToString()
    assert encode(model, {}) == expected
    data = {"w": torch.from_numpy(numpy_helper.to_array(model.graph.initializer[0]).copy())}
    model.graph.initializer[0].ClearField("raw_data")
    assert encode(model, data) == expected
    written = write_model(model, data, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == expected
    assert written["m.onnx"]["bytes"] == len(expected)


def test_external_data_goes_to_the_side_file_and_loads_back(tmp_path):
    model = _small_model()
    rng = np.random.default_rng(1)
    big = rng.standard_normal((64, 8)).astype(np.float32)  # 2 KiB: over the side-file threshold
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(big, "w"))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 64
    model.graph.node[0].input[1] = "w"
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 8
    del model.graph.node[1:]
    model.graph.node[0].output[0] = "z"
    written = write_model(model, {}, tmp_path / "m.onnx", external_data=True)
    assert set(written) == {"m.onnx", "m.onnx.data"} and written["m.onnx.data"]["bytes"] == big.nbytes
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), big)


@pytest.mark.slow
def test_stitching_leaves_the_shared_template_as_it_was(monkeypatch):
    """A process exports each two-layer template once and stitches every model of that shape from it: a
    stitch whose value-dependent rewrites fire (merges, a dropped Gemm bias) must not change it, or the next
    model of that shape would get the last one's rewrites (seen: 'some zeros' after 'transformers')."""
    monkeypatch.setattr(export_graph, "_templates", {})
    before = None
    for kind in ("random", "transformers", "some zeros"):
        whole, stitched = both_ways(SMALL, "onnx-attention", "float32", weights(kind))
        assert stitched == whole, kind
        [(template, _)] = export_graph._templates.values()
        before = before or template.SerializeToString()
        assert template.SerializeToString() == before, kind
