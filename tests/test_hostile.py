"""Hostile artifacts (issue 15): built from fresh exports and re-signed as an attacker would, each validated
by the CLI in a subprocess under an address-space cap and a timeout. Refused with exit 2 and one line
naming the file (exit 1 where parity is the right verdict), in both graph modes where the graph is the
weapon (rebuild: torch and the manifest's exporter versions here; structural: --no-torch), and nothing
in the artifact changes."""

import json
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import (
    DoublingRuntime,
    edit_manifest,
    edit_model,
    rehash,
    rewrite,
    rotation,
    run_capped,
    sampled,
    single_error_line,
    snapshot,
    weights_of,
)
from onnx import TensorProto, helper, numpy_helper

from qkv_onnx.errors import LimitExceeded, show
from qkv_onnx.validate.sandbox import GIB, Limits, SandboxedRuntime

MODES = {"rebuild": [], "structural": ["--no-torch"]}


def refused(d: Path, rel: str, *args, reason: str = "", mode_args=("--no-torch",)):
    """Validate `d` in a capped subprocess; assert exit 2, one stderr line naming `d / rel` (with `reason`),
    and no change in the artifact. Returns the line."""
    before = snapshot(d)
    proc = run_capped(d, "--providers", "cpu", *mode_args, *args)
    line = single_error_line(proc.stderr)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert f"qkv-validate: error: {show(d / rel)}: " in line, line
    assert reason in line, line
    assert snapshot(d) == before
    return line


def wrap_output(model: onnx.ModelProto, build, output: int = 0) -> None:
    """Insert nodes between the graph's output `output` and the node that makes it: build(inner, out)
    returns (nodes, initializers) computing `out` from `inner`."""
    out = model.graph.output[output].name
    inner = out + "_inner"
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = inner
    nodes, inits = build(inner, out)
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)


def const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


# --- graph attacks: cost without bound ------------------------------------------------------------


def doubling_functions(model, depth=30):
    """f_i calls f_{i-1} twice: expanding f_29 means 2^29 nodes (onnx.checker's full check does)."""
    domain = "evil.functions"
    for i in range(depth):
        if i == 0:
            nodes = [helper.make_node("Identity", ["x"], ["y"])]
        else:
            nodes = [
                helper.make_node(f"f{i - 1}", ["x"], ["a"], domain=domain),
                helper.make_node(f"f{i - 1}", ["x"], ["b"], domain=domain),
                helper.make_node("Add", ["a", "b"], ["y"]),
            ]
        imports = [helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)]
        model.functions.append(helper.make_function(domain, f"f{i}", ["x"], ["y"], nodes, imports))
    model.opset_import.append(helper.make_opsetid(domain, 1))
    wrap_output(model, lambda i, o: ([helper.make_node(f"f{depth - 1}", [i], [o], domain=domain)], []))


def endless_loop(model):
    """A Loop with a trip count of 10^12 around the output."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["x_in"], ["x_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None),
        ],
    )
    wrap_output(
        model,
        lambda i, o: (
            [helper.make_node("Loop", ["trips", "go", i], [o], body=body)],
            [const("trips", 10**12, np.int64), const("go", True, np.bool_)],
        ),
    )


def nested_ifs(model, depth=30):
    """If nested 30 deep around the output, each level's then-branch holding the next level (a linear
    graph; OpenVINO's compile time doubles per level)."""

    def leaf(name, inner):
        return helper.make_graph(
            [helper.make_node("Identity", [inner], [name])],
            name,
            [],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)],
        )

    def build(i, o):
        graph = leaf("deepest", i)
        for level in range(depth - 1, 0, -1):
            out = f"if_{level}"
            node = helper.make_node(
                "If", ["go"], [out], then_branch=graph, else_branch=leaf(f"else_{level}", i)
            )
            graph = helper.make_graph(
                [node], f"g{level}", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
            )
        node = helper.make_node("If", ["go"], [o], then_branch=graph, else_branch=leaf("else_0", i))
        return [node], [const("go", True, np.bool_)]

    wrap_output(model, build)


def gigabyte_constant(model):
    """ConstantOfShape of 2^28 floats (1 GiB), reduced and added times 0."""

    def build(i, o):
        nodes = [
            helper.make_node("ConstantOfShape", ["big_shape"], ["big"], value=const("one", [1.0])),
            helper.make_node("ReduceSum", ["big"], ["big_sum"], keepdims=0),
            helper.make_node("Mul", ["big_sum", "zero"], ["nothing"]),
            helper.make_node("Add", [i, "nothing"], [o]),
        ]
        return nodes, [const("big_shape", [1 << 28], np.int64), const("zero", 0.0)]

    wrap_output(model, build)


