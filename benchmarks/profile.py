"""ONNX Runtime's own profiler: where a session's time goes, by op type."""

import json
from pathlib import Path

from .contenders import ort_session


def op_shares(profile_json: Path) -> dict:
    """{op type: share of the summed node time}, largest first, from an ORT profile file."""
    events = json.loads(Path(profile_json).read_text())
    totals = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0) + e.get("dur", 0)
    whole = sum(totals.values()) or 1
    return {op: t / whole for op, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def profile_model(path: Path, feeds: dict, threads: int, prefix: Path, runs: int = 5) -> dict:
    session = ort_session(path, threads, profile_prefix=str(prefix))
    names = [i.name for i in session.get_inputs()]
    for _ in range(runs):
        session.run(None, {n: feeds[n] for n in names})
    return op_shares(Path(session.end_profiling()))
