"""Module -> artifact: build, export, fusion check, golden data, manifest, atomic publish."""

import os
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..artifact_format import (
    ARCHITECTURES,
    ARTIFACT_DTYPES,
    BACKENDS,
    MODEL,
    QUANTIZED,
    TOKENIZER_DIR,
    WEIGHTS,
    io_dtype,
    seeded_cases,
    sha256_file,
)
from ..decoder_format import DECODER
from ..genai import GENAI_CONFIG, GENAI_TOKENIZER_FILES, genai_config, special_tokens
from ..genai import encode as encode_genai
from ..graph_weights import in_graph
from ..inputs import fit, make_inputs
from ..model_defs.config import param_count
from ..model_defs.decoder import decoder_param_count
from ..model_defs.numpy_io import from_numpy, to_numpy, weights_to_numpy
from ..model_defs.registry import (
    CHECKPOINT_MODELS,
    ModelSpec,
    build_for_weights,
    checkpoint_dir,
    count_attention_modules,
    get_model,
    init_random_weights,
    module_on,
    spec_for,
)
from ..scratch import Watchdog
from ..stages import stage
from ..versions import package_versions
from .graph import export_model, prepare, read_back
from .writer import publish, save_test_data_set, save_weights_npz, temporary_dir_for, write_manifest

PROTOBUF_LIMIT = 2**31 - 1
SHORT, HELD_SHORT_SEEDS = 16, 4  # int8's held-out check: seeds per half of each case of at most SHORT tokens
STAGE_SOURCE = "build module + weights"
PARAM_COUNTS = {"bert": param_count, DECODER: decoder_param_count}  # closed forms, beside the count


STAGE_WEIGHTS, STAGE_GOLDEN, STAGE_MANIFEST, STAGE_PUBLISH = (
    "write weights.npz",
    "write golden data",
    "manifest (sha256 of files)",
    "atomic publish",
)


def source_model(
    model: str, weights_dir, seed: int, meanwhile: Callable[[ModelSpec], None] | None = None
) -> tuple[ModelSpec, torch.nn.Module, dict | None]:
    """(spec, float32 module, checkpoint description or None): a registry model with seeded random
    weights, or a checkpoint (`weights_dir`, or a CHECKPOINT_MODELS name); for a decoder checkpoint, instead
    of the module, its tensors as a mapping that reads each when asked (CheckpointTensors). A registry
    model's weights are drawn on a second thread (torch's kernels release the GIL) while `meanwhile(spec)`
    runs."""
    if weights_dir is None and model not in CHECKPOINT_MODELS:
        spec = get_model(model)
        # spec.random(seed), split: build_for_weights patches torch's classes while it builds, so only the
        # draw may run beside `meanwhile`, which builds the template's module
        module = build_for_weights(spec.architecture, spec.config, spec.options)
        with ThreadPoolExecutor(1) as background:
            drawn = background.submit(init_random_weights, module, seed)
            if meanwhile is not None:
                meanwhile(spec)
            with stage(STAGE_SOURCE):  # what is left of it: the wait
                return spec, drawn.result(), None
    with stage(STAGE_SOURCE):
        from ..model_defs.checkpoint import family_of, load_hf_model
        from ..model_defs.decoder_checkpoint import (
            decoder_family_of,
            decoder_model_type,
            open_decoder_checkpoint,
        )

        directory = Path(weights_dir) if weights_dir is not None else checkpoint_dir(model)
        decoder = decoder_model_type(directory / "config.json") is not None
        # a decoder's tensors are read one at a time when weights.npz is written (export_artifact)
        cfg, module = (open_decoder_checkpoint if decoder else load_hf_model)(directory)
        files = {
            p.name: sha256_file(p)
            for p in sorted(directory.iterdir())
            if p.suffix in (".json", ".safetensors")
        }
        origin = str(directory) if weights_dir is not None else CHECKPOINT_MODELS[model]
        family = (decoder_family_of if decoder else family_of)(directory / "config.json")[0].name
        described = {"directory": directory, "origin": origin, "sha256": files, "family": family}
        return spec_for(model, DECODER if decoder else "bert", cfg), module, described