# --- graph attacks: backdoors sampled inputs never trigger (bert-tiny) ------------------------------


def _trigger_adds_five(trigger_nodes, trigger_inits):
    def build(i, o):
        nodes = trigger_nodes + [
            helper.make_node("Cast", ["hit"], ["hit_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["hit_f", "five"], ["bump"]),
            helper.make_node("Add", [i, "bump"], [o]),
        ]
        return nodes, trigger_inits + [const("five", 5.0)]

    return lambda model: wrap_output(model, build)


BACKDOORS = {
    "token 101 ([CLS]) present": _trigger_adds_five(
        [
            helper.make_node("Equal", ["input_ids", "cls_id"], ["is_cls"]),
            helper.make_node("Cast", ["is_cls"], ["is_cls_i"], to=TensorProto.INT64),
            helper.make_node("ReduceMax", ["is_cls_i"], ["any_cls"], keepdims=0),
            helper.make_node("Cast", ["any_cls"], ["hit"], to=TensorProto.BOOL),
        ],
        [const("cls_id", 101, np.int64)],
    ),
    "sequence longer than 128": _trigger_adds_five(
        [
            helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
            helper.make_node("Gather", ["ids_shape", "one_i"], ["seq_len"]),
            helper.make_node("Greater", ["seq_len", "limit"], ["hit"]),
        ],
        [const("one_i", 1, np.int64), const("limit", 128, np.int64)],
    ),
    "padding on the left": _trigger_adds_five(
        [
            helper.make_node("Gather", ["attention_mask", "zero_i"], ["first"], axis=1),
            helper.make_node("ReduceMin", ["first"], ["first_min"], keepdims=0),
            helper.make_node("Less", ["first_min", "one_i"], ["hit"]),
        ],
        [const("zero_i", 0, np.int64), const("one_i", 1, np.int64)],
    ),
    "batch larger than 3": _trigger_adds_five(
        [
            helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
            helper.make_node("Gather", ["ids_shape", "zero_i"], ["batch"]),
            helper.make_node("Greater", ["batch", "three"], ["hit"]),
        ],
        [const("zero_i", 0, np.int64), const("three", 3, np.int64)],
    ),
}
GRAPH_ATTACKS = {
    "local function expanding 2^29 times": ("mha", doubling_functions),
    "Loop of 10^12 iterations": ("mha", endless_loop),
    "If nested 30 deep": ("mha", nested_ifs),
    "ConstantOfShape of 1 GiB": ("mha", gigabyte_constant),
    **{f"backdoor: {k}": ("bert-tiny", v) for k, v in BACKDOORS.items()},
}


@pytest.mark.parametrize(("attack", "mode"), rotation(list(GRAPH_ATTACKS), list(MODES)))
def test_graph_attack_refused(attack, mode, artifact_copy):
    """A graph the exporter never writes, re-signed: refused (structural: the vocabulary or the op counts,
    before onnx.checker or any runtime sees it; rebuild: the vocabulary screen before any runtime sees it,
    or else the bytes are not the rebuild's, and nothing the runtimes computed meanwhile is reported)."""
    model, build = GRAPH_ATTACKS[attack]
    d = artifact_copy(model)
    edit_model(d, build)
    line = refused(d, "model.onnx", mode_args=MODES[mode])
    screened = "not what the exporter writes" in line
    assert screened if mode == "structural" else (screened or "not the graph the exporter writes" in line)


def test_backdoors_really_fire(artifact_copy):
    """The backdoored graphs are real: on ONNX Runtime each adds 5 when triggered and nothing otherwise."""
    import onnxruntime as ort

    from qkv_onnx.inputs import make_inputs

    d = artifact_copy("bert-tiny")
    manifest = json.loads((d / "manifest.json").read_text())
    honest = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    triggers = {
        "token 101 ([CLS]) present": (2, 8, [8, 8], lambda x: x[0].__setitem__((0, 0), 101)),
        "sequence longer than 128": (1, 130, [130], None),
        "padding on the left": (2, 8, [8, 8], lambda x: x[2].__setitem__((1, slice(0, 3)), 0)),
        "batch larger than 3": (4, 8, [8] * 4, None),
    }
    for name, build in BACKDOORS.items():
        model = onnx.load(str(d / "model.onnx"))
        build(model)
        evil = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        batch, seq, lengths, poke = triggers[name]
        for fire in (False, True):
            b, s, n = (batch, seq, lengths) if fire else (2, 8, [8, 8])
            x = make_inputs(
                manifest["inputs"], manifest["model"]["config"], b, s, n, np.random.default_rng(1)
            )
            x[0][x[0] == 101] = 102
            if fire and poke:
                poke(x)
            feed = {i["name"]: v for i, v in zip(manifest["inputs"], x)}
            shift = evil.run(None, feed)[0] - honest.run(None, feed)[0]
            assert np.allclose(shift, 5.0 if fire else 0.0), (name, fire)


@pytest.mark.parametrize("mode", MODES)
def test_decomposed_graph_relabelled_as_fused_is_refused(mode, artifact_copy, exported):
    """bert-tiny's decomposed graph (same weights) in an onnx-attention artifact, re-signed."""
    d = artifact_copy("bert-tiny")

    def relabel(model):  # its opset import says 23, as the manifest's backend needs
        model.CopyFrom(onnx.load(str(exported("bert-tiny", backend="decomposed") / "model.onnx")))
        model.opset_import[0].version = 23

    edit_model(d, relabel)
    line = refused(d, "model.onnx", mode_args=MODES[mode])
    if mode == "structural":
        assert "op counts are not what the exporter writes" in line and "Attention 0 (expected 2)" in line, (
            line
        )


def _external_in(where):
    def edit(model):
        tensor = numpy_helper.from_array(np.zeros(4, np.float32), "hidden")
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="../../../etc/passwd")
        tensor.external_data.add(key="length", value="16")
        if where == "training_info":
            info = model.training_info.add()
            info.initialization.CopyFrom(helper.make_graph([], "init", [], [], [tensor]))
        else:
            fn = helper.make_function(
                "evil", "f", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])], []
            )
            fn.attribute_proto.append(helper.make_attribute("w", tensor))
            model.functions.append(fn)

    return edit


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["training_info", "a function attribute default"])
def test_external_data_hidden_in_unusual_places_is_refused(where, mode, artifact_copy):
    d = artifact_copy("mha")
    edit_model(d, _external_in(where))
    line = refused(d, "model.onnx", mode_args=MODES[mode])
    if mode == "structural":
        assert "keeps its data in '../../../etc/passwd', not a file name inside" in line


