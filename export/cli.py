"""qkv-export: turn a registered PyTorch model into an ONNX artifact with fused attention."""
import argparse
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2

EPILOG = """exit codes:
  0  artifact written
  1  export failed: the exporter errored, or the fusion check found attention left unfused
  2  invalid argument (unknown model, backend or dtype; output path unusable)

The artifact directory is built beside --out and swapped into place at the end: an
interrupted export leaves no partial artifact and an existing one untouched."""


def parse_args(argv):
    from model_defs.registry import MODELS

    from .pipeline import BACKENDS, DTYPES, MIN_OPSET

    p = argparse.ArgumentParser(prog="qkv-export", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert-tiny", help="registered model (default: %(default)s): " + ", ".join(MODELS))
    p.add_argument("--backend", default="onnx-attention", help="attention backend (default: %(default)s): " + ", ".join(BACKENDS))
    p.add_argument("--out", type=Path, help="artifact directory (default: artifacts/MODEL-BACKEND-DTYPE)")
    p.add_argument("--dtype", default="float32", help="weights and activations (default: %(default)s): " + ", ".join(DTYPES))
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and golden inputs (default: %(default)s)")
    p.add_argument("--opset", type=int, default=MIN_OPSET, help="ONNX opset, >= %(default)s for the Attention op")
    return p.parse_args(argv), MODELS, BACKENDS, DTYPES, MIN_OPSET


def main(argv=None) -> int:
    args, models, backends, dtypes, min_opset = parse_args(argv)
    problems = [f"unknown {what} {value!r}; known: {', '.join(known)}" for what, value, known in
                (("model", args.model, models), ("backend", args.backend, backends), ("dtype", args.dtype, dtypes))
                if value not in known]
    if args.opset < min_opset:
        problems.append(f"opset {args.opset} is below {min_opset}, where the ONNX Attention op starts")
    out = args.out or Path("artifacts") / f"{args.model}-{args.backend}-{args.dtype}"
    if out.exists() and not (out / "manifest.json").is_file():
        problems.append(f"{out} exists and is not an artifact: refusing to replace it")
    if problems:
        print(f"qkv-export: error: {problems[0]}", file=sys.stderr)
        return EXIT_INVALID

    from . import ExportError
    from .pipeline import export_artifact

    start = time.perf_counter()
    try:
        manifest = export_artifact(args.model, out, args.backend, args.dtype, args.seed, args.opset)
    except ExportError as e:
        print(f"qkv-export: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"qkv-export: error: cannot write {out}: {e}", file=sys.stderr)
        return EXIT_INVALID
    fused = manifest["op_counts"].get("Attention", 0)
    print(f"wrote {out}: {manifest['model']['name']} ({manifest['model']['parameters']:,} parameters), "
          f"{manifest['dtype']}, {fused} fused Attention node(s), opset {manifest['opset'].get('ai.onnx')}, "
          f"{time.perf_counter() - start:.1f} s")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