def _golden_sets(tmp: Path, spec: ModelSpec, module, dtype: str, seed: int, checkpoint: dict | None) -> int:
    """Write the golden sets (PyTorch outputs on seeded inputs; for a checkpoint with a tokenizer, also on
    real sentences); returns how many."""
    records, cfg = spec.input_records(dtype), spec.config.to_dict()
    longest = spec.config.max_sequence
    feeds = [
        make_inputs(records, cfg, *fit(c[:3], longest - c[3]), np.random.default_rng([seed, n]), past=c[3])
        for n, c in enumerate(seeded_cases("golden", spec.architecture))
    ]
    text = not ARCHITECTURES[spec.architecture].cached  # a decoder's: validation's greedy prompts instead
    if text and checkpoint and _copy_tokenizer(checkpoint["directory"], tmp / TOKENIZER_DIR):
        from ..text import SAMPLE_SENTENCES, tokenize

        text = tokenize(
            tmp / TOKENIZER_DIR,
            SAMPLE_SENTENCES,
            max_length=spec.config.max_sequence,
            pad_id=spec.config.pad_token_id,
        )
        feeds.append([text[i.name] for i in spec.inputs])
    names = [i.name for i in spec.inputs]
    with torch.no_grad():
        for n, inputs in enumerate(feeds):
            outputs = module(*(from_numpy(x) for x in inputs))
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            save_test_data_set(tmp, n, names, inputs, spec.outputs, [to_numpy(t) for t in outputs])
    return len(feeds)


def _write_weights(path: Path, weights: dict) -> dict:
    """weights.npz at `path`; its file-table entry."""
    save_weights_npz(path, weights)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


class _Saved(Mapping):
    """A checkpoint's tensors as weights.npz holds them (the artifact's dtype; bfloat16 as float32), each
    made when save_weights_npz asks for it."""

    def __init__(self, tensors: Mapping, dtype: str):
        self.tensors, self.dtype = tensors, getattr(torch, dtype)

    def __getitem__(self, name: str) -> np.ndarray:
        return weights_to_numpy({name: self.tensors[name].to(self.dtype)})[name]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def _mapped_module(spec: ModelSpec, path: Path, dtype: str):
    """The model holding the weights.npz just written at `path`, memory-mapped (its pages the page cache's,
    as validation reads them): what the export and the golden data read, never a second copy in memory."""
    from ..artifact_format import expected_weights
    from ..graph_contract import weight_dtype
    from ..npz import read_weights

    arrays = read_weights(
        path, path, expected_weights(spec.architecture, spec.config.to_dict()), weight_dtype(dtype)
    )
    return module_on(spec.architecture, spec.config, spec.options, arrays)


def _copy_tokenizer(checkpoint_dir: Path, target: Path, names=None) -> bool:
    """Copy a checkpoint's tokenizer files (`names`, default text.TOKENIZER_FILES) into `target` in the
    artifact; False when it has none."""
    from ..text import TOKENIZER_FILES

    files = [f for f in names or TOKENIZER_FILES if (checkpoint_dir / f).is_file()]
    if files:
        target.mkdir(exist_ok=True)
        for f in files:
            shutil.copyfile(checkpoint_dir / f, target / f)
    return bool(files)


