"""Wall time of `qkv-export` then `qkv-validate` on one model (or a checkpoint directory), per stage.

Both CLIs' `main` run in one fresh process (`python -m qkv_onnx.benchmarks.pipeline_cost MODEL DIR
[WEIGHTS]` prints one JSON line) while a StageClock listens to the stages the pipeline announces
(`qkv_onnx.stages`). Times are exclusive: a stage entered inside another is taken out of its caller's
time. What no stage covers is 'other'.
"""

import json
import subprocess
import sys
import time

from ..stages import listening


class StageClock:
    """A stage listener: exclusive wall time per stage name."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._stack: list[tuple[str, float, float]] = []  # (stage, start, time spent in inner stages)

    def __call__(self, event: str, name: str) -> None:
        now = time.perf_counter()
        if event == "enter":
            self._stack.append((name, now, 0.0))
            return
        stage, start, inner = self._stack.pop()
        elapsed = now - start
        self.totals[stage] = self.totals.get(stage, 0.0) + elapsed - inner
        if self._stack:
            outer, outer_start, outer_inner = self._stack[-1]
            self._stack[-1] = (outer, outer_start, outer_inner + elapsed)


def _timed_main(main, argv) -> dict:
    clock = StageClock()
    with listening(clock):
        t0 = time.perf_counter()
        code = main(argv)
        total = time.perf_counter() - t0
    clock.totals["other"] = total - sum(clock.totals.values())
    return {"exit_code": code, "total_s": total, "stages_s": clock.totals}


def _child(model: str, directory: str, weights: str | None = None) -> dict:
    t0 = time.perf_counter()
    import contextlib
    import io

    from ..export import cli as export_cli
    from ..export import pipeline  # noqa: F401  (imported before the clock starts)
    from ..validate import cli as validate_cli

    imports = time.perf_counter() - t0
    out = f"{directory}/{model}"
    with contextlib.redirect_stdout(io.StringIO()):
        source = ["--weights", weights] if weights else ["--model", model]
        exported = _timed_main(export_cli.main, [*source, "--out", out])
        validated = _timed_main(validate_cli.main, [out, "--report", f"{directory}/validate.md"])
    return {"imports_s": imports, "export": exported, "validate": validated}


def measure(model: str, directory, timeout: float = 900, weights=None) -> dict:
    """Export `model` (default backend; with `weights`, that checkpoint directory, `model` naming the output)
    into `directory` and validate it, in a fresh process; the stage times, and 'process_s': the whole
    process's wall time (interpreter start and imports included)."""
    t0 = time.perf_counter()
    args = [model, str(directory), *([str(weights)] if weights else [])]
    p = subprocess.run(
        [sys.executable, "-m", "qkv_onnx.benchmarks.pipeline_cost", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1][:300]}
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "process_s": wall}


if __name__ == "__main__":
    print(json.dumps(_child(*sys.argv[1:4])))
