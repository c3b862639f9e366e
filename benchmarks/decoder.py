"""qkv-bench decoder: decoder-only LMs with their KV cache, side by side in one run, on this machine's CPU.

For each model (presets of model_defs/decoder.py) a transformers checkpoint is made with random weights of the
preset's shape (GPT2LMHeadModel or LlamaForCausalLM, save_pretrained), and every contender reads that one
checkpoint:
  - onnx-attention, ort-contrib: qkv-export --weights CHECKPOINT on each fused backend, ONNX Runtime CPU
  - onnxruntime-genai: its model builder's output for the checkpoint (fp32, cpu), run by onnxruntime-genai in
    a worker process of a separate Python environment (benchmarks/genai_worker.py), where the builder accepts
    the checkpoint; where it does not, the line that stopped it is the result
  - torch eager: transformers' model from the checkpoint with its own cache (use_cache=True)
Measured: greedy decode tokens/s (a prompt prefilled untimed, then single-token steps, each the greedy pick
and one forward over the cache, fed back), and prefill latency (batch 1, empty cache). Each point warms every
contender up, then runs rounds that time every contender once, in an order rotated by one per round; medians.
Before timing, each contender's first greedy tokens are checked against eager's.
Then the attention memory of a long prefill: layer 0's fused attention node of the first model's artifacts,
alone, at L tokens in a fresh process, against its O(L·d) floor (benchmarks/decoder_memory.py).
"""

import argparse
import inspect
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import decoder_memory
from .timing import MachineLoad, Progress, summarize

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
    from ..model_defs.decoder import DECODER_PRESETS

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


# -- the shared checkpoint --


def hf_config(cfg):
    """transformers' config of the preset `cfg` (model_defs' transformers_config). The end-of-sequence id is
    the last token (onnxruntime-genai's builder requires one); no contender stops on it."""
    from ..model_defs.decoder_families import transformers_config

    ids = dict(bos_token_id=0, eos_token_id=cfg.vocab_size - 1, pad_token_id=0)
    return transformers_config(cfg, initializer_range=INIT_STD, **ids)


def make_checkpoint(cfg, directory: Path, seed: int) -> str:
    """A transformers checkpoint of the preset's shape with random weights (normal, std INIT_STD) and a
    word-level tokenizer over its ids ("t0" ...; the genai builder loads a tokenizer), in `directory`; returns
    the family."""
    import torch
    import transformers as t
    from tokenizers import Tokenizer, models, pre_tokenizers

    t.logging.set_verbosity_error()
    family = "gpt2" if cfg.positions == "learned" else "llama"
    torch.manual_seed(seed)
    model = t.AutoModelForCausalLM.from_config(hf_config(cfg))
    model.save_pretrained(directory)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0").save_pretrained(directory)
    return family


# -- contenders --


class Local:
    """A contender in this process: `step(ids, total)` runs new tokens over the cache it holds and returns the
    last position's logits (B, V); `reset()` empties the cache."""

    def decode(self, prompt: np.ndarray, steps: int, settle: float, margins: bool = False):
        """(seconds of `steps` greedy steps after an untimed prefill of `prompt`, tokens (B, steps)[, top-2
        margins (B, steps)])."""
        self.reset()
        logits = self.step(prompt, prompt.shape[1])
        tokens, gaps = [], []
        time.sleep(settle)
        t0 = time.perf_counter()
        for i in range(steps):
            if margins:
                top2 = np.sort(logits.astype(np.float64), axis=-1)[:, -2:]
                gaps.append(top2[:, 1] - top2[:, 0])
            tokens.append(logits.argmax(-1)[:, None].astype(np.int64))
            logits = self.step(tokens[-1], prompt.shape[1] + i + 1)
        seconds = time.perf_counter() - t0
        self.reset()
        out = (seconds, np.concatenate(tokens, 1))
        return out + (np.stack(gaps, 1),) if margins else out

    def prefill(self, ids: np.ndarray, settle: float) -> float:
        self.reset()
        time.sleep(settle)
        t0 = time.perf_counter()
        self.step(ids, ids.shape[1])
        seconds = time.perf_counter() - t0
        self.reset()
        return seconds

    def close(self):
        pass


