"""qkv-validate: verify artifacts and judge their parity on each runtime."""

import argparse
import sys
from pathlib import Path

from ..errors import (
    EXIT_OK,
    ArtifactError,
    ParityFailure,
    ProviderError,
    UsageError,
    report_error,
    run_cli,
)
from ..stages import stage
from .artifact import load_artifact
from .parity import compare_backends, validate_artifact
from .report import markdown, matrix_markdown, to_json
from .runtimes import RUNTIMES, parse_providers

PROG = "qkv-validate"
STAGE_PROBE, STAGE_REPORT = "probe runtimes (CUDA, ...)", "report"
EPILOG = """exit codes:
  0  every check passed
  1  a parity check failed (numbers out of tolerance, NaN/Inf, a run that errored)
  2  an artifact or argument is invalid: missing file, sha256 mismatch, onnx.checker
     error, unknown provider, a provider that cannot run here (cuda without its libraries,
     openvino not installed: the line gives the install command) or cannot run the artifact
     (a node it has no kernel for; CUDA never falls back to the CPU); one line on stderr
     names the file and why. A runtime that cannot load an artifact does not stop the
     others: the report and the compatibility matrix still show what they found.
  3  internal error: a bug in qkv-onnx, not in the artifact (the traceback is printed;
     please report it)

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
reported without deciding the exit code (its run errors and NaN/Inf still do)."""


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
        "--seed", type=int, default=0, help="seed of the fresh random inputs (default: %(default)s)"
    )
    p.add_argument(
        "--no-torch",
        action="store_true",
        help="do not use torch even if it is installed: no live PyTorch comparison, no rebuild (the graph is "
        "held to the structural contract)",
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
    p.add_argument("--text-file", type=Path, metavar="FILE", help="sentences, one per line, as with --text")
    return p.parse_args(argv)


def run(args) -> int:
    for flag, value in (("--memory-limit", args.memory_limit), ("--time-limit", args.time_limit)):
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be a positive number, got {value}")
    memory = None if args.memory_limit is None else int(args.memory_limit * (1 << 30))
    with stage(STAGE_PROBE):
        providers, notes, auto = parse_providers(args.providers)
    sentences = []
    if args.text or args.text_file:
        from ..text import read_sentences

        sentences = read_sentences(args.text, args.text_file)
    reports, invalid = [], {}
    rebuild = not (args.no_torch or args.no_rebuild)
    for directory in args.artifacts:
        artifact = None
        try:  # the artifact's own problems are ArtifactError/ProviderError; anything else is our bug
            artifact = load_artifact(directory, rebuild, memory, args.time_limit, background=True)
            reports.append(
                validate_artifact(artifact, providers, args.seed, not args.no_torch, auto, sentences)
            )
        except (ArtifactError, ProviderError) as e:
            invalid[str(directory)] = str(e)
            report_error(PROG, str(e))
        finally:
            if artifact is not None:
                artifact.close()
    compare_backends(reports)
    for r in reports:
        for e in r.errors:
            report_error(PROG, e)
    if invalid or any(r.errors for r in reports):
        code = ArtifactError.exit_code
    else:
        code = EXIT_OK if all(r.passed for r in reports) else ParityFailure.exit_code
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
    except OSError as e:
        raise UsageError(f"cannot write report: {e}") from None
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
