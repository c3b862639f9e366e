"""`qkv-bench decoder`: run every model and the memory measure, write results.json and results.md."""

import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ..timing import MachineLoad, Progress
from .measure import _first_line, memory_run, model_run
from .options import BACKENDS, EXIT_FAILED, EXIT_OK, check, parse_args
from .report import markdown


def run(args, work: Path) -> tuple:
    from ...versions import package_versions

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
    from ..machine import fail, machine
    from ..report import write_json

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