class OrtDecoder(Local):
    """An artifact's model.onnx on ONNX Runtime CPU, `present` fed back as `past`."""

    def __init__(self, path: Path, cfg, threads: int, spinning: bool):
        from .contenders import ort_session

        self.session = ort_session(path, threads, spinning)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.layers, self.kv_heads, self.head_dim = cfg.num_layers, cfg.kv_heads, cfg.head_size
        self.past = None

    def reset(self):
        self.past = None

    def step(self, ids, total):
        batch, seq = ids.shape
        if self.past is None:
            empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
            self.past = {
                f"past_key_values.{i}.{t}": empty for i in range(self.layers) for t in ("key", "value")
            }
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((batch, total), np.int64),
            "position_ids": np.ascontiguousarray(
                np.broadcast_to(np.arange(total - seq, total), (batch, seq))
            ),
            **self.past,
        }
        out = dict(zip(self.outputs, self.session.run(None, feeds)))
        self.past = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n != "logits"}
        return out["logits"][:, -1]


class EagerDecoder(Local):
    """transformers' model from the checkpoint (its default attention), with its own cache."""

    def __init__(self, checkpoint: Path):
        import transformers as t

        self.model = t.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        self.cache = None
        # transformers 5.x renamed the forward's `past_key_values` to `cache` (the old name warns)
        forward = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward else "past_key_values"

    def reset(self):
        self.cache = None

    def step(self, ids, total):
        import torch

        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.ones((ids.shape[0], total), dtype=torch.int64),
                use_cache=True,
                **{self.cache_arg: self.cache},
            )
        self.cache = out.cache if self.cache_arg == "cache" else out.past_key_values
        return out.logits[:, -1].numpy()


class GenaiDecoder:
    """onnxruntime-genai in a worker process of its own environment (benchmarks/genai_worker.py)."""

    def __init__(self, python: Path, model_dir: Path, threads: int, spinning: bool, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [str(python), str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            cwd=model_dir,
        )
        self.versions = self.call(
            {"op": "load", "dir": str(model_dir), "threads": threads, "spinning": spinning}
        )

    def call(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            tail = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
            raise RuntimeError(f"the genai worker exited: {tail[-1][:300] if tail else 'no output'}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def decode(self, prompt, steps, settle, margins=False):
        a = self.call({"op": "decode", "prompt": prompt.tolist(), "steps": steps, "settle": settle})
        return a["s"], np.asarray(a["tokens"], np.int64)

    def prefill(self, ids, settle):
        return self.call({"op": "prefill", "ids": ids.tolist(), "settle": settle})["s"]

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def _error_line(text: str, replace: dict) -> str:
    """The line that says what stopped a process: the last `SomethingError: ...` line, else the last line."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    errors = [x for x in lines if re.match(r"^([\w.]+)?(Error|Exception)\b", x.split(":")[0].split(".")[-1])]
    line = (errors or lines or ["no output"])[-1]
    for old, new in replace.items():
        line = line.replace(old, new)
    return line[:400]


def build_genai(python: Path, checkpoint: Path, out: Path) -> dict:
    """Run onnxruntime-genai's model builder on the checkpoint (fp32, cpu): {ok, s, ops} or {error}."""
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out)]
    cmd += ["-p", "fp32", "-e", "cpu", "-c", str(out.parent / f"{out.name}-cache")]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=out.parent)
    except subprocess.TimeoutExpired:
        return {"error": "the builder ran past 900 s", "command": _shown(cmd, checkpoint, out)}
    seconds = time.perf_counter() - t0
    if p.returncode != 0 or not (out / "genai_config.json").is_file():
        line = _error_line(p.stderr + "\n" + p.stdout, {str(checkpoint): "<checkpoint>"})
        return {"error": f"exit code {p.returncode}: {line}", "command": _shown(cmd, checkpoint, out)}
    import onnx

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node
    )
    return {"ok": True, "s": seconds, "ops": dict(ops.most_common()), "command": _shown(cmd, checkpoint, out)}


