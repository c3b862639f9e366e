"""qkv-bench: time every backend's artifact on ONNX Runtime CPU against PyTorch eager and the peer path
(Hugging Face BertModel -> TorchScript export -> onnxruntime.transformers optimizer), side by side in one run,
next to this machine's GEMM ceiling; peak memory of one encoder layer per backend; and the cost of export
plus validation."""

import argparse
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .machine import fail, machine

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
DEFAULT_POINTS = "1x128,8x128,1x512"
DEFAULT_MEMORY_SEQS = "512,1024,2048,4096,8192"
GEMM_SHAPES = [(512, 768, 3072), (1024, 1024, 1024), (128, 768, 3072)]
QUICK = {"points": "1x16,2x32", "warmup": 1, "rounds": 3, "memory_seqs": "64,128", "gemm": [(64, 128, 256)]}

EPILOG = f"""what runs, in one process unless said otherwise:
  1. export: every --backends artifact of --model (qkv-export's pipeline), the peer (transformers BertModel
     with the same weights, torch.onnx.export(dynamo=False), then onnxruntime.transformers.optimizer
     optimize_model(model_type="bert")), and PyTorch eager on the same module
  2. GEMM rate: one fp32 MatMul per shape {", ".join("x".join(map(str, s)) for s in GEMM_SHAPES)} in ORT
  3. latency per (batch x sequence) point: every contender is run once and compared with eager (max abs
     difference), warmed up, then --rounds rounds run each contender once in rotated order; median, IQR,
     p10-p90; achieved GFLOP/s (matmul FLOPs of the forward) as a share of the point's GEMM ceiling: the
     better of two MatMuls timed in the same rounds (the model's FFN shape and
     {"x".join(map(str, GEMM_SHAPES[0]))}).
     One contender is registered twice (--twin): the ratio of its two medians is the run's noise
  4. memory: one encoder layer (hidden 768, 12 heads) per backend and PyTorch, each point in its own process
  5. pipeline: qkv-export --model MODEL then qkv-validate on it, per stage, in a fresh process

All ORT sessions: intra-op threads --threads, inter-op 1, thread-pool spinning off (on 2 cores a spinning
pool steals time from the next contender) unless --spinning; torch.set_num_threads(--threads), its OpenMP
defaults untouched (its threads spin after each op: --settle gives them time to stop before the next run).

exit codes:
  0  done: results written
  1  a contender could not be exported or run (the rest are reported)
  2  bad argument or missing dependency (one line on stderr)

Writes OUT/results.json, OUT/results.md, OUT/latency.png, OUT/memory.png (plots need matplotlib).

Decoders (GPT-2 / Llama style, the KV cache in the fused ops): `qkv-bench decoder --help` (tokens/s and
prefill against transformers with its cache and onnxruntime-genai, the attention memory of a long prefill)."""


def parse_points(text: str) -> list:
    points = []
    for item in text.split(","):
        b, sep, s = item.strip().partition("x")
        if not sep or not b.isdigit() or not s.isdigit() or int(b) < 1 or int(s) < 1:
            raise ValueError(f"bad point {item.strip()!r}: expected BATCHxSEQ, e.g. 1x128")
        points.append((int(b), int(s)))
    return points


