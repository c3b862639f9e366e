"""What `qkv-bench decoder` measures: interleaved rounds, the greedy check, each model's points, the
attention memory of a long prefill."""

import time
from pathlib import Path

import numpy as np

from ..timing import Progress, summarize
from . import memory as decoder_memory
from .contenders import EagerDecoder, GenaiDecoder, OrtDecoder, build_genai, make_checkpoint
from .options import BACKENDS, CHECK_BATCH, EAGER, GENAI, INIT_STD, MiB


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

    from ...export.pipeline import export_artifact
    from ...model_defs.decoder import DECODER_PRESETS, decoder_param_count

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