def _shown(cmd: list, checkpoint: Path, out: Path) -> str:
    return (
        shlex.join(["python", *cmd[1:]])
        .replace(str(checkpoint), "<checkpoint>")
        .replace(str(out.parent), "<work>")
    )


# -- timing --


def rounds(calls: dict, warmup: int, n: int, settle: float, progress: Progress, label: str) -> tuple:
    """({name: [seconds]}, {name: error}) for `calls` ({name: fn(settle) -> seconds}): `warmup` untimed calls
    each, then `n` rounds calling every contender once, starting one further along each round. A contender
    that raises is dropped from the point with its error."""
    errors = {}
    names = list(calls)
    for name in list(names):
        try:
            for _ in range(warmup):
                calls[name](settle)
        except Exception as e:
            errors[name] = _first_line(e)
            names.remove(name)
    times = {name: [] for name in names}
    for r in range(n):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            if name in errors:
                continue
            try:
                times[name].append(calls[name](settle))
            except Exception as e:
                errors[name] = _first_line(e)
        progress.step(f"{label} round {r + 1}/{n}")
    return {k: v for k, v in times.items() if k not in errors}, errors


def _first_line(e: Exception) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:300]}"


def greedy_check(contenders: dict, prompt: np.ndarray, steps: int) -> dict:
    """Every contender's first `steps` greedy tokens from `prompt` against eager's: {name: {equal,
    first_diff}}, and eager's smallest top-2 logit margin over them."""
    _, want, margins = contenders[EAGER].decode(prompt, steps, 0.0, margins=True)
    result = {
        "batch": int(prompt.shape[0]),
        "steps": steps,
        "eager_min_margin": float(margins.min()),
        "by": {},
    }
    result["eager_tokens"] = want.tolist()
    for name, c in contenders.items():
        if name == EAGER:
            continue
        try:
            _, got = c.decode(prompt, steps, 0.0)[:2]
        except Exception as e:
            result["by"][name] = {"equal": False, "error": _first_line(e)}
            continue
        equal = bool(np.array_equal(got, want))
        entry = {"equal": equal}
        if not equal:
            b, s = (int(i) for i in np.argwhere(got != want)[0])
            entry["first_diff"] = f"row {b} step {s + 1}: {int(got[b, s])}, eager {int(want[b, s])}"
        result["by"][name] = entry
    return result