# --- the config as a lever on the tolerance --------------------------------------------------------


def _re_export(d: Path, spec, weights: dict, dtype="float32") -> None:
    """The exporter's own graph for `spec` holding `weights` (so a rebuild matches it), written into `d`,
    the manifest's config, the weights' places and the file table re-signed."""
    import torch

    from qkv_onnx.export.graph import export_model

    module = spec.build()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    graph = export_model(spec, module.eval(), "onnx-attention", dtype, 23, False, d / "model.onnx")

    def edit(m):
        m["model"]["config"] = spec.config.to_dict()
        m["weights"]["in_graph"] = graph.params

    edit_manifest(d, edit)
    rehash(d, "model.onnx")


# a refusal by the weights' screen, the same in both modes: the default run keeps the cheaper structural one
@pytest.mark.parametrize("mode", sampled(MODES, "structural"))
def test_ffn_zero_padded_to_widen_the_tolerance_is_refused(mode, artifact_copy):
    """Every FFN zero-padded to 51200 with ffn_size to match and the exporter's own graph for it: the
    function is unchanged and everything is consistent, but K (and the float32 tolerance) would grow 10x."""
    from dataclasses import replace

    from qkv_onnx.model_defs.registry import MODELS

    d = artifact_copy("encoder-block")
    w = weights_of(d)
    f = 51200
    w["block.ffn.fc1.weight"] = np.pad(w["block.ffn.fc1.weight"], ((0, f - 512), (0, 0)))
    w["block.ffn.fc1.bias"] = np.pad(w["block.ffn.fc1.bias"], (0, f - 512))
    w["block.ffn.fc2.weight"] = np.pad(w["block.ffn.fc2.weight"], ((0, 0), (0, f - 512)))
    spec = MODELS["encoder-block"]
    _re_export(d, replace(spec, config=replace(spec.config, ffn_size=f)), w)
    refused(
        d, "model.onnx", reason="block.ffn.fc1.weight has an all-zero row (row 512", mode_args=MODES[mode]
    )


