"""qkv-validate: verify artifacts and judge their parity on each runtime."""

import argparse
import os
import sys
import time
from pathlib import Path

from ..threads import POLICY

os.environ.update({**POLICY, **os.environ})  # before numpy and torch load their thread pools

from ..errors import (
    EXIT_NOT_JUDGED,
    EXIT_OK,
    ArtifactError,
    ParityFailure,
    ProviderError,
    UsageError,
    one_line,
    report_error,
    run_cli,
    show,
)
from ..graph_weights import weights_sha256
from ..stages import add_progress_flag, reporting_progress, stage
from .artifact import load_artifact
from .attention_maps import write_maps
from .budget import available, parse_size
from .junit import junit_xml
from .parity import LONGEST, compare_backends, localize, validate_artifact
from .report import markdown, matrix_markdown, to_json
from .runtimes import RUNTIMES, select_runtimes
from .step_summary import append_step_summary, summary_markdown

PROG = "qkv-validate"
STAGE_PROBE, STAGE_REPORT, STAGE_MAPS = "probe runtimes (CUDA, ...)", "report", "attention maps"
EPILOG = """exit codes:
  0  every check passed, and on every artifact a gating runtime's outputs were compared
  1  a parity check failed (numbers out of tolerance, NaN/Inf, a run that errored)
  2  an artifact or argument is invalid: missing file, sha256 mismatch, onnx.checker
     error, unknown provider, a provider that cannot run here (cuda without its libraries,
     openvino not installed: the line gives the install command) or cannot run the artifact
     (a node it has no kernel for; CUDA never falls back to the CPU); one line on stderr
     names the file and why. A runtime that cannot load an artifact does not stop the
     others: the report and the compatibility matrix still show what they found.
  3  internal error: a bug in qkv-onnx, not in the artifact (the traceback is printed;
     please report it)
  4  not judged: nothing failed, but on some artifact no gating runtime compared the
     graph's outputs with a reference (only a non-gating runtime ran, e.g. openvino-default
     alone): integrity and PyTorch against the oracle say nothing about the graph.
     --allow-unjudged makes this exit 0 (the report still says NOT JUDGED)

What the graph check proves (docs/guarantees.md):
  rebuild     where torch is installed and the exporter versions (qkv-onnx, torch, onnx,
              onnxscript, onnx-ir) are the manifest's: model.onnx is rebuilt from the manifest's
              model and weights.npz and must be byte-identical: it is the exporter's graph.
  structural  otherwise (no torch, other versions, --no-rebuild, --no-torch): the graph's ops,
              their counts, inputs, outputs and initializers must be what the exporter writes
              for that model (a table derived from real exports), weights byte for byte.
Either way, before anything is parsed, sizes are bounded by the manifest's own model, each
file is read once (hashed into a private copy that everything else reads), and onnx.checker
(structural mode) and every runtime run in a child process under a memory and a time limit
(--memory-limit, --time-limit; a limit hit is exit 2 naming the file and the limit).

Each artifact is compared, on several shapes (batch 1 and 3, sequence 1, 7 and 128, padded
rows, a row that is all padding) and on its golden data, with the NumPy float64 oracle, with
the golden PyTorch outputs, and with a live PyTorch run where torch is installed. Artifacts
of one model and weights from different backends are also compared with each other.
The report opens with a compatibility matrix per model: artifact (backend, dtype) x runtime
-> loads, runs, parity (worst error against the oracle and the tolerance it was judged at).

OpenVINO (pip install 'qkv-onnx[openvino]'): `openvino` runs with INFERENCE_PRECISION_HINT=f32
and is judged like ORT; `openvino-default` runs with the CPU plugin's defaults (bf16 on a CPU
with bfloat16 instructions), judged at the tolerance of the precision it computes in and
reported without deciding the exit code (its run errors and NaN/Inf still do); `auto` leaves it
out where that default is f32 (it would repeat `openvino`), name it to run it anyway.

In CI: --junit FILE writes JUnit XML (one testsuite per artifact, one testcase per runtime x
reference x output, worst case over all inputs: failure = out of tolerance, error = a run that
failed or NaN/Inf, a runtime that cannot load it, an invalid artifact; skipped = a runtime not run,
with the reason). Where GITHUB_STEP_SUMMARY is set (GitHub Actions), the verdict, the matrix and
the failing rows are appended to that file, the job's summary page; if it cannot be written, a
warning goes to stderr and the exit code is unchanged. --json, --report and --junit are checked
before anything runs: a missing or unwritable directory, or a directory given as FILE, is exit 2."""


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "artifacts", nargs="+", type=Path, metavar="DIR", help="artifact directories written by qkv-export"
    )
    p.add_argument(
        "--providers",
        default="auto",
        help="comma-separated runtimes: "
        + ", ".join(f"{k} ({v.label})" for k, v in RUNTIMES.items())
        + "; or auto: every one that works here, skipping with a note a runtime that lacks an "
        "artifact's ops or dtype (reference: com.microsoft ops; cpu: bfloat16) (default: %(default)s)",
    )
    p.add_argument(
        "--matrix",
        action="store_true",
        help="print only the compatibility matrix (--report and --json still get everything)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write every check as JSON")
    p.add_argument(
        "--report", type=Path, metavar="FILE.md", help="write the Markdown table here instead of stdout"
    )
    p.add_argument(
        "--junit",
        type=Path,
        metavar="FILE",
        help="write JUnit XML for CI test reports (GitHub Actions, GitLab, Jenkins)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the fresh random inputs (default: %(default)s)"
    )
    p.add_argument(
        "--no-torch",
        action="store_true",
        help="do not use torch even if it is installed: no live PyTorch comparison, no rebuild (the graph is "
        "held to the structural contract)",
    )
    p.add_argument(
        "--allow-unjudged",
        action="store_true",
        help="exit 0 instead of 4 when nothing failed but no gating runtime compared an artifact's outputs "
        "(e.g. --providers openvino-default alone): the report still says NOT JUDGED",
    )
    p.add_argument(
        "--no-rebuild",
        action="store_true",
        help="skip rebuilding model.onnx with the exporter (one export of the model) and hold the graph "
        "to the structural contract instead; the live PyTorch comparison still runs",
    )
    p.add_argument(
        "--memory-limit",
        type=float,
        metavar="GIB",
        help="address space of each sandboxed process (onnx.checker, each runtime), in GiB (default: sized "
        "from the model: 2 GiB + 4x the model's bytes + 64 MiB per CPU)",
    )
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory validation may take in all, e.g. 16G or 800M (default: what the machine has available "
        "when it starts). Its stages are planned to fit from the manifest's sizes: the oracle converts "
        "weights to float64 per read instead of once, the rebuild runs after the runtimes instead of "
        "beside them, and a stage that still cannot fit is not run, with a line saying so in the report "
        "(the structural contract instead of the rebuild; a runtime not run leaves the verdict NOT JUDGED)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="wall-clock limit of each sandboxed step: opening a session, one run, onnx.checker (default: "
        "sized from the model: 120 s + 240 s per GiB of model)",
    )
    p.add_argument(
        "--text",
        action="append",
        metavar="SENTENCE",
        help="also run these sentences (repeatable), tokenized with the artifact's own tokenizer "
        "files and padded to one batch; for artifacts exported from a checkpoint",
    )
    p.add_argument(
        "--long",
        action="store_true",
        help="also judge a batch of two at the longest sequence the model takes (its position table: 512 "
        "tokens for BERT; 512 for a model without one; at most 2048), the second row padded: kernels may "
        "switch paths past the default cases' 128 tokens. The float64 oracle's cost grows with it",
    )
    p.add_argument("--text-file", type=Path, metavar="FILE", help="sentences, one per line, as with --text")
    p.add_argument(
        "--locate",
        action="store_true",
        help="run every runtime with the artifact's taps (the values at each sublayer boundary) exposed and "
        "compare each with the oracle: a per-layer table and the first divergence. Done anyway, for the "
        "failing runtimes and cases, when a parity check fails",
    )
    p.add_argument(
        "--plots", type=Path, metavar="DIR", help="write a plot of error against depth per located artifact"
    )
    p.add_argument(
        "--attention-maps",
        type=Path,
        metavar="DIR",
        help="take the attention probabilities from the artifact's own attention op on the first gating "
        "runtime (on the --text sentences, else golden set 0), check them against the oracle (rows sum to 1, "
        "padded keys are 0) and write DIR/ARTIFACT/layer_K.png heatmaps and attention.json (entropy, mean "
        "distance, local mass per head). onnx-attention and decomposed artifacts; ort-contrib's ops expose "
        "none (exit 2)",
    )
    add_progress_flag(p)
    return p.parse_args(argv)


OUTPUTS = ("json", "report", "junit")


def check_outputs(args) -> None:
    """Before anything runs: each output FILE can be written (its directory exists and is writable, it is
    not a directory) and no two outputs share a file. Raises UsageError (exit 2)."""
    seen = {}
    for flag in OUTPUTS:
        path = getattr(args, flag)
        if path is None:
            continue
        where = f"--{flag} {path}"
        if path.is_dir():
            raise UsageError(f"{where}: is a directory; give a file name")
        parent = path.parent
        if not parent.is_dir():
            what = "is not a directory" if parent.exists() else "does not exist"
            raise UsageError(f"{where}: directory {parent} {what}")
        if path.exists():
            if not os.access(path, os.W_OK):
                raise UsageError(f"{where}: the file is not writable")
        elif not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{where}: directory {parent} is not writable")
        key = path.resolve()
        if key in seen:
            raise UsageError(f"{where}: the same file as --{seen[key]}")
        seen[key] = flag


def run(args) -> int:
    check_outputs(args)
    for flag, value in (("--memory-limit", args.memory_limit), ("--time-limit", args.time_limit)):
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be a positive number, got {value}")
    memory = None if args.memory_limit is None else int(args.memory_limit * (1 << 30))
    try:
        budget = available() if args.max_memory is None else parse_size(args.max_memory)
    except ValueError as e:
        raise UsageError(f"--max-memory: {e}") from None
    with stage(STAGE_PROBE):
        selection = select_runtimes(args.providers)
    providers, notes, auto = selection.names, selection.notes, selection.auto
    sentences = []
    if args.text or args.text_file:
        from ..text import read_sentences

        sentences = read_sentences(args.text, args.text_file)
    reports, invalid, seconds = [], {}, []
    rebuild = not (args.no_torch or args.no_rebuild)
    for directory in args.artifacts:
        start = time.perf_counter()
        artifact = None
        try:  # the artifact's own problems are ArtifactError/ProviderError; anything else is our bug
            artifact = load_artifact(
                directory,
                rebuild,
                memory,
                args.time_limit,
                background=True,
                budget=budget,
                runtimes=len(providers),
                tokens=2 * LONGEST if args.long else 256,
            )
            report = validate_artifact(
                artifact, providers, args.seed, not args.no_torch, auto, sentences, args.long
            )
            if len(args.artifacts) > 1:  # which hold the same weights, however each graph stores them
                report.weights_sha256 = weights_sha256(artifact.weights)
            if args.locate and "taps" not in artifact.manifest:
                report.errors.append(
                    f"{show(directory)}: --locate: the artifact has no taps (exported by qkv-onnx 0.1)"
                )
            elif args.locate or not report.passed:
                localize(report, artifact, everything=args.locate)
            report.forget_traces()
            if args.attention_maps:
                with stage(STAGE_MAPS):
                    write_maps(report, artifact, args.attention_maps, sentences)
            artifact.check_unchanged()
            reports.append(report)
            seconds.append(time.perf_counter() - start)
        except (ArtifactError, ProviderError) as e:
            message = str(e)
            if artifact is not None:  # a file opened for writing meanwhile is the cause, not what it caused
                try:
                    artifact.check_unchanged()
                except ArtifactError as changed:
                    message = str(changed)
            invalid[str(directory)] = message
            report_error(PROG, message)
        finally:
            if artifact is not None:
                artifact.close()
    compare_backends(reports)
    for r in reports:
        for e in r.errors:
            report_error(PROG, e)
    verdicts = {r.verdict for r in reports}
    if invalid or "error" in verdicts:
        code = ArtifactError.exit_code
    elif "fail" in verdicts:
        code = ParityFailure.exit_code
    elif "not judged" in verdicts and not args.allow_unjudged:
        code = EXIT_NOT_JUDGED
    else:
        code = EXIT_OK
    with stage(STAGE_REPORT):
        text = markdown(reports, invalid, notes)
    try:
        if args.report:
            args.report.write_text(text)
        if args.matrix:
            print("\n".join([f"- {n}" for n in notes] + [""] + matrix_markdown(reports)))
        elif not args.report:
            print(text)
        if args.json:
            args.json.write_text(to_json(reports, invalid, code, notes))
        if args.plots:
            from .plots import error_by_depth

            for note in error_by_depth(reports, args.plots):
                print(f"- {note}", file=sys.stderr)
        if args.junit:
            args.junit.write_bytes(junit_xml(reports, invalid, selection.unavailable, seconds))
    except OSError as e:
        raise UsageError(f"cannot write report: {e}") from None
    warning = append_step_summary(summary_markdown(reports, invalid, code))
    if warning:
        print(f"{PROG}: warning: {one_line(warning)}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    with reporting_progress(PROG, args.progress):
        return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
