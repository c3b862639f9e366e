"""Command-line options of `qkv-bench decoder`: defaults, --quick, parsing and checks."""

import argparse
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
BACKENDS = ("onnx-attention", "ort-contrib")
GENAI, EAGER = "onnxruntime-genai", "torch eager"
DEFAULTS = {
    "models": "gpt2-small,llama-100m",
    "batches": "1,8",
    "prompt": 32,
    "steps": 16,
    "prefill": "128,1024",
    "rounds": 5,
    "warmup": 1,
    "memory_seq": 8192,
    "memory_scaling": "2048,4096",
    "check_steps": 8,
}
QUICK = {
    "models": "gpt2-tiny",
    "batches": "1,2",
    "prompt": 8,
    "steps": 4,
    "prefill": "16,64",
    "rounds": 2,
    "warmup": 1,
    "memory_seq": 256,
    "memory_scaling": "",
    "check_steps": 4,
}
MiB = 2**20
CHECK_BATCH = 2
INIT_STD = 0.2  # greedy top-2 margins far above float32 rounding: the token check means something
GENAI_PYTHON = Path(".venv-genai/bin/python")
WORKER = Path(__file__).with_name("genai_worker.py")

EPILOG = """examples:
  qkv-bench decoder                       gpt2-small and llama-100m, every contender (5 min, quiet machine)
  qkv-bench decoder --quick --genai none  a smoke run on gpt2-tiny

onnxruntime-genai lives in its own environment (its wheel pulls `onnxruntime`, which cannot sit beside the
project's `onnxruntime-gpu`): bash scripts/setup_genai.sh makes .venv-genai; --genai-python points elsewhere,
--genai none leaves it out (the report says so).

exit codes:
  0  done: results written
  1  a contender could not be exported or run, or its greedy tokens differ from eager's (the rest reported)
  2  bad argument or missing dependency (one line on stderr)

Writes OUT/results.json and OUT/results.md."""


def _ints(text: str, what: str) -> list:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items or not all(x.isdigit() and int(x) > 0 for x in items):
        raise ValueError(f"bad {what} {text!r}: expected comma-separated positive integers")
    return [int(x) for x in items]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="qkv-bench decoder",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", help=f"decoder presets, comma-separated (default: {DEFAULTS['models']})")
    p.add_argument("--batches", help=f"decode batch sizes (default: {DEFAULTS['batches']})")
    p.add_argument(
        "--prompt", type=int, help=f"prompt tokens before decoding (default: {DEFAULTS['prompt']})"
    )
    p.add_argument("--steps", type=int, help=f"timed decode steps per run (default: {DEFAULTS['steps']})")
    p.add_argument("--prefill", help=f"prefill lengths at batch 1 (default: {DEFAULTS['prefill']})")
    p.add_argument("--rounds", type=int, help=f"timed rounds per point (default: {DEFAULTS['rounds']})")
    p.add_argument("--warmup", type=int, help=f"untimed runs per contender (default: {DEFAULTS['warmup']})")
    p.add_argument(
        "--check-steps",
        type=int,
        help=f"greedy tokens checked against eager, batch {CHECK_BATCH} (default: {DEFAULTS['check_steps']})",
    )
    p.add_argument(
        "--memory-seq",
        type=int,
        help=f"prefill length of the attention memory run, 0 for none (default: {DEFAULTS['memory_seq']})",
    )
    p.add_argument(
        "--memory-scaling",
        help="shorter lengths measured the same way, to show how each peak grows, comma-separated or none "
        f"(default: {DEFAULTS['memory_scaling']})",
    )
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op and torch threads (default: 2)")
    p.add_argument("--spinning", action="store_true", help="leave ORT's thread-pool spinning on")
    p.add_argument(
        "--settle",
        type=float,
        default=0.02,
        metavar="S",
        help="untimed pause before each timed run (PyTorch's threads spin after each op) (default: 0.02)",
    )
    p.add_argument(
        "--genai-python",
        default=str(GENAI_PYTHON),
        help="the Python with onnxruntime-genai, or none (default: %(default)s)",
    )
    p.add_argument("--genai", dest="genai_python", help="alias of --genai-python (none: leave it out)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings for a smoke run: "
        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    p.add_argument("--seed", type=int, default=0, help="weights and prompts seed (default: %(default)s)")
    p.add_argument("--out", type=Path, help="results directory (default: results/bench-decoder-<UTC time>)")
    p.add_argument(
        "--keep-artifacts", action="store_true", help="keep checkpoints and exports under OUT/artifacts"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def check(args) -> str | None:
    """The first problem with the arguments or the installed packages, or None; fills in defaults."""
    from ...model_defs.decoder import DECODER_PRESETS

    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.models = [m.strip() for m in str(args.models).split(",") if m.strip()]
        args.batches = _ints(args.batches, "--batches")
        args.prefill = _ints(args.prefill, "--prefill")
        scaling = str(args.memory_scaling).strip()
        args.memory_scaling = [] if scaling in ("", "none") else _ints(scaling, "--memory-scaling")
    except ValueError as e:
        return str(e)
    unknown = [m for m in args.models if m not in DECODER_PRESETS]
    if unknown or not args.models:
        return f"unknown decoder model {unknown[0] if unknown else ''!r}; known: {', '.join(DECODER_PRESETS)}"
    if min(args.prompt, args.steps, args.rounds, args.check_steps, args.threads) < 1:
        return "--prompt, --steps, --rounds, --check-steps and --threads must be >= 1"
    if args.warmup < 0 or args.settle < 0 or args.memory_seq < 0:
        return "--warmup, --settle and --memory-seq must be >= 0"
    for name in args.models:
        positions = DECODER_PRESETS[name].max_positions
        longest = max(args.prompt + args.steps + 1, args.prompt + args.check_steps + 1, *args.prefill)
        if longest > positions:
            return f"{longest} tokens exceed {name}'s {positions} positions"
    none = str(args.genai_python).strip() in ("", "none")
    args.genai_python = None if none else Path(args.genai_python).absolute()  # not resolve(): a venv link
    for module in ("torch", "transformers", "onnxruntime", "onnxscript", "tokenizers"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install '.[bench]')"
    return None