def export_artifact(
    model: str,
    out: Path,
    backend: str = "onnx-attention",
    dtype: str = "float32",
    seed: int = 0,
    opset: int | None = None,
    external_data: bool | None = None,
    weights_dir: Path | None = None,
) -> dict:
    """Export `model` to the artifact directory `out`; returns the manifest. `model` is a registry name;
    with `weights_dir` (a Hugging Face BERT checkpoint) it is just the name the artifact gets."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if dtype not in ARTIFACT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(ARTIFACT_DTYPES)}")
    float_dtype = io_dtype(dtype)  # int8 is quantized from the float32 export

    def opset_of(spec: ModelSpec) -> int:
        return BACKENDS[backend].for_architecture(spec.architecture).default_opset if opset is None else opset

    spec, module, checkpoint = source_model(
        model, weights_dir, seed, lambda spec: prepare(spec, backend, float_dtype, opset_of(spec))
    )
    opset = opset_of(spec)
    out = Path(out)
    tmp = temporary_dir_for(out)
    float_dir = tmp
    if dtype in QUANTIZED:  # the float32 export, beside the build (a killed export's is cleaned up like it)
        float_dir = tmp.parent / f".{out.name}.tmp-float32-{os.getpid()}"
        shutil.rmtree(float_dir, ignore_errors=True)
        float_dir.mkdir()
    watchdogs = [Watchdog(d) for d in {tmp, float_dir}]  # a killed export leaves neither behind
    try:
        streamed = None
        if isinstance(module, Mapping):  # a checkpoint's tensors: written one at a time, then memory-mapped
            with stage(STAGE_WEIGHTS):
                streamed = _write_weights(tmp / WEIGHTS, _Saved(module, float_dtype))
            module = _mapped_module(spec, tmp / WEIGHTS, dtype)
        module = module.eval().to(getattr(torch, float_dtype))
        weights = weights_to_numpy(module.state_dict())
        n_bytes = sum(a.nbytes for a in weights.values())
        if external_data is None:
            external_data = n_bytes > PROTOBUF_LIMIT * 0.9
        one_copy = in_graph(dtype)  # the graph's initializers are the weights: no weights.npz
        with ThreadPoolExecutor(1) as background:  # on a second core while the exporter traces (GIL-free I/O)
            weights_file = (
                None if streamed or one_copy else background.submit(_write_weights, tmp / WEIGHTS, weights)
            )
            graph = export_model(spec, module, backend, float_dtype, opset, external_data, float_dir / MODEL)
            n_attention = count_attention_modules(module)
            quantization = None
            if dtype in QUANTIZED:
                quantization = _quantize(float_dir, tmp, spec, graph.taps, seed, checkpoint)
                graph = read_back(tmp / MODEL, spec, backend, n_attention, graph.taps)
            known = dict(graph.files)  # model.onnx's entries from memory
            if not one_copy:
                with stage(STAGE_WEIGHTS):  # what is left of it: the wait
                    known[WEIGHTS] = streamed or weights_file.result()
        with stage(STAGE_GOLDEN):
            golden_sets = _golden_sets(tmp, spec, module, float_dtype, seed, checkpoint)
        roles = {i.name: i.role for i in spec.inputs}
        manifest = {
            "model": {
                "name": spec.name,
                "architecture": spec.architecture,
                "config": spec.config.to_dict(),
                "options": spec.options,
                "parameters": sum(a.size for a in weights.values()),
                "parameters_closed_form": PARAM_COUNTS[spec.architecture](spec.config)
                if spec.architecture in PARAM_COUNTS
                else None,
                "attention_modules": n_attention,
            },
            "backend": backend,
            "dtype": dtype,
            "opset": graph.opset,
            "inputs": [{**v, "role": roles[v["name"]]} for v in graph.inputs],
            "outputs": graph.outputs,
            "op_counts": graph.op_counts,
            **({"taps": graph.taps} if graph.taps is not None else {}),
            "fused_attention_ops": n_attention
            if BACKENDS[backend].for_architecture(spec.architecture).attention_ops
            else 0,
            "ort_fusions": graph.fusions,
            "golden_sets": golden_sets,
            "weights": {
                "bytes": n_bytes,
                "external_data": external_data,
                **({"in_graph": graph.params} if one_copy else {}),
            },
            "seed": seed,
            "versions": package_versions(),
            "reproduce": f"qkv-export --model {model} --backend {backend} --dtype {dtype} --seed {seed} "
            f"--opset {opset}" + (f" --weights {checkpoint['directory']}" if weights_dir is not None else ""),
        }
        if quantization:
            manifest["quantization"] = quantization
        if checkpoint:
            manifest["checkpoint"] = {
                "family": checkpoint["family"],
                "origin": checkpoint["origin"],
                "sha256": checkpoint["sha256"],
                "tokenizer": TOKENIZER_DIR if (tmp / TOKENIZER_DIR).is_dir() else None,
            }
        if ARCHITECTURES[spec.architecture].cached:  # onnxruntime-genai runs the directory as it is
            if checkpoint:
                manifest["special_tokens"] = special_tokens(checkpoint["directory"])
                _copy_tokenizer(checkpoint["directory"], tmp, GENAI_TOKENIZER_FILES)
            (tmp / GENAI_CONFIG).write_bytes(encode_genai(genai_config(manifest)))
        if one_copy and streamed:  # the checkpoint's tensors, read once into the graph: now the graph's
            (tmp / WEIGHTS).unlink()
        with stage(STAGE_MANIFEST):
            manifest = write_manifest(tmp, manifest, known)
        with stage(STAGE_PUBLISH):
            publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if float_dir != tmp:
            shutil.rmtree(float_dir, ignore_errors=True)
        for watchdog in watchdogs:
            watchdog.release()
    return manifest


def _quantize(float_dir: Path, tmp: Path, spec: ModelSpec, taps: list[dict], seed: int, checkpoint) -> dict:
    """tmp/model.onnx: the int8 graph of float_dir/model.onnx, found by the sensitivity search (seeded tokens,
    and for a checkpoint with a tokenizer the bundled search sentences) and accepted on held-out inputs
    (other seeds, the held-out sentences) with margin. Returns the manifest's quantization record, with the
    sha256 of the float32 graph it came from."""
    from ..text import TOKENIZER_FILES, corpus, tokenize
    from .quantize import Calibration, search

    records, cfg = spec.input_records("float32"), spec.config.to_dict()
    decoder = ARCHITECTURES[spec.architecture].cached
    mask_at = next(k for k, i in enumerate(spec.inputs) if i.role == "padding_mask")

    def tokens(n: int, shape) -> dict:
        batch, seq, lengths = fit(shape, spec.config.max_sequence)
        inputs = make_inputs(records, cfg, batch, seq, lengths, np.random.default_rng([seed, n]))
        return {"inputs": inputs, "mask": inputs[mask_at], "sentences": False, "logits": decoder}

    def text(sentences) -> dict:
        feeds = tokenize(
            checkpoint["directory"],
            sentences,
            max_length=spec.config.max_sequence,
            pad_id=spec.config.pad_token_id,
        )
        inputs = [feeds[i.name] for i in spec.inputs]
        return {"inputs": inputs, "mask": inputs[mask_at], "sentences": True}

    shapes = [c[:3] for c in seeded_cases("calibration", spec.architecture)]
    search_cases = [tokens(1000 + n, shape) for n, shape in enumerate(shapes)]
    # a short case's relative error varies most from seed to seed (on a CPU without VNNI, ORT's uint8 x int8
    # kernel saturates): each held-out half holds HELD_SHORT_SEEDS seeds of each shape of <= SHORT tokens
    seeds = [1 if s[1] > SHORT else HELD_SHORT_SEEDS for s in shapes]
    halves = tuple(
        [tokens(base + 100 * k + n, s) for n, s in enumerate(shapes) for k in range(seeds[n])]
        for base in (2000, 3000)
    )
    calibration = Calibration(search_cases, halves)
    if not decoder and checkpoint and any((checkpoint["directory"] / f).is_file() for f in TOKENIZER_FILES):
        held = corpus("holdout")
        calibration.search.append(text(corpus("search")))
        calibration.holdout[0].append(text(held[0::2]))
        calibration.holdout[1].append(text(held[1::2]))
        calibration.holdout_whole.append(text(held))
    record = search(float_dir / MODEL, tmp / MODEL, spec.architecture, cfg, taps, calibration)
    return {**record, "float32_graph_sha256": sha256_file(float_dir / MODEL)}
