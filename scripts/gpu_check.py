"""Export the default models with every backend and dtype, validate each on CUDA and CPU, print one table.

Run on a machine with a working ONNX Runtime CUDA provider: bash scripts/gpu_check.sh
Exit 0 when every artifact passes on both providers, 1 when one fails, 2 when CUDA cannot run here.
QKV_GPU_CHECK_PROVIDERS=cpu makes it a dry run of the script itself on a CPU-only machine.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = sys.argv[1].split(",") if len(sys.argv) > 1 else ["bert-tiny", "bert-base"]
DTYPES = ["float32", "float16", "bfloat16"]
PROVIDERS = os.environ.get("QKV_GPU_CHECK_PROVIDERS", "cuda,cpu").split(
    ","
)  # cpu alone: a dry run of this script


def main() -> int:
    import onnxruntime as ort

    from qkv_onnx.artifact_format import BACKENDS
    from qkv_onnx.validate.runtimes import cuda_problem

    print(f"onnxruntime {ort.__version__}, available providers {ort.get_available_providers()}")
    problem = cuda_problem() if "cuda" in PROVIDERS else None
    if problem:
        print(f"gpu_check: the CUDA provider cannot run here: {problem}", file=sys.stderr)
        return 2
    rows, notes, worst_code, work = [], [], 0, Path(tempfile.mkdtemp(prefix="qkv-gpu-check-"))
    for model in MODELS:
        for dtype in DTYPES:
            start = time.perf_counter()
            export = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "export",
                    "--model",
                    model,
                    "--backend",
                    "all",
                    "--dtype",
                    dtype,
                    "--out",
                    str(work),
                ],
                capture_output=True,
                text=True,
            )
            export_s = time.perf_counter() - start
            if export.returncode:
                print(export.stderr.strip(), file=sys.stderr)
                worst_code = max(worst_code, 1)
            dirs = [
                work / f"{model}-{b}-{dtype}" for b in BACKENDS if (work / f"{model}-{b}-{dtype}").is_dir()
            ]
            providers = [
                p for p in PROVIDERS if not (p == "cpu" and dtype == "bfloat16")
            ]  # ORT CPU: no bf16 kernels
            if not providers:
                notes.append(
                    f"{model} {dtype}: not validated, ONNX Runtime's CPU provider has no bfloat16 kernels"
                )
                continue
            report = work / f"{model}-{dtype}.json"
            start = time.perf_counter()
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "validate",
                    *map(str, dirs),
                    "--providers",
                    ",".join(providers),
                    "--no-torch",
                    "--json",
                    str(report),
                    "--report",
                    str(work / f"{model}-{dtype}.md"),
                ],
                capture_output=True,
                text=True,
            )
            validate_s = time.perf_counter() - start
            worst_code = max(worst_code, run.returncode)
            if run.stderr.strip():
                print(run.stderr.strip(), file=sys.stderr)
            doc = json.loads(report.read_text()) if report.exists() else {"artifacts": [], "invalid": []}
            for a in doc["artifacts"]:
                notes += [
                    f"{a['artifact']}: {n}"
                    for n in a["notes"]
                    if "cost model" in n or ("not run (" in n and "PyTorch" not in n)
                ]
                for provider in providers:
                    checks = [c for c in a["checks"] if c["runtime"] == provider]
                    oracle = [c for c in checks if c["reference"] == "oracle" and c["verdict"] != "error"]
                    cross = [
                        c for c in checks if c["reference"].startswith("backend ") and c["verdict"] != "error"
                    ]
                    worst = max(oracle, key=lambda c: c["max_abs"] / c["atol"], default=None)
                    rows.append(
                        (
                            model,
                            a["backend"],
                            dtype,
                            provider,
                            f"{worst['max_abs']:.2e}" if worst else "—",
                            f"{worst['atol']:.2e}" if worst else "—",
                            f"{max(c['max_abs'] for c in cross):.2e}" if cross else "—",
                            "pass" if checks and all(c["passed"] for c in checks) else "FAIL",
                            f"{export_s:.0f}",
                            f"{validate_s:.0f}",
                        )
                    )
            for bad in doc["invalid"]:
                rows.append(
                    (
                        model,
                        Path(bad["artifact"]).name,
                        dtype,
                        "—",
                        "—",
                        "—",
                        "—",
                        "INVALID: " + bad["reason"].split(": ", 1)[-1][:100],
                        f"{export_s:.0f}",
                        f"{validate_s:.0f}",
                    )
                )
    print(
        "| model | backend | dtype | provider | max abs vs oracle | atol | max abs vs other backends "
        "| result "
        "| export s (3 backends) | validate s (3 backends) |"
    )
    print("|---|---|---|---|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    for note in notes:
        print(f"- {note}")
    print(f"reports and artifacts: {work}")
    return worst_code


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
