"""Wall time of `qkv-export` then `qkv-validate` on one model, per stage.

Both CLIs' `main` run in one fresh process (`python -m benchmarks.pipeline_cost MODEL DIR` prints one JSON
line) with their stage functions wrapped by a clock. Times are exclusive: a stage called inside another is
taken out of its caller's time. What no wrapped function covers is 'other'. Wrapped functions that a module
no longer has are skipped and listed.
"""
import functools
import json
import subprocess
import sys
import time
from contextlib import contextmanager

# (module, attribute, stage); a dotted attribute is a method of a class in the module.
EXPORT_STAGES = [
    ("export.pipeline", "source_model", "build module + seeded weights"),
    ("torch.onnx", "export", "torch.onnx.export (dynamo)"),
    ("onnxscript.rewriter.ort_fusions", "optimize_for_ort", "onnxscript optimize_for_ort"),
    ("torch.onnx", "ONNXProgram.save", "save model.onnx"),
    ("onnx", "load", "onnx.load (read graph back)"),
    ("export.pipeline", "check_fusion", "fusion check"),
    ("export.pipeline", "save_weights_npz", "write weights.npz"),
    ("export.pipeline", "save_test_data_set", "write golden data"),
    ("export.pipeline", "write_manifest", "manifest (sha256 of files)"),
    ("export.pipeline", "publish", "atomic publish"),
]
VALIDATE_STAGES = [
    ("validate.cli", "parse_providers", "probe runtimes (CUDA, ...)"),
    ("validate.artifact", "read_manifest", "read manifest"),
    ("validate.artifact", "verify_files", "sha256 of files"),
    ("validate.artifact", "read_model", "onnx.load + graph checks"),
    ("validate.artifact", "check_model", "onnx.checker (full)"),
    ("validate.artifact", "load_weights", "load weights.npz"),
    ("validate.artifact", "load_golden", "load golden data"),
    ("validate.parity", "open_sessions", "open sessions (every runtime)"),
    ("validate.parity", "load_torch_peer", "build PyTorch peer"),
    ("validate.oracle", "forward", "NumPy float64 oracle"),
    ("validate.parity", "compare_outputs", "compare"),
    ("validate.cli", "markdown", "report"),
]
PEER_RUNS = "PyTorch peer runs"
RUN_LABELS = {"OrtSession": "ORT CPU runs", "Reference": "ReferenceEvaluator runs",
              "OpenVino": "OpenVINO runs (f32 hint and default precision)"}


def runtime_stages() -> list:
    """A stage for each class that implements `run` for a registered runtime adapter."""
    from validate.runtimes import RUNTIMES, Runtime

    owners = {k for c in RUNTIMES.values() for k in c.__mro__ if "run" in vars(k) and k is not Runtime}
    return [(k.__module__, f"{k.__qualname__}.run", RUN_LABELS.get(k.__name__, f"{getattr(k, 'label', '') or k.__name__} runs"))
            for k in sorted(owners, key=lambda k: k.__qualname__)]


class StageClock:
    def __init__(self):
        self.totals, self._stack, self.missing = {}, [], []

    def wrap(self, fn, stage):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                inner = self._stack.pop()
                self.totals[stage] = self.totals.get(stage, 0.0) + elapsed - inner
                if self._stack:
                    self._stack[-1] += elapsed
            if fn.__name__ == "load_torch_peer" and callable(result):
                result = self.wrap(result, PEER_RUNS)
            return result
        return timed

    @contextmanager
    def patched(self, stages):
        import importlib

        undo = []
        for module_name, attr, stage in stages:
            try:
                owner = importlib.import_module(module_name)
                *path, name = attr.split(".")
                for part in path:
                    owner = getattr(owner, part)
                fn = getattr(owner, name)
            except (ImportError, AttributeError):
                self.missing.append(f"{module_name}.{attr}")
                continue
            undo.append((owner, name, owner.__dict__.get(name, fn)))
            setattr(owner, name, self.wrap(fn, stage))
        try:
            yield
        finally:
            for owner, name, fn in reversed(undo):
                setattr(owner, name, fn)


def _timed_main(main, argv, stages) -> dict:
    clock = StageClock()
    with clock.patched(stages):
        t0 = time.perf_counter()
        code = main(argv)
        total = time.perf_counter() - t0
    clock.totals["other"] = total - sum(clock.totals.values())
    return {"exit_code": code, "total_s": total, "stages_s": clock.totals, "not_wrapped": clock.missing}


def _child(model: str, directory: str) -> dict:
    t0 = time.perf_counter()
    import contextlib
    import io

    import export.cli
    import export.pipeline  # noqa: F401  (the stages' modules, imported before the clock starts)
    import validate.cli
    import validate.parity  # noqa: F401
    imports = time.perf_counter() - t0
    out = f"{directory}/{model}"
    with contextlib.redirect_stdout(io.StringIO()):
        exported = _timed_main(export.cli.main, ["--model", model, "--out", out], EXPORT_STAGES)
        validated = _timed_main(validate.cli.main, [out, "--report", f"{directory}/validate.md"],
                                VALIDATE_STAGES + runtime_stages())
    return {"imports_s": imports, "export": exported, "validate": validated}


def measure(model: str, directory, timeout: float = 900) -> dict:
    """Export `model` (default backend) into `directory` and validate it, in a fresh process; the stage
    times, and 'process_s': the whole process's wall time (interpreter start and imports included)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "benchmarks.pipeline_cost", model, str(directory)],
                       capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1][:300]}
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "process_s": wall}


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2])))