def model_run(name: str, args, work: Path, progress: Progress, results: dict) -> list:
    """Export, build, check and time every contender of one model; returns failures."""
    import torch

    from ..export.pipeline import export_artifact
    from ..model_defs.decoder import DECODER_PRESETS, decoder_param_count

    cfg = DECODER_PRESETS[name]
    failures, skipped, build = [], {}, {}
    ckpt = work / f"{name}-checkpoint"
    family = make_checkpoint(cfg, ckpt, args.seed)
    entry = {
        "config": cfg.to_dict(),
        "family": family,
        "parameters": decoder_param_count(cfg),
        "checkpoint": f"transformers {'GPT2LMHeadModel' if family == 'gpt2' else 'LlamaForCausalLM'}, random "
        f"normal weights (std {INIT_STD}, torch seed {args.seed}), save_pretrained",
    }
    contenders, artifacts = {}, {}
    for backend in BACKENDS:
        progress.step(f"{name}: export {backend}", 0)
        t0 = time.perf_counter()
        try:
            out = work / f"{name}-{backend}"
            manifest = export_artifact(name, out, backend, weights_dir=ckpt, seed=args.seed)
            if manifest["model"]["config"] != cfg.to_dict():
                results["notes"].append(f"- {name} {backend}: the exported config differs from the preset's")
            contenders[backend] = OrtDecoder(out / "model.onnx", cfg, args.threads, args.spinning)
            artifacts[backend] = out
            build[backend] = {"s": time.perf_counter() - t0, "ops": manifest["op_counts"]}
        except Exception as e:
            skipped[backend] = f"export failed: {_first_line(e)}"
            failures.append(f"{name} {backend}: {skipped[backend]}")
        progress.step(f"{name}: exported {backend}")
    progress.step(f"{name}: onnxruntime-genai", 0)
    if args.genai_python is None:
        skipped[GENAI] = "not run (--genai none)"
    elif not args.genai_python.is_file():
        skipped[GENAI] = f"not run: no {args.genai_python} (bash scripts/setup_genai.sh makes it)"
    else:
        built = build_genai(args.genai_python, ckpt, work / f"{name}-genai")
        build[GENAI] = built
        if "error" in built:
            skipped[GENAI] = f"the model builder refused the checkpoint: {built['error']}"
        else:
            try:
                worker = GenaiDecoder(
                    args.genai_python,
                    work / f"{name}-genai",
                    args.threads,
                    args.spinning,
                    work / f"{name}-genai.log",
                )
                contenders[GENAI] = worker
                results["genai_versions"] = worker.versions
            except Exception as e:
                skipped[GENAI] = f"onnxruntime-genai could not load the builder's model: {_first_line(e)}"
                failures.append(f"{name} {GENAI}: {skipped[GENAI]}")
    progress.step(f"{name}: onnxruntime-genai done")
    torch.set_num_threads(args.threads)
    contenders[EAGER] = EagerDecoder(ckpt)
    rng = np.random.default_rng([args.seed, 23])
    ids = lambda b, s: rng.integers(0, cfg.vocab_size - 1, (b, s), dtype=np.int64)  # noqa: E731
    progress.step(f"{name}: greedy check", 0)
    entry["check"] = greedy_check(contenders, ids(CHECK_BATCH, args.prompt), args.check_steps)
    for other, verdict in entry["check"]["by"].items():
        if not verdict["equal"]:
            failures.append(
                f"{name} {other}: greedy tokens differ from eager's: "
                + (verdict.get("first_diff") or verdict["error"])
            )
    progress.step(f"{name}: greedy checked")
    points = {}
    for batch in args.batches:
        prompt = ids(batch, args.prompt)
        calls = {n: (lambda s, c=c, p=prompt: c.decode(p, args.steps, s)[0]) for n, c in contenders.items()}
        times, errors = rounds(
            calls, args.warmup, args.rounds, args.settle, progress, f"{name} decode b{batch}"
        )
        points[f"decode b{batch}"] = _point("decode", batch, args.steps, times, errors)
    for seq in args.prefill:
        prompt = ids(1, seq)
        calls = {n: (lambda s, c=c, p=prompt: c.prefill(p, s)) for n, c in contenders.items()}
        times, errors = rounds(
            calls, args.warmup, args.rounds, args.settle, progress, f"{name} prefill {seq}"
        )
        points[f"prefill {seq}"] = _point("prefill", 1, seq, times, errors)
    for key, p in points.items():
        failures += [f"{name} {key} {n}: {e}" for n, e in p["errors"].items()]
    for c in contenders.values():
        c.close()
    entry.update(contenders=list(contenders), skipped=skipped, build=build, points=points)
    entry["artifacts"] = {b: str(p) for b, p in artifacts.items()}
    results["models"][name] = entry
    return failures


def _point(kind: str, batch: int, n: int, times: dict, errors: dict) -> dict:
    """One point's numbers: per contender its summary (ms), and tokens/s (decode: batch·steps per timed run)
    or ms (prefill), each against eager's."""
    point = {"kind": kind, "batch": batch, "errors": errors, "contenders": {}}
    point["steps" if kind == "decode" else "seq"] = n
    eager = np.median(times[EAGER]) if EAGER in times else None
    for name, samples in times.items():
        med = float(np.median(samples))
        c = {"summary": summarize(samples), "samples_ms": [round(t * 1e3, 3) for t in samples]}
        if kind == "decode":
            c["tokens_per_s"] = batch * n / med
            c["ms_per_step"] = med / n * 1e3
        c["speedup_vs_eager"] = float(eager / med) if eager else None
        point["contenders"][name] = c
    return point