@pytest.mark.parametrize("mode", sampled(MODES, "structural"))  # as the FFN's: the weights' screen
def test_extra_layer_that_adds_nothing_is_refused(mode, artifact_copy):
    """num_layers as a lever: a third layer whose attention and FFN add exactly 0, the exporter's graph for
    three layers, config to match: S (and the tolerance) would grow from 6 to 8 sublayers."""
    from dataclasses import replace

    from qkv_onnx.model_defs.registry import MODELS

    d = artifact_copy("bert-tiny")
    w = weights_of(d)
    for k in [k for k in w if k.startswith("blocks.1.")]:
        w["blocks.2." + k[len("blocks.1.") :]] = w[k].copy()
    for k in ("blocks.2.attn.out_proj.weight", "blocks.2.attn.out_proj.bias", "blocks.2.ffn.fc2.weight"):
        w[k] = np.zeros_like(w[k])
    spec = MODELS["bert-tiny"]
    _re_export(d, replace(spec, config=replace(spec.config, num_layers=3)), w)
    refused(
        d, "model.onnx", reason="blocks.2.attn.out_proj.weight has an all-zero row", mode_args=MODES[mode]
    )


# --- sizes: bounded before anything is parsed ------------------------------------------------------


def fixed_long_input(d: Path) -> None:
    def edit(model):
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3000

    edit_model(d, edit)
    edit_manifest(d, lambda m: m["inputs"][0]["shape"].__setitem__(1, 3000))


def long_golden(d: Path) -> None:
    """Golden set 0 of sequence 6000, consistent across its inputs and outputs."""
    rng = np.random.default_rng(0)
    for rel, array in (
        ("test_data_set_0/input_0.pb", rng.standard_normal((1, 6000, 64)).astype(np.float32)),
        ("test_data_set_0/input_1.pb", np.ones((1, 6000), np.int64)),
        ("test_data_set_0/output_0.pb", rng.standard_normal((1, 6000, 64)).astype(np.float32)),
    ):
        name = onnx.load_tensor(str(d / rel)).name
        rewrite(d, rel, numpy_helper.from_array(array, name).SerializeToString())


def _zip_members(d: Path) -> dict:
    with zipfile.ZipFile(d / "weights.npz") as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def _write_zip(d: Path, members: list, compress=()) -> None:
    with zipfile.ZipFile(d / "weights.npz", "w") as z:
        for name, data in members:
            kind = zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED
            z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data, compress_type=kind)
    rehash(d, "weights.npz")


