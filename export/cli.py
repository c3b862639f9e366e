"""qkv-export: turn a registered PyTorch model or a checkpoint (encoder or decoder) into ONNX artifacts with
fused attention."""

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

from ..threads import POLICY

os.environ.update({**POLICY, **os.environ})  # before numpy and torch load their thread pools

from ..artifact_format import ARTIFACT_DTYPES, BACKENDS, MANIFEST
from ..errors import EXIT_FAILED, EXIT_OK, ExportError, UsageError, first_line, report_error, run_cli
from ..stages import add_progress_flag, reporting_progress

PROG = "qkv-export"
EPILOG = """backends:
{backends}
  all             one artifact per backend (--dtype all: one per dtype too)

exit codes:
  0  artifact(s) written
  1  export failed: the exporter errored, or the fusion check found attention not as the
     backend promises (the other backends of --backend all are still written)
  2  invalid argument (unknown model, backend or dtype; opset outside the backend's range;
     output path unusable; a checkpoint with missing, unexpected or misshapen weights)
  3  internal error: a bug in qkv-onnx (the traceback is printed; please report it)

Decoders (gpt2-*, llama-* presets; checkpoints of gpt2, llama, mistral, qwen2, qwen3, phi3, gemma,
gemma2, gemma3_text, olmo2, granite, smollm3: sliding windows, soft caps, q/k norms, scaled RoPE as
config, docs/decoders.md): one graph does prefill and decode.
  inputs   input_ids (batch, seq), attention_mask (batch, past + seq; left padding),
           position_ids (batch, seq), past_key_values.{{i}}.key / .value (batch, kv_heads, past,
           head_dim; past may be 0)
  outputs  logits (batch, seq, vocab), present.{{i}}.key / .value (batch, kv_heads, past + seq,
           head_dim): feed them back as past_key_values for the next step
  attention: onnx-attention writes each layer as one ONNX Attention op reading its cache through
  past_key/past_value (opset 23); ort-contrib as one com.microsoft GroupQueryAttention (ONNX
  Runtime's CPU kernel refuses a chunk of more than one token over a cache at batch > 1: prefill
  at any batch, then one token per step); decomposed as MatMul/Softmax. int8: the products the
  search keeps the accuracy contract with (next-token agreement included), attention in float32.
  docs/decoders.md.

Each artifact directory is built beside its destination and swapped into place at the end:
an interrupted export leaves no partial artifact and an existing one untouched."""


def parse_args(argv) -> argparse.Namespace:
    from ..model_defs.decoder_families import DECODER_FAMILIES
    from ..model_defs.families import FAMILIES
    from ..model_defs.registry import CHECKPOINT_MODELS, MODELS

    backends = "\n".join(f"  {b.name:<15} {b.summary}" for b in BACKENDS.values())
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        epilog=EPILOG.format(backends=backends),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        help="registered model (default: bert-tiny): "
        + ", ".join(MODELS)
        + "; with random weights (--seed), except "
        + "; ".join(f"{k}: {v}" for k, v in CHECKPOINT_MODELS.items())
        + ". With --weights, the name the artifact gets (default: the directory's name)",
    )
    p.add_argument(
        "--weights",
        type=Path,
        metavar="DIR",
        help="a Hugging Face checkpoint directory (config.json + model.safetensors, tokenizer "
        "files optional) to export instead of a registry model; its model_type one of: "
        + ", ".join(FAMILIES)
        + " (encoders: docs/families.md, a task head such as classifier.* is refused), "
        + ", ".join(DECODER_FAMILIES)
        + " (decoders with a KV cache: docs/decoders.md)",
    )
    p.add_argument(
        "--backend",
        default="onnx-attention",
        help="attention backend, or 'all' (default: %(default)s): " + ", ".join(BACKENDS),
    )
    p.add_argument(
        "--out",
        type=Path,
        help="artifact directory (default: artifacts/MODEL-BACKEND-DTYPE); with --backend all or "
        "--dtype all, "
        "the directory that receives one MODEL-BACKEND-DTYPE artifact each",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="weights and activations, or 'all' (default: %(default)s): " + ", ".join(ARTIFACT_DTYPES),
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random weights and golden inputs (default: %(default)s)",
    )
    p.add_argument(
        "--opset",
        type=int,
        help="ONNX opset (default: the backend's: "
        + ", ".join(f"{b.name} {b.default_opset}" for b in BACKENDS.values())
        + ")",
    )
    add_progress_flag(p)
    args = p.parse_args(argv)
    args.known_models = [*MODELS, *CHECKPOINT_MODELS]
    return args


def describe(manifest: dict) -> str:
    counts = manifest["op_counts"]
    attention = {k: v for k, v in counts.items() if k.endswith("Attention")}
    ops = (
        ", ".join(f"{v} {k}" for k, v in attention.items())
        or f"{counts.get('Softmax', 0)} Softmax (decomposed)"
    )
    q = manifest.get("quantization")
    dtype = manifest["dtype"]
    if q:  # how much of it is int8: the search may keep every product in float32
        kept = len(q["float_nodes"])
        dtype += f" ({q['quantized_products']} of {q['quantized_products'] + kept} products int8)"
    return (
        f"{manifest['model']['name']} ({manifest['model']['parameters']:,} parameters), {dtype}, "
        f"{ops}, opset {manifest['opset'].get('ai.onnx')}"
    )


def plan(args) -> dict[tuple[str, str], Path]:
    """{(backend, dtype): output directory}; raises UsageError for the first bad argument."""
    models = args.known_models
    if args.weights is not None:
        args.model = args.model or args.weights.resolve().name
        models = [args.model]
        if not (args.weights / "config.json").is_file():
            raise UsageError(
                f"{args.weights / 'config.json'}: missing "
                "(--weights takes a Hugging Face checkpoint directory)"
            )
    args.model = args.model or "bert-tiny"
    for what, value, known in (
        ("model", args.model, models),
        ("backend", args.backend, [*BACKENDS, "all"]),
        ("dtype", args.dtype, [*ARTIFACT_DTYPES, "all"]),
    ):
        if value not in known:
            raise UsageError(f"unknown {what} {value!r}; known: {', '.join(known)}")
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    dtypes = list(ARTIFACT_DTYPES) if args.dtype == "all" else [args.dtype]
    if args.opset is not None:
        if len(backends) > 1:
            raise UsageError("--opset applies to one backend; each backend of --backend all uses its default")
        problem = BACKENDS[backends[0]].opset_problem(args.opset)
        if problem:
            raise UsageError(problem)
    several = len(backends) * len(dtypes) > 1
    outs = {}
    for backend, dtype in itertools.product(backends, dtypes):
        name = f"{args.model}-{backend}-{dtype}"
        out = outs[backend, dtype] = (
            (args.out or Path("artifacts")) / name if several else args.out or Path("artifacts") / name
        )
        if out.exists() and not (out / MANIFEST).is_file():
            raise UsageError(f"{out} exists and is not an artifact: refusing to replace it")
    return outs


def run(args) -> int:
    from .pipeline import export_artifact

    code = EXIT_OK
    for (backend, dtype), out in plan(args).items():
        start = time.perf_counter()
        try:
            manifest = export_artifact(
                args.model, out, backend, dtype, args.seed, args.opset, weights_dir=args.weights
            )
        except ExportError as e:
            report_error(PROG, f"{backend}: {first_line(e)}")
            code = EXIT_FAILED
            continue
        except OSError as e:
            raise UsageError(f"cannot write {out}: {e}") from None
        print(f"wrote {out}: {describe(manifest)}, {time.perf_counter() - start:.1f} s")
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    with reporting_progress(PROG, args.progress):
        return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