def memory_run(args, results: dict, work: Path, progress: Progress) -> list:
    """Layer 0's fused attention of the first model's artifacts at --memory-seq tokens (and the
    --memory-scaling lengths), one process each."""
    first = args.models[0]
    entry = results["models"].get(first, {})
    cfg = entry.get("config")
    out = {"model": first, "seq": args.memory_seq, "backends": {}, "errors": {}, "scaling": []}
    if not cfg:
        return [f"memory: {first} did not run"]
    out["floor"] = decoder_memory.floor_bytes(args.memory_seq, cfg)
    out["shape"] = (
        f"{first} layer 0: {cfg['num_heads']} heads ({cfg['num_kv_heads'] or cfg['num_heads']} kv), "
        f"hidden {cfg['hidden_size']}, head_dim {decoder_memory.head_dim(cfg)}"
    )
    failures, graphs = [], {}
    for backend, artifact in entry.get("artifacts", {}).items():
        try:
            graph = work / f"attention0-{backend}.onnx"
            graphs[backend] = graph, decoder_memory.cut_attention(Path(artifact) / "model.onnx", graph, cfg)
        except Exception as e:
            out["errors"][backend] = _first_line(e)
            failures.append(f"memory {backend}: {out['errors'][backend]}")
    for seq in sorted(set(args.memory_scaling + [args.memory_seq])):
        point = {"seq": seq, "floor": decoder_memory.floor_bytes(seq, cfg), "peak_mb": {}}
        for backend, (graph, spec) in graphs.items():
            progress.step(f"memory {backend} {seq}", 0)
            r = decoder_memory.measure(graph, seq, args.threads)
            if "error" in r:
                out["errors"][f"{backend} {seq}"] = r["error"]
                failures.append(f"memory {backend} {seq}: {r['error']}")
            else:
                point["peak_mb"][backend] = r["peak_mb"]
                if seq == args.memory_seq:
                    out["backends"][backend] = {
                        "op": spec["op"],
                        "peak_mb": r["peak_mb"],
                        "baseline_mb": r["baseline_mb"],
                    }
            progress.step(f"memory {backend} {seq} done")
        out["scaling"].append(point)
    results["memory"] = out
    return failures


def growth(mem: dict, backend: str, op: str) -> tuple | None:
    """(exponent, [(L, MiB)]) of the peak above the floor and the mask input over the measured lengths: how
    what the kernel adds grows with L (1: linear, 2: quadratic), from the two longest; None below two."""
    rows = []
    for p in mem.get("scaling", []):
        if backend in p["peak_mb"]:
            mask = p["floor"]["mask_bool"] if op == "Attention" else p["floor"]["bias_fp32"]
            rows.append((p["seq"], p["peak_mb"][backend] - (p["floor"]["floor"] + mask) / MiB))
    if len(rows) < 2 or min(r[1] for r in rows[-2:]) <= 0:
        return None
    (l1, a), (l2, b) = rows[-2:]
    return float(np.log(b / a) / np.log(l2 / l1)), rows


# -- report --

MiB = 2**20


def _cell(point: dict | None, name: str, key: str, fmt) -> str:
    if point is None:
        return "—"
    c = point["contenders"].get(name)
    if c is None:
        return "failed" if name in point["errors"] else "—"
    value = c["summary"]["median_ms"] if key == "ms" else c.get(key)
    return fmt(value) if value is not None else "—"


def _num(value: float) -> str:
    """Three significant figures below 100, whole numbers above."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def model_table(name: str, m: dict, r: dict) -> list:
    cfg = m["config"]
    kv = cfg["num_kv_heads"] or cfg["num_heads"]
    decodes = [k for k in m["points"] if k.startswith("decode")]
    prefills = [k for k in m["points"] if k.startswith("prefill")]
    lines = [
        f"## {name} ({m['parameters']:,} parameters: {cfg['num_layers']} layers, "
        f"hidden {cfg['hidden_size']}, "
        f"{cfg['num_heads']} heads / {kv} kv, FFN {cfg['ffn_size']}, vocab {cfg['vocab_size']})",
        "",
        f"Checkpoint: {m['checkpoint']}; every contender reads it.",
        "",
        "| contender | "
        + " | ".join(f"tokens/s {k.split()[1]}" for k in decodes)
        + " | "
        + " | ".join(f"prefill ms {k.split()[1]}" for k in prefills)
        + " | "
        + " | ".join(
            f"vs eager {k.replace('decode ', 'decode ').replace('prefill ', 'prefill ')}"
            for k in decodes + prefills
        )
        + " | greedy = eager |",
        "|---|" + "---:|" * (2 * (len(decodes) + len(prefills))) + "---|",
    ]
    names = list(m["contenders"]) + [n for n in m["skipped"] if n not in m["contenders"]]
    for n in names:
        if n in m["skipped"]:
            lines.append(f"| {n} | " + " | ".join(["—"] * (2 * (len(decodes) + len(prefills)))) + " | — |")
            continue
        points = m["points"]
        cells = [_cell(points[k], n, "tokens_per_s", _num) for k in decodes]
        cells += [_cell(points[k], n, "ms", _num) for k in prefills]
        cells += [_cell(points[k], n, "speedup_vs_eager", "{:.2f}×".format) for k in decodes + prefills]
        check = m["check"]["by"].get(n)
        verdict = "(reference)" if n == EAGER else ("yes" if check and check["equal"] else "**no**")
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {verdict} |")
    lines.append("")
    for n, why in m["skipped"].items():
        lines.append(f"- {n}: {why}")
    c = m["check"]
    lines += [
        f"- greedy check: {c['steps']} greedy tokens at batch {c['batch']} from the same prompt, "
        "each contender "
        f"against eager's: "
        + ", ".join(
            f"{n} " + ("equal" if v["equal"] else f"DIFFERENT ({v.get('first_diff') or v.get('error', '')})")
            for n, v in c["by"].items()
        )
        + f" (eager's smallest top-2 logit margin over them {c['eager_min_margin']:.3g}).",
    ]
    spread = []
    for k, p in m["points"].items():
        cells = [
            f"{n} {c['summary']['median_ms']:.1f} ({c['summary']['p25_ms']:.1f}–{c['summary']['p75_ms']:.1f})"
            for n, c in p["contenders"].items()
        ]
        spread.append(f"  - {k}: " + "; ".join(cells))
    lines += ["- median ms per timed run (IQR):", *spread]
    for n, b in m["build"].items():
        if "ops" in b:
            fused = [f"{op} {k}" for op, k in b["ops"].items() if "Attention" in op or "Norm" in op]
            lines.append(
                f"- {n}: built in {b['s']:.0f} s; {sum(b['ops'].values())} nodes, of them " + ", ".join(fused)
            )
    return lines + [""]


def memory_section(mem: dict) -> list:
    f = mem["floor"]
    seq = mem["seq"]
    lines = [
        f"## Attention memory of a {seq}-token prefill (batch 1, float32)",
        "",
        f"One node: {mem['shape']}, its fused attention op cut from each artifact, alone in a fresh process "
        "(benchmarks/decoder_memory.py); peak RSS above the process once the session exists. Floor: Q, K, V, "
        "the output and the cache it returns (present key and value), O(L·d). The mask comes in as the "
        "artifact's graph builds it (a (1, 1, L, L) boolean for Attention, an additive (1, 1, L, L) float32 "
        "bias for GroupQueryAttention) and counts in the peak.",
        "",
        "| backend | op | peak MiB | floor MiB | floor + its mask input MiB | peak / floor |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for backend, b in mem["backends"].items():
        mask = f["mask_bool"] if b["op"] == "Attention" else f["bias_fp32"]
        lines.append(
            f"| {backend} | {b['op']} | {b['peak_mb']:.0f} | {f['floor'] / MiB:.0f} "
            f"| {(f['floor'] + mask) / MiB:.0f} "
            f"| {b['peak_mb'] * MiB / f['floor']:.1f}× |"
        )
    lines.append("")
    lines.append(
        f"For scale: one fp32 L×L score matrix per head is {f['scores'] / MiB:.0f} MiB at L = {seq}."
    )
    for backend, e in mem["errors"].items():
        lines.append(f"- {backend}: {e}")
    if len(mem.get("scaling", [])) > 1:
        backends = list(mem["backends"])
        lines += [
            "",
            "How the peaks grow (MiB; the same node and process at each length):",
            "",
            "| L | " + " | ".join(backends) + " | floor | one fp32 L×L per head |",
            "|---:|" + "---:|" * (len(backends) + 2),
        ]
        for p in mem["scaling"]:
            cells = [f"{p['peak_mb'][b]:.0f}" if b in p["peak_mb"] else "failed" for b in backends]
            lines.append(
                f"| {p['seq']} | " + " | ".join(cells) + f" | {p['floor']['floor'] / MiB:.0f} "
                f"| {p['floor']['scores'] / MiB:.0f} |"
            )
        lines.append("")
        for b in backends:
            g = growth(mem, b, mem["backends"][b]["op"])
            if g:
                above = ", ".join(f"{mb:.0f} at {seq}" for seq, mb in g[1])
                lines.append(
                    f"- {b}: the peak above the floor and its mask input ({above} MiB) grows as L^{g[0]:.1f} "
                    "between the two longest."
                )
    lines += ["", recommendation(mem), ""]
    return lines


def recommendation(mem: dict) -> str:
    b = mem["backends"]
    if len(b) < 2:
        return "Not both backends measured: no recommendation."
    best = min(b, key=lambda k: b[k]["peak_mb"])
    other = next(k for k in b if k != best)
    scores = mem["floor"]["scores"] / MiB
    ratio = b[other]["peak_mb"] / max(b[best]["peak_mb"], 1e-9)
    if ratio < 1.5:
        return (
            f"At {mem['seq']} tokens the two backends' attention peaks are within 1.5× of each other "
            f"({best} {b[best]['peak_mb']:.0f} MiB, {other} {b[other]['peak_mb']:.0f} MiB): "
            "no memory reason to "
            "pick one at this length."
        )
    text = (
        f"Long contexts: **{best}**. At {mem['seq']} tokens its attention peaked at {b[best]['peak_mb']:.0f} "
        f"MiB, {other}'s at {b[other]['peak_mb']:.0f} MiB ({ratio:.1f}×)"
    )
    if b[other]["peak_mb"] >= 0.8 * scores:
        text += (
            f", about the {scores:.0f} MiB of one fp32 L×L score matrix per head: "
            "ONNX Runtime's CPU kernel for "
            f"{b[other]['op']} materializes the scores, so its memory grows with L², while "
            f"{b[best]['op']} stays within "
            f"{b[best]['peak_mb'] * MiB / mem['floor']['floor']:.1f}× the O(L·d) floor."
        )
        if b[best]["op"] == "GroupQueryAttention":
            text += (
                f" Its one L² term left is the graph's, not the kernel's: the additive fp32 padding bias "
                f"(1, 1, L, L) the ort-contrib graph builds, {mem['floor']['bias_fp32'] / MiB:.0f} MiB here "
                "(4·L² bytes)."
            )
    else:
        text += "."
    return text


def markdown(r: dict) -> str:
    lines = [
        f"# qkv-bench decoder: {', '.join(r['models'])} (float32)",
        "",
        f"- command: `{r['command']}`",
        f"- when: {r['started']} ({r['wall_s']:.0f} s)",
        f"- machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, "
        f"{r['machine']['memory_gib']:.0f} GiB",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
    ]
    if r.get("genai_versions"):
        g = r["genai_versions"]
        lines.append(
            f"- onnxruntime-genai {g['genai']} on onnxruntime {g['onnxruntime']} (its own environment)"
        )
    lines += [
        f"- settings: {r['settings']['note']}",
        "- background load: other processes took "
        f"{r.get('machine_load', {}).get('other', 0):.0%} of all cores' "
        "time during the run",
        "",
    ]
    for name, m in r["models"].items():
        lines += model_table(name, m, r)
    if r.get("memory"):
        lines += memory_section(r["memory"])
    lines += r.get("notes", [])
    return "\n".join(lines) + "\n"


# -- main --


def run(args, work: Path) -> tuple:
    from ..versions import package_versions

    points = len(args.batches) + len(args.prefill)
    n_memory = (len(set(args.memory_scaling + [args.memory_seq])) * len(BACKENDS)) if args.memory_seq else 0
    n_steps = len(args.models) * (len(BACKENDS) + 2 + args.rounds * points) + n_memory
    progress = Progress(n_steps, enabled=not args.no_progress)
    load = MachineLoad()
    results = {
        "mode": "decoder",
        "models": {},
        "started": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
        "versions": package_versions(),
        "notes": [],
        "settings": {
            "threads": args.threads,
            "spinning": args.spinning,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "prompt": args.prompt,
            "steps": args.steps,
            "batches": args.batches,
            "prefill": args.prefill,
            "settle_s": args.settle,
            "note": f"ORT CPU (ours and genai's), intra-op threads {args.threads}, inter-op 1, thread-pool "
            f"spinning {'on' if args.spinning else 'off'}; torch.set_num_threads({args.threads}), "
            f"inference_mode; decode: a {args.prompt}-token prompt prefilled untimed, then {args.steps} "
            "timed greedy steps (pick + one forward over the cache), "
            f"tokens/s = batch × {args.steps} / median time; prefill: batch 1, empty cache, full logits; "
            f"{args.warmup} warm-up run(s) per contender and point, {args.rounds} rounds in rotated order, "
            f"{args.settle * 1e3:.0f} ms untimed pause before each timed run; prompts random ids, "
            "rows unpadded",
        },
    }
    try:
        import transformers

        results["versions"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    failures = []
    for name in args.models:
        try:
            failures += model_run(name, args, work, progress, results)
        except Exception as e:
            failures.append(f"{name}: {_first_line(e)}")
    if args.memory_seq:
        failures += memory_run(args, results, work, progress)
    progress.close()
    results["machine_load"] = load.shares()
    if results["machine_load"].get("other", 0) > 0.05:
        results["notes"].append(
            f"- other processes used {results['machine_load']['other']:.0%} of this machine's CPU time "
            "during the "
            "run: timings are slower and noisier than on an idle machine."
        )
    results["failures"] = failures
    results["notes"] += [f"- failed: {f}" for f in failures]
    return results, bool(failures)


def main(argv) -> int:
    from .cli import fail, machine
    from .report import write_json

    args = parse_args(argv)
    problem = check(args)
    if problem:
        return fail(problem)
    out = args.out or Path("results") / f"bench-decoder-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return fail(f"cannot create {out}: {e}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qkv-bench-decoder-") as tmp:
        work = out / "artifacts" if args.keep_artifacts else Path(tmp)
        work.mkdir(exist_ok=True)
        results, failed = run(args, work.resolve())
    results.update(
        command="qkv-bench decoder " + shlex.join(argv),
        machine=machine(),
        wall_s=time.perf_counter() - started,
    )
    write_json(results, out / "results.json")
    (out / "results.md").write_text(markdown(results))
    print(f"wrote {out}/results.md, results.json")
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