def zip_bomb(d: Path) -> None:
    """An extra member of 2 GiB of zeros that deflates to 2 MB."""
    members = _zip_members(d)
    path = d / "weights.npz"
    info = zipfile.ZipInfo("extra.npy", (1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "a") as z, z.open(info, "w", force_zip64=True) as f:
        chunk = bytes(1 << 24)
        for _ in range(128):
            f.write(chunk)
    assert len(members) == 8
    rehash(d, "weights.npz")


def _small_extra(d):
    members = list(_zip_members(d).items())
    _write_zip(d, members[:-1] + [("notes.txt", b"hi"), members[-1]])


def _duplicate(d):
    """attn.k_proj.weight twice, in place of attn.out_proj.weight (same shape): every size still fits."""
    members = _zip_members(d)
    members["attn.out_proj.weight.npy"] = None
    order = [
        (k, v) if v is not None else ("attn.k_proj.weight.npy", members["attn.k_proj.weight.npy"])
        for k, v in sorted(members.items())
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it is asked to write
        _write_zip(d, order)


def _not_npy(d):
    members = list(_zip_members(d).items())
    name, data = members[0]
    _write_zip(d, [(name, b"\x00" * len(data)), *members[1:]])


def _compressed(d):
    members = list(_zip_members(d).items())
    _write_zip(d, members, compress={members[0][0]})


def _other_dtype_same_size(d):
    """attn.q_proj.bias as float64 of half the length: the same bytes, so only the .npy header tells."""
    import io

    members = _zip_members(d)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(32, np.float64))
    members["attn.q_proj.bias.npy"] = buf.getvalue()
    _write_zip(d, sorted(members.items()))


CAPS = {
    "input with a fixed sequence of 3000": (fixed_long_input, "manifest.json", "are not those of"),
    "golden set of sequence 6000": (long_golden, "manifest.json", "the golden data are listed at"),
    "weights.npz: 2 GiB member deflating to nothing": (zip_bomb, "manifest.json", "weights.npz is"),
    "weights.npz: an extra member": (_small_extra, "weights.npz", "9 members"),
    "weights.npz: a member twice": (_duplicate, "weights.npz", "appears twice"),
    "weights.npz: a member that is not .npy": (_not_npy, "weights.npz", "is not a .npy array"),
    "weights.npz: a compressed member": (
        _compressed,
        "weights.npz",
        "is compressed; an export stores members",
    ),
    "weights.npz: a member of another dtype, same size": (
        _other_dtype_same_size,
        "weights.npz",
        "attn.q_proj.bias is float64[32], the config implies float32[64]",
    ),
}


@pytest.mark.parametrize("attack", CAPS)
def test_cost_attack_refused_before_it_costs(attack, artifact_copy):
    """Refused from sizes and headers, before the costly part is read, decompressed or run (the subprocess
    runs under a 6 GiB address-space cap; the attacks need 4-6 GB where they are not refused)."""
    tamper, rel, reason = CAPS[attack]
    d = artifact_copy("mha", "int8" if attack.startswith("weights.npz") else "float32")  # int8 keeps one
    tamper(d)
    refused(d, rel, reason=reason)


def test_no_torch_refuses_extra_npz_keys_too(artifact_copy):
    """Extra keys in weights.npz used to pass with --no-torch: the key set is exact in every mode."""
    d = artifact_copy("mha", "int8")
    _small_extra(d)
    refused(d, "weights.npz", reason="members", mode_args=())


# --- content that used to raise a traceback (exit 1, the other artifacts unreported) ---------------


def huge_integer(d: Path) -> None:
    text = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(text.replace('"seed": 0', '"seed": ' + "9" * 5000))


def lone_surrogate(d: Path) -> None:
    edit_manifest(d, lambda m: m["model"].__setitem__("name", "bert\ud800"))


def nan_literal(d: Path) -> None:
    edit_manifest(d, lambda m: m["model"]["config"].__setitem__("layer_norm_eps", float("nan")))


def golden_ids(index: int, value: int):
    def tamper(d: Path) -> None:
        rel = f"test_data_set_0/input_{index}.pb"
        tensor = onnx.load_tensor(str(d / rel))
        array = numpy_helper.to_array(tensor).copy()
        array[0, 0] = value
        rewrite(d, rel, numpy_helper.from_array(array, tensor.name).SerializeToString())

    return tamper


CONTENT = {
    "a 5000-digit integer in the manifest": (huge_integer, "manifest.json", "not valid JSON"),
    "a model name with a lone surrogate": (lone_surrogate, "manifest.json", "lone surrogate"),
    "a NaN literal in the manifest": (nan_literal, "manifest.json", "NaN is not a JSON number"),
    "a negative token id in a golden set": (golden_ids(0, -1), "test_data_set_0/input_0.pb", "token_ids -1"),
    "a negative segment id in a golden set": (
        golden_ids(1, -3),
        "test_data_set_0/input_1.pb",
        "segment_ids -3",
    ),
    "a token id past the vocabulary": (
        golden_ids(0, 30522),
        "test_data_set_0/input_0.pb",
        "outside 0..30521",
    ),
}


@pytest.mark.parametrize("attack", CONTENT)
def test_content_that_used_to_raise_is_one_line(attack, artifact_copy, exported):
    """Exit 2 and one line; and another artifact of the same call is still validated and reported."""
    tamper, rel, reason = CONTENT[attack]
    d = artifact_copy("bert-tiny")
    tamper(d)
    good = exported("mha")
    before = snapshot(d)
    proc = run_capped(d, good, "--no-torch", "--providers", "cpu")
    line = single_error_line(proc.stderr)
    assert proc.returncode == 2 and f"{show(d / rel)}: " in line and reason in line, line
    assert "— PASS" in proc.stdout and "Artifacts: 1 pass, 0 fail, 0 not judged, 1 invalid." in proc.stdout
    assert snapshot(d) == before


VOCAB = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\n"
PANIC_LOAD = {"normalizer": {"type": "Precompiled", "precompiled_charsmap": "AAAA"}}
PANIC_ENCODE = {
    "post_processor": {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[NOPE]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [],
        "special_tokens": {},
    }
}


def _tokenizer_json(extra: dict) -> str:
    vocab = {t: i for i, t in enumerate(VOCAB.split())}
    model = {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "vocab": vocab}
    base = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None}
    return json.dumps(
        {
            **base,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": None,
            "decoder": None,
            "model": {**model, "max_input_chars_per_word": 100},
            **extra,
        }
    )


