"""Module -> artifact: build, export, fusion check, golden data, manifest, atomic publish."""
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import torch

from model_defs.config import param_count
from model_defs.registry import (
    CHECKPOINT_MODELS,
    bert_spec,
    checkpoint_dir,
    count_attention_modules,
    example_inputs,
    get_model,
    init_random_weights,
)
from validate.artifact import graph_io, sha256_file

from .artifact import publish, save_test_data_set, save_weights_npz, temporary_dir_for, write_manifest
from .backends import BACKENDS, export_onnx
from .fusion import check_fusion

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROTOBUF_LIMIT = 2**31 - 1
# (batch, seq, real tokens per row): padded rows, a row that is all padding, a single token.
GOLDEN_CASES = [(2, 16, [16, 11]), (3, 7, [7, 3, 0]), (1, 1, [1])]
TOKENIZER_DIR = "tokenizer"  # a checkpoint's tokenizer files, for qkv-validate --text
TRACE_CASE = (2, 16, [16, 11])  # shapes torch.export traces with: not 0 or 1, so no dim specializes


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16 of its own: ml_dtypes' (what onnx uses) holds it."""
    return t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def _text_golden(tmp: Path, checkpoint_dir: Path, spec, module, n: int) -> int:
    """Copy the checkpoint's tokenizer into the artifact and write golden set `n` from real sentences
    (padded to a batch). Returns the number of sets written (0 without tokenizer files)."""
    from validate.text import SAMPLE_SENTENCES, TOKENIZER_FILES, tokenize

    files = [f for f in TOKENIZER_FILES if (checkpoint_dir / f).is_file()]
    if not files:
        return 0
    (tmp / TOKENIZER_DIR).mkdir()
    for f in files:
        shutil.copyfile(checkpoint_dir / f, tmp / TOKENIZER_DIR / f)
    feeds = tokenize(tmp / TOKENIZER_DIR, SAMPLE_SENTENCES, max_length=spec.config.max_positions)
    outputs = module(*(torch.from_numpy(feeds[i.name]) for i in spec.inputs))
    save_test_data_set(tmp / f"test_data_set_{n}", [i.name for i in spec.inputs], [feeds[i.name] for i in spec.inputs],
                       spec.outputs, [to_numpy(t) for t in outputs])
    return 1


def package_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _dynamic_shapes(spec):
    """One torch.export Dim per symbolic name; sequences of a BERT model are bounded by its positions."""
    dims = {}
    shapes = []
    for inp in spec.inputs:
        axes = {}
        for axis, d in enumerate(inp.shape):
            if isinstance(d, str):
                bounded = spec.architecture == "bert" and d != "batch"
                dims.setdefault(d, torch.export.Dim(d, min=1, max=spec.config.max_positions if bounded else None))
                axes[axis] = dims[d]
        shapes.append(axes)
    return tuple(shapes)


def _kv_seq(spec, seq):
    return seq + 3 if spec.options.get("cross") else seq


def source_model(model: str, weights_dir, seed: int) -> tuple:
    """(spec, float32 module, checkpoint description or None): a registry model with seeded random
    weights, or a BERT checkpoint (`weights_dir`, or a CHECKPOINT_MODELS name)."""
    if weights_dir is None and model not in CHECKPOINT_MODELS:
        spec = get_model(model)
        return spec, init_random_weights(spec.build(), seed), None
    from model_defs.checkpoint import load_hf_model

    directory = Path(weights_dir) if weights_dir is not None else checkpoint_dir(model)
    cfg, module = load_hf_model(directory)
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.suffix in (".json", ".safetensors")}
    origin = str(directory) if weights_dir is not None else CHECKPOINT_MODELS[model]
    return bert_spec(model, cfg), module, {"directory": directory, "origin": origin, "sha256": files}


def export_artifact(model: str, out: Path, backend: str = "onnx-attention", dtype: str = "float32",
                    seed: int = 0, opset: int | None = None, external_data: bool | None = None,
                    weights_dir: Path | None = None) -> dict:
    """Export `model` to the artifact directory `out`; returns the manifest. `model` is a registry name;
    with `weights_dir` (a Hugging Face BERT checkpoint) it is just the name the artifact gets."""
    spec, module, checkpoint = source_model(model, weights_dir, seed)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    opset = BACKENDS[backend].default_opset if opset is None else opset
    torch_dtype = DTYPES[dtype]
    module = module.eval().to(torch_dtype)
    weights = {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
               for k, v in module.state_dict().items()}  # .npy has no bfloat16: float32 holds it exactly
    n_bytes = sum(a.nbytes for a in weights.values())
    if external_data is None:
        external_data = n_bytes > PROTOBUF_LIMIT * 0.9

    def inputs_for(batch, seq, lengths, case_seed):
        return example_inputs(spec, batch, seq, lengths, case_seed, torch_dtype, kv_seq=_kv_seq(spec, seq))

    out = Path(out)
    tmp = temporary_dir_for(out)
    try:
        trace = inputs_for(*TRACE_CASE, seed)
        fusions = export_onnx(module, tuple(trace.values()), [i.name for i in spec.inputs], spec.outputs,
                              _dynamic_shapes(spec), tmp / "model.onnx", backend, opset, external_data)
        graph = onnx.load(str(tmp / "model.onnx"), load_external_data=False)
        n_attention = count_attention_modules(module)
        op_counts = check_fusion(graph, backend, n_attention)
        save_weights_npz(tmp / "weights.npz", weights)
        with torch.no_grad():
            for n, (batch, seq, lengths) in enumerate(GOLDEN_CASES):
                feeds = inputs_for(batch, seq, lengths, seed + 1 + n)
                outputs = module(*feeds.values())
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                save_test_data_set(tmp / f"test_data_set_{n}", list(feeds), [to_numpy(t) for t in feeds.values()],
                                   spec.outputs, [to_numpy(t) for t in outputs])
            golden_sets = len(GOLDEN_CASES)
            if checkpoint:
                golden_sets += _text_golden(tmp, checkpoint["directory"], spec, module, golden_sets)
        roles = {i.name: i.role for i in spec.inputs}
        manifest = {
            "model": {"name": spec.name, "architecture": spec.architecture, "config": spec.config.to_dict(),
                      "options": spec.options, "parameters": sum(a.size for a in weights.values()),
                      "parameters_closed_form": param_count(spec.config) if spec.architecture == "bert" else None,
                      "attention_modules": n_attention},
            "backend": backend,
            "dtype": dtype,
            "opset": {(o.domain or "ai.onnx"): o.version for o in graph.opset_import},
            "inputs": [{**v, "role": roles[v["name"]]} for v in graph_io(graph.graph.input)],
            "outputs": graph_io(graph.graph.output),
            "op_counts": op_counts,
            "fused_attention_ops": n_attention if BACKENDS[backend].attention_ops else 0,
            "ort_fusions": fusions,
            "golden_sets": golden_sets,
            "weights": {"bytes": n_bytes, "external_data": external_data},
            "seed": seed,
            "versions": package_versions(),
            "reproduce": f"qkv-export --model {model} --backend {backend} --dtype {dtype} --seed {seed} --opset {opset}"
                         + (f" --weights {checkpoint['directory']}" if weights_dir is not None else ""),
        }
        if checkpoint:
            manifest["checkpoint"] = {"origin": checkpoint["origin"], "sha256": checkpoint["sha256"],
                                      "tokenizer": TOKENIZER_DIR if (tmp / TOKENIZER_DIR).is_dir() else None}
        manifest = write_manifest(tmp, manifest)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest



