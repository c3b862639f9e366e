"""qkv-export: turn a registered PyTorch model into ONNX artifacts with fused attention."""
import argparse
import itertools
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2

EPILOG = """backends:
{backends}
  all             one artifact per backend (--dtype all: one per dtype too)

exit codes:
  0  artifact(s) written
  1  export failed: the exporter errored, or the fusion check found attention not as the
     backend promises (the other backends of --backend all are still written)
  2  invalid argument (unknown model, backend or dtype; opset outside the backend's range;
     output path unusable; a checkpoint with missing, unexpected or misshapen weights)

Each artifact directory is built beside its destination and swapped into place at the end:
an interrupted export leaves no partial artifact and an existing one untouched."""


def parse_args(argv):
    from model_defs.registry import CHECKPOINT_MODELS, MODELS

    from .backends import BACKENDS
    from .pipeline import DTYPES

    backends = "\n".join(f"  {b.name:<15} {b.summary}" for b in BACKENDS.values())
    p = argparse.ArgumentParser(prog="qkv-export", description=__doc__, epilog=EPILOG.format(backends=backends),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="registered model (default: bert-tiny): " + ", ".join(MODELS) + "; with random "
                   "weights (--seed), except " + "; ".join(f"{k}: {v}" for k, v in CHECKPOINT_MODELS.items())
                   + ". With --weights, the name the artifact gets (default: the directory's name)")
    p.add_argument("--weights", type=Path, metavar="DIR", help="a Hugging Face BERT checkpoint directory "
                   "(config.json + model.safetensors, tokenizer files optional) to export instead of a registry model")
    p.add_argument("--backend", default="onnx-attention",
                   help="attention backend, or 'all' (default: %(default)s): " + ", ".join(BACKENDS))
    p.add_argument("--out", type=Path, help="artifact directory (default: artifacts/MODEL-BACKEND-DTYPE); with "
                   "--backend all or --dtype all, the directory that receives one MODEL-BACKEND-DTYPE artifact each")
    p.add_argument("--dtype", default="float32", help="weights and activations, or 'all' (default: %(default)s): "
                   + ", ".join(DTYPES))
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and golden inputs (default: %(default)s)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the backend's: " + ", ".join(
        f"{b.name} {b.default_opset}" for b in BACKENDS.values()) + ")")
    return p.parse_args(argv), [*MODELS, *CHECKPOINT_MODELS], BACKENDS, DTYPES


def describe(manifest: dict) -> str:
    counts = manifest["op_counts"]
    attention = {k: v for k, v in counts.items() if k.endswith("Attention")}
    ops = ", ".join(f"{v} {k}" for k, v in attention.items()) or f"{counts.get('Softmax', 0)} Softmax (decomposed)"
    return (f"{manifest['model']['name']} ({manifest['model']['parameters']:,} parameters), {manifest['dtype']}, "
            f"{ops}, opset {manifest['opset'].get('ai.onnx')}")


def main(argv=None) -> int:
    args, models, backends, dtypes = parse_args(argv)
    chosen = list(backends) if args.backend == "all" else [args.backend]
    chosen_dtypes = list(dtypes) if args.dtype == "all" else [args.dtype]
    if args.weights is not None:
        args.model = args.model or args.weights.resolve().name
        models = [args.model]
        if not (args.weights / "config.json").is_file():
            print(f"qkv-export: error: {args.weights / 'config.json'}: missing (--weights takes a Hugging Face "
                  "checkpoint directory)", file=sys.stderr)
            return EXIT_INVALID
    args.model = args.model or "bert-tiny"
    problems = [f"unknown {what} {value!r}; known: {', '.join(known)}" for what, value, known in
                (("model", args.model, models), ("backend", args.backend, [*backends, "all"]),
                 ("dtype", args.dtype, [*dtypes, "all"])) if value not in known]
    if not problems and args.opset is not None:
        if len(chosen) > 1:
            problems.append("--opset applies to one backend; each backend of --backend all uses its default")
        else:
            problems += filter(None, [backends[chosen[0]].opset_problem(args.opset)])
    outs = {}
    several = len(chosen) * len(chosen_dtypes) > 1
    for b, dtype in itertools.product(chosen, chosen_dtypes) if not problems else []:
        name = f"{args.model}-{b}-{dtype}"
        out = outs[b, dtype] = (args.out or Path("artifacts")) / name if several else args.out or Path("artifacts") / name
        if out.exists() and not (out / "manifest.json").is_file():
            problems.append(f"{out} exists and is not an artifact: refusing to replace it")
    if problems:
        print(f"qkv-export: error: {problems[0]}", file=sys.stderr)
        return EXIT_INVALID

    from model_defs.checkpoint import CheckpointError

    from . import ExportError
    from .pipeline import export_artifact

    code = EXIT_OK
    for (backend, dtype), out in outs.items():
        start = time.perf_counter()
        try:
            manifest = export_artifact(args.model, out, backend, dtype, args.seed, args.opset,
                                       weights_dir=args.weights)
        except ExportError as e:
            print(f"qkv-export: error: {backend}: {e}", file=sys.stderr)
            code = EXIT_FAILED
            continue
        except CheckpointError as e:
            print(f"qkv-export: error: {e}", file=sys.stderr)
            return EXIT_INVALID
        except OSError as e:
            print(f"qkv-export: error: cannot write {out}: {e}", file=sys.stderr)
            return EXIT_INVALID
        print(f"wrote {out}: {describe(manifest)}, {time.perf_counter() - start:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