TOKENIZERS = {  # name: (files, the file the error names, words of the reason)
    "tokenizer_config.json is a list": (
        {"vocab.txt": VOCAB, "tokenizer_config.json": "[]"},
        "tokenizer/tokenizer_config.json",
        "not a JSON object",
    ),
    "tokenizer_config.json of the wrong type": (
        {"vocab.txt": VOCAB, "tokenizer_config.json": '{"do_lower_case": "yes"}'},
        "tokenizer/tokenizer_config.json",
        "do_lower_case is 'yes', not a bool",
    ),
    "tokenizer.json that panics on load": (
        {"tokenizer.json": _tokenizer_json(PANIC_LOAD)},
        "tokenizer/tokenizer.json",
        "tokenizers cannot load it",
    ),
    "tokenizer.json that panics on encoding": (
        {"tokenizer.json": _tokenizer_json(PANIC_ENCODE)},
        "tokenizer",
        "the tokenizer fails on these sentences",
    ),
}


@pytest.mark.parametrize("case", TOKENIZERS)
def test_hostile_tokenizer_is_one_line(case, artifact_copy):
    """--text with tokenizer files that are malformed or make the tokenizers library panic (a Rust panic,
    pyo3's PanicException, a BaseException, with a backtrace printed by the library): tokenized in the
    sandbox, whose stderr goes nowhere; exit 2 and one line naming the tokenizer."""
    files, rel, reason = TOKENIZERS[case]
    d = artifact_copy("bert-tiny")
    (d / "tokenizer").mkdir()
    for name, text in files.items():
        (d / "tokenizer" / name).write_text(text)
    for name in files:
        rehash(d, f"tokenizer/{name}")
    edit_manifest(
        d, lambda m: m.__setitem__("checkpoint", {"origin": "x", "sha256": {}, "tokenizer": "tokenizer"})
    )
    line = refused(d, rel, "--text", "hello world", reason=reason)
    assert "panicked" not in line


# --- time of check, time of use --------------------------------------------------------------------