def parse_seqs(text: str) -> list:
    if text in ("", "none"):
        return []
    if not all(x.strip().isdigit() and int(x) > 0 for x in text.split(",")):
        raise ValueError(f"bad --memory-seqs {text!r}: expected comma-separated positive integers, or none")
    return [int(x) for x in text.split(",")]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="qkv-bench",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="bert-base",
        help="a BERT preset or a checkpoint model (minilm-l6) (default: %(default)s)",
    )
    p.add_argument("--points", help=f"BATCHxSEQ points, comma-separated (default: {DEFAULT_POINTS})")
    p.add_argument(
        "--backends",
        default="onnx-attention,ort-contrib,decomposed",
        help="artifact backends to time (default: %(default)s)",
    )
    p.add_argument("--warmup", type=int, help="runs of each contender before timing (default: 3)")
    p.add_argument("--rounds", type=int, help="timed rounds; each runs every contender once (default: 15)")
    p.add_argument(
        "--threads", type=int, default=2, help="ORT intra-op and torch threads (default: %(default)s)"
    )
    p.add_argument("--spinning", action="store_true", help="leave ORT's thread-pool spinning on")
    p.add_argument(
        "--settle",
        type=float,
        default=0.02,
        metavar="S",
        help="untimed pause before each timed run, so the previous contender's threads stop spinning "
        "(PyTorch's OpenMP threads spin for milliseconds after each op) (default: %(default)s)",
    )
    p.add_argument(
        "--twin",
        help="the contender timed twice for the noise estimate (default: ort-contrib, or the first backend)",
    )
    p.add_argument(
        "--memory-seqs", help=f"sequence lengths of the memory runs, or none (default: {DEFAULT_MEMORY_SEQS})"
    )
    p.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    p.add_argument(
        "--int8",
        help="backends whose int8 artifact is a contender too, comma-separated, or none (default: the first "
        "of --backends); with the peer, its int8 recipe (Optimum's avx512_vnni dynamic settings) joins",
    )
    p.add_argument(
        "--openvino",
        help="OpenVINO CPU precision hints to time on the first backend's float32 artifact, or none "
        "(default: f32,bf16; none with --quick; skipped with a note where OpenVINO is not installed)",
    )
    p.add_argument(
        "--no-accuracy",
        action="store_true",
        help="skip judging every contender against the float64 oracle by the accuracy contract",
    )
    p.add_argument("--no-pipeline", action="store_true", help="skip the export + validation cost")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also run each ORT contender under ORT's profiler at each point (op-type shares)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny settings for a smoke run: points {QUICK['points']}, warm-up {QUICK['warmup']}, "
        f"{QUICK['rounds']} rounds, memory {QUICK['memory_seqs']}, GEMM 64x128x256",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default: %(default)s)")
    p.add_argument("--out", type=Path, help="results directory (default: results/bench-<UTC timestamp>)")
    p.add_argument(
        "--keep-artifacts", action="store_true", help="keep the exported models under OUT/artifacts"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def check(args) -> str | None:
    """The first problem with the arguments or the installed packages, or None; fills in defaults."""
    from ..artifact_format import BACKENDS
    from ..model_defs.config import PRESETS
    from ..model_defs.registry import CHECKPOINT_MODELS

    q = QUICK if args.quick else {}
    try:
        args.points = parse_points(args.points or q.get("points", DEFAULT_POINTS))
        args.memory_seqs = parse_seqs(
            args.memory_seqs if args.memory_seqs is not None else q.get("memory_seqs", DEFAULT_MEMORY_SEQS)
        )
    except ValueError as e:
        return str(e)
    args.warmup = args.warmup if args.warmup is not None else q.get("warmup", 3)
    args.rounds = args.rounds if args.rounds is not None else q.get("rounds", 15)
    args.gemm = q.get("gemm", GEMM_SHAPES)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    models = {**PRESETS, **{name: None for name in CHECKPOINT_MODELS}}
    if args.model not in models:
        return f"unknown model {args.model!r}; known: {', '.join(models)}"
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad or not args.backends:
        return f"unknown backend {bad[0] if bad else ''!r}; known: {', '.join(BACKENDS)}"
    args.int8 = _names(args.int8 if args.int8 is not None else ("none" if args.quick else args.backends[0]))
    if any(b not in args.backends for b in args.int8):
        return f"--int8 {','.join(args.int8)}: every int8 backend must be one of --backends"
    args.openvino = _names(
        args.openvino if args.openvino is not None else ("none" if args.quick else "f32,bf16")
    )
    if any(h not in ("f32", "bf16", "f16") for h in args.openvino):
        return f"--openvino {','.join(args.openvino)}: hints are f32, bf16, f16 or none"
    if args.openvino:
        try:
            __import__("openvino")
        except ImportError:
            args.openvino = []  # noted in the report: the run goes on without it
    args.accuracy = not args.no_accuracy
    if args.warmup < 0 or args.rounds < 1 or args.threads < 1 or args.settle < 0:
        return "--warmup and --settle must be >= 0, --rounds and --threads >= 1"
    longest = max(s for _, s in args.points)
    positions = PRESETS[args.model].max_positions if args.model in PRESETS else 512
    if longest > positions:
        return f"sequence {longest} exceeds {args.model}'s {positions} positions"
    args.twin = args.twin or ("ort-contrib" if "ort-contrib" in args.backends else args.backends[0])
    if args.twin not in args.backends:
        return f"--twin {args.twin!r} is not one of --backends"
    needed = ["torch", "onnxruntime", "onnxscript"] + ([] if args.no_peer else ["transformers"])
    for module in needed:
        try:
            __import__(module)
        except ImportError:
            extra = "--no-peer, or " if module == "transformers" else ""
            return f"{module} is not installed ({extra}pip install '.[bench]')"
    return None


def _names(text: str) -> list[str]:
    return [] if text.strip() in ("", "none") else [x.strip() for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == [
        "decoder"
    ]:  # qkv-bench decoder ...: benchmarks/decoder/
        from .decoder import main as decoder_main

        return decoder_main((sys.argv[1:] if argv is None else argv)[1:])
    args = parse_args(argv)
    problem = check(args)
    if problem:
        return fail(problem)
    out = args.out or Path("results") / f"bench-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return fail(f"cannot create {out}: {e}")
    from .run import run

    command = "qkv-bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qkv-bench-") as work:
        work = out / "artifacts" if args.keep_artifacts else Path(work)
        work.mkdir(exist_ok=True)
        results, failed = run(args, work, out)
    results.update(command=command, machine=machine(), wall_s=time.perf_counter() - started)
    from .report import markdown, plots, write_json

    write_json(results, out / "results.json")  # first: the numbers survive a plotting or formatting problem
    plots(results, out)
    (out / "results.md").write_text(markdown(results))
    write_json(results, out / "results.json")  # again, with any note the plots added
    print(f"wrote {out}/results.md, results.json" + ", plots" * bool(list(out.glob("*.png"))))
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