SWAP_AFTER_HASHING = """
import os, shutil, subprocess, sys
from qkv_onnx.stages import listening
from qkv_onnx.validate import intake
from qkv_onnx.validate.artifact import STAGES
from qkv_onnx.validate.cli import main

artifact, evil, how = sys.argv[1], sys.argv[2], sys.argv[3]
model = artifact + "/model.onnx"
if how != "copied":
    intake.LINK_AT_LEAST = 0  # every file hard-linked under a read lease, as a large one is

def swap(event, name):
    if event != "exit" or name != STAGES["files"]:
        return
    if how != "copied":
        assert os.stat(model).st_nlink == 2, "not linked"
    if how == "renamed over":
        shutil.copyfile(evil, artifact + "/.new")
        os.replace(artifact + "/.new", model)
    elif how == "rewritten, same bytes":  # another process: this one answers the lease's break
        subprocess.run([sys.executable, "-c", f"f = open({model!r}, 'r+b'); f.write(f.read(1))"], check=True)
    else:
        shutil.copyfile(evil, model)  # written in place: a concurrent writer, right after the hashing

with listening(swap):
    sys.exit(main([artifact, *sys.argv[4:]]))
"""
SWAPS = {
    "copied": "copied",  # a small file, rewritten in place: the private copy is judged
    "linked": "renamed over",  # a large one: the link keeps the inode that was hashed
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("intake", SWAPS)
def test_model_swapped_after_hashing_is_never_used(intake, mode, artifact_copy, exported):
    """model.onnx is replaced by another network's graph right after it was hashed. Every later step reads
    the private directory's bytes (a copy, or a link to the inode that was hashed): the verdict is the hashed
    bytes' (PASS), never the swapped ones' (which would fail parity or the rebuild)."""
    d = artifact_copy("mha")
    evil = exported("mha-gqa") / "model.onnx"
    proc = run_capped(d, evil, SWAPS[intake], "--providers", "cpu", *MODES[mode], code=SWAP_AFTER_HASHING)
    assert proc.returncode == 0, proc.stderr
    assert "— PASS" in proc.stdout
    assert (d / "model.onnx").read_bytes() == evil.read_bytes()  # the swap did happen


@pytest.mark.parametrize("how", ["rewritten", "rewritten, same bytes"])
def test_a_linked_file_opened_for_writing_voids_the_verdict(how, artifact_copy, exported):
    """A large file is linked, not copied: a writer that opens it after the hashing (in place, even writing
    back the same bytes) breaks the read lease and the validation gives no verdict: exit 2, one line."""
    d = artifact_copy("mha")
    evil = exported("mha-gqa") / "model.onnx"
    proc = run_capped(d, evil, how, "--providers", "cpu", "--no-torch", code=SWAP_AFTER_HASHING)
    line = single_error_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert f"{show(d / 'model.onnx')}: opened for writing while it was being validated" in line, line
    assert "PASS" not in proc.stdout


# --- error lines and reports that the artifact cannot forge ----------------------------------------


def test_file_name_with_a_newline_stays_one_line(artifact_copy):
    d = artifact_copy("mha")
    (d / "x\nqkv-validate: error: forged second line").write_text("")
    line = refused(d, "x\nqkv-validate: error: forged second line", reason="not listed in the manifest")
    assert "\\n" in line


def test_empty_unlisted_directory_is_refused(artifact_copy):
    d = artifact_copy("mha")
    (d / "test_data_set_7").mkdir()
    refused(d, "test_data_set_7", reason="a directory that holds no file the manifest lists")


def test_markdown_injection_through_the_model_name_is_inert(artifact_copy):
    name = (
        "evil | cell <img src=x onerror=alert(1)> [click](http://evil.example) `code` *bold*\n## Forged: PASS"
    )
    d = artifact_copy("mha")
    edit_manifest(d, lambda m: m["model"].__setitem__("name", name))
    proc = run_capped(d, "--no-torch", "--providers", "cpu")
    assert proc.returncode == 0, proc.stderr
    for raw in (r"<img", r"\[click\]\(", r"`code`", r"\*bold\*", r"\| cell"):  # none left unescaped
        assert re.search(r"(?<!\\)" + raw, proc.stdout) is None, raw
    assert not any(line.startswith("## Forged") for line in proc.stdout.splitlines())
    assert "evil \\| cell \\<img src=x onerror=alert(1)\\> \\[click\\](http://evil.example)" in proc.stdout


# --- the two graph modes -----------------------------------------------------------------------------


def test_other_exporter_versions_fall_back_to_the_structural_contract(artifact_copy):
    """An honest artifact whose manifest records another torch: not rebuilt (its bytes could differ), held
    to the structural contract instead, and the report says why."""
    d = artifact_copy("mha")
    edit_manifest(d, lambda m: m["versions"].__setitem__("torch", "0.0.0"))
    proc = run_capped(d, "--providers", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "not rebuilt: exported with another exporter: torch 0.0.0 (here " in proc.stdout


@pytest.mark.real_rebuild
def test_rebuild_mode_proves_the_bytes(artifact_copy):
    d = artifact_copy("mha")
    proc = run_capped(d, "--providers", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "graph: byte-identical to the exporter's rebuild" in proc.stdout


@pytest.mark.real_rebuild
def test_a_stitched_model_is_rebuilt_in_the_sandbox_and_judged_past_128_tokens(exported, tmp_path):
    """bert-mini (four layers: its graph stitched from a two-layer export) rebuilt by the exporter in the
    rebuild's sandboxed child, not the session's cache, byte-identical; --long adds a batch at its full 512
    tokens (the default cases stop at 128), judged on ORT CPU against the oracle and PyTorch."""
    d = exported("bert-mini")
    proc = run_capped(d, "--providers", "cpu", "--long", "--json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert "graph: byte-identical to the exporter's rebuild" in proc.stdout
    checks = json.loads((tmp_path / "r.json").read_text())["artifacts"][0]["checks"]
    long = [c for c in checks if c["case"] == "b2xs512" and c["runtime"] == "cpu"]
    assert {c["reference"] for c in long} == {"oracle", "pytorch"} and all(c["passed"] for c in long)
    assert all(0 < c["max_abs"] <= c["atol"] for c in long)


# --- the sandbox itself --------------------------------------------------------------------------------


def _model(tmp_path: Path, nodes, inits, name="m.onnx") -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


@pytest.mark.slow
def test_sandbox_time_limit_ends_an_endless_run(tmp_path):
    """A run that would take forever (a Loop of 10^12) is ended at the time limit: LimitExceeded naming
    the file and the limit."""
    from qkv_onnx.validate.runtimes import RUNTIMES

    model = onnx.load(str(_model(tmp_path, [helper.make_node("Identity", ["x"], ["y"])], [])))
    endless_loop(model)
    path = tmp_path / "loop.onnx"
    onnx.save(model, str(path))
    # 6 s: ten times what opening this one-node graph takes here (the limit holds for the open too)
    runtime = SandboxedRuntime(RUNTIMES["cpu"], path, Limits(4 * GIB, 6.0), shown=tmp_path / "shown.onnx")
    runtime.wait_open()
    with pytest.raises(
        LimitExceeded, match=r"'.*shown.onnx': .*a run ran past the time limit of 6 s \(--time-limit\)"
    ):
        runtime.run([np.ones(1, np.float32)])


@pytest.mark.slow
def test_sandbox_memory_limit_stops_a_huge_allocation(tmp_path):
    """A 4 GiB constant under a 1.5 GiB cap: LimitExceeded naming the memory limit, the parent untouched."""
    from qkv_onnx.validate.runtimes import RUNTIMES

    model = onnx.load(str(_model(tmp_path, [helper.make_node("Identity", ["x"], ["y"])], [])))
    gigabyte_constant(model)
    model.graph.initializer[0].CopyFrom(const("big_shape", [1 << 30], np.int64))
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path))
    with pytest.raises(LimitExceeded, match="memory limit of 1.5 GiB"):
        runtime = SandboxedRuntime(RUNTIMES["cpu"], path, Limits(int(1.5 * GIB), 120.0))
        runtime.run([np.ones(1, np.float32)])


@pytest.mark.slow
def test_sandbox_hosts_any_adapter_class(tmp_path):
    """A plugin's adapter class (importable by module and name) runs in the sandbox with its interface."""
    path = _model(tmp_path, [helper.make_node("Identity", ["x"], ["y"])], [])
    runtime = SandboxedRuntime(DoublingRuntime, path, Limits(2 * GIB, 60.0))
    assert (runtime.name, runtime.label, runtime.gating) == ("doubling", "a doubling plugin", True)
    [y] = runtime.run([np.arange(3.0)])
    assert runtime.providers == ["doubling m.onnx"] and np.array_equal(y, [0.0, 2.0, 4.0])
    runtime.close()


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--memory-limit", "0.1", "memory limit of 0.1 GiB"),
        ("--time-limit", "0.001", "time limit of 0.001 s"),
    ],
)
def test_limit_flags_hit_is_exit_2_naming_the_file_and_limit(flag, value, words, exported):
    d = exported("mha")
    proc = run_capped(d, "--no-torch", "--providers", "cpu", flag, value)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and all(show(d / "model.onnx") in line and words in line for line in lines), proc.stderr


# --- a broken environment is not an invalid artifact ------------------------------------------------------


@pytest.mark.real_rebuild
def test_torch_that_cannot_be_imported_in_the_rebuild_child_is_not_an_invalid_artifact(
    artifact_copy, monkeypatch, capsys
):
    """torch installed (its metadata says so) but its import failing in the rebuild's child: one note naming
    the import error, the graph judged by the structural contract instead, exit 0 for an honest artifact;
    never "invalid" and never a memory limit."""
    from helpers import run_cli

    from qkv_onnx.validate import sandbox

    d = artifact_copy("bert-tiny")
    monkeypatch.setattr(
        sandbox, "_BOOTSTRAP", "import sys; sys.modules['torch'] = None; " + sandbox._BOOTSTRAP
    )
    code, out, err, _ = run_cli(capsys, d, "--providers", "cpu")
    assert code == 0, err
    assert "memory limit" not in out + err and "invalid" not in err
    assert (
        "not rebuilt: the exporter cannot run here (rebuilding it with the exporter: ModuleNotFoundError: "
        "import of torch halted" in out
    )


@pytest.mark.real_rebuild
def test_a_broken_torch_build_is_named_and_the_artifact_still_validates(artifact_copy, tmp_path):
    """A torch whose import fails everywhere (a missing shared library): the live PyTorch comparison says so
    and is skipped, the rebuild falls back to the structural contract, the honest artifact passes."""
    d = artifact_copy("bert-tiny")
    fake = tmp_path / "broken-site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ImportError('libtorch_cpu.so: cannot open shared object file: No such file or directory')\n"
    )
    proc = run_capped(d, "--providers", "cpu", env={"PYTHONPATH": str(fake.parent)})
    assert proc.returncode == 0, proc.stderr
    assert (
        "is installed but cannot be imported (ImportError: libtorch_cpu.so: cannot open shared" in proc.stdout
    )
    assert "not rebuilt: the exporter cannot run here" in proc.stdout and "memory limit" not in proc.stdout


@pytest.mark.real_rebuild
def test_a_real_memory_cap_on_the_rebuild_still_reads_as_one(artifact_copy, monkeypatch, capsys):
    """The rebuild's child under a cap too small to map torch's libraries: exit 2, the memory limit named."""
    from helpers import run_cli

    from qkv_onnx.validate import rebuild

    d = artifact_copy("bert-tiny")
    monkeypatch.setattr(rebuild, "rebuild_limits", lambda model_bytes: Limits(300 << 20, 120.0))
    code, _, err, _ = run_cli(capsys, d, "--providers", "cpu")
    assert code == 2, err
    assert "rebuilding it with the exporter ran past the memory limit of 0.293 GiB" in err
