"""Run an artifact on each runtime over golden and fresh inputs; judge against oracle, golden data and PyTorch."""
import itertools
from dataclasses import dataclass, field

import numpy as np

from . import oracle
from .artifact import Artifact, ArtifactError, first_line, np_dtype
from .compare import UNIT_ROUNDOFF, compare_outputs, model_error_terms, tolerance
from .runtimes import RUNTIMES, ProviderError
from .torch_peer import load_torch_peer

# (batch, seq, real tokens per row): batch 1 and >1, seq 1, odd, 128, a row that is all padding.
VALIDATION_CASES = [(1, 1, [1]), (2, 1, [1, 0]), (1, 7, [7]), (3, 7, [7, 4, 0]), (2, 128, [128, 77])]
KV_EXTRA = 2  # cross-attention: keys are this much longer than queries


@dataclass
class Case:
    name: str
    inputs: list
    golden: list | None = None  # PyTorch outputs written at export time


@dataclass
class Report:
    artifact: str
    manifest: dict
    checks: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # a runtime asked for that cannot run the artifact (exit 2)
    runtimes: dict = field(default_factory=dict)  # name -> load/run status: the compatibility matrix
    runs: dict = field(default_factory=dict)  # case name -> (Case, {runtime: (outputs, tol, gating)}), for siblings

    @property
    def passed(self) -> bool:
        decisive = [c for c in self.checks if decides(c)]
        return not self.errors and bool(decisive) and all(c["passed"] for c in decisive)


def decides(check: dict) -> bool:
    """A check decides pass/fail unless it is a non-gating runtime's numbers; that runtime's run
    errors and non-finite outputs still decide."""
    return check.get("gating", True) or "error" in check


def make_inputs(manifest: dict, batch: int, seq: int, lengths, rng: np.random.Generator) -> list:
    """Random inputs for the graph's inputs from their roles in the manifest."""
    cfg = manifest["model"]["config"]
    dims = {"batch": batch, "seq": seq, "kv_seq": seq + KV_EXTRA}
    out = []
    for spec in manifest["inputs"]:
        shape = tuple(dims[d] if isinstance(d, str) else d for d in spec["shape"])
        role = spec["role"]
        if role == "hidden":
            x = rng.standard_normal(shape).astype(np_dtype(spec["dtype"]))
        elif role == "token_ids":
            x = rng.integers(0, cfg["vocab_size"], shape, dtype=spec["dtype"])
        elif role == "segment_ids":
            x = rng.integers(0, cfg["type_vocab_size"], shape, dtype=spec["dtype"])
        elif role == "padding_mask":
            x = (np.arange(shape[1])[None, :] < np.asarray(lengths)[:, None]).astype(spec["dtype"])
        else:
            raise ValueError(f"input {spec['name']!r}: unknown role {role!r}")
        out.append(x)
    return out


def text_case(artifact: Artifact, sentences: list) -> Case:
    """The sentences, tokenized with the artifact's own tokenizer files and padded to one batch."""
    from .text import TextError, tokenize

    m = artifact.manifest
    tokenizer = (m.get("checkpoint") or {}).get("tokenizer")
    if not tokenizer:
        raise ArtifactError(f"{artifact.path}: --text needs the tokenizer of the checkpoint the artifact was "
                            "exported from, and this artifact has none")
    if not isinstance(tokenizer, str) or (artifact.path / tokenizer).resolve().parent != artifact.path.resolve():
        raise ArtifactError(f"{artifact.path / 'manifest.json'}: tokenizer {tokenizer!r} is not a directory of the "
                            "artifact")
    try:
        feeds = tokenize(artifact.path / tokenizer, sentences, max_length=m["model"]["config"]["max_positions"])
    except TextError as e:
        raise ArtifactError(str(e)) from None
    return Case(f"text_{len(sentences)}x{feeds['input_ids'].shape[1]}", [feeds[i["name"]] for i in m["inputs"]])


def build_cases(artifact: Artifact, seed: int, sentences: list = ()) -> list:
    cases = [Case(f"golden_{n}", ins, outs) for n, (ins, outs) in enumerate(artifact.golden)]
    if sentences:
        cases.append(text_case(artifact, sentences))
    for n, (batch, seq, lengths) in enumerate(VALIDATION_CASES):
        rng = np.random.default_rng([seed, n])
        cases.append(Case(f"b{batch}xs{seq}", make_inputs(artifact.manifest, batch, seq, lengths, rng)))
    return cases


def _key_length(inputs: list, manifest: dict) -> int:
    """Longest key sequence of a case: the padding mask is (batch, keys)."""
    for x, spec in zip(inputs, manifest["inputs"]):
        if spec["role"] == "padding_mask":
            return x.shape[1]
    return 1


def open_sessions(artifact: Artifact, providers: list, skip_unsupported: bool, report: Report) -> list:
    """A session per runtime, before any case runs; each outcome goes to report.runtimes. A runtime
    that cannot load the artifact is a finding there and a report error (exit 2), and the other
    runtimes still run. With skip_unsupported (--providers auto), a runtime known to lack the
    artifact's dtype or ops is skipped with a note instead of an error."""
    sessions = []
    for name in providers:
        runtime = RUNTIMES[name]
        status = report.runtimes[name] = {"label": runtime.label, "gating": runtime.gating, "loads": None,
                                          "runs": None, "reason": None}
        gap = runtime.gap(artifact)
        if gap:
            status["reason"] = f"not run: {gap}"
            report.notes.append(f"{runtime.label}: not run ({gap})")
            if not skip_unsupported:
                report.errors.append(f"{artifact.model_path}: {gap}")
            continue
        try:
            session = runtime(artifact.model_path)
        except ProviderError as e:
            status.update(loads=False, reason=str(e).removeprefix(f"{artifact.model_path}: "))
            report.errors.append(str(e))
            continue
        judged = _judged_dtype(artifact.manifest["dtype"], session)
        status.update(loads=True, judged_dtype=judged)
        if judged != artifact.manifest["dtype"]:
            session.notes.append(f"it computes in {judged}, coarser than the artifact's {artifact.manifest['dtype']}: "
                                 f"judged at the {judged} tolerance and reported, not deciding pass/fail")
        report.notes.append(f"{runtime.label}: ran, session providers {session.providers}"
                            + "".join(f"; {n}" for n in session.notes))
        sessions.append(session)
    if sessions and not any(s.gating for s in sessions):
        report.notes.append("every runtime that ran is non-gating: its numbers are reported, not judged; the verdict "
                            "rests on integrity, PyTorch against the oracle, and run errors or NaN/Inf")
    if not sessions and not report.errors:
        report.errors.append(f"{artifact.model_path}: no runtime asked for can run it: " + "; ".join(report.notes))
    return sessions


def _judged_dtype(dtype: str, session) -> str:
    """The dtype whose tolerance judges a session: the artifact's, or for a non-gating runtime the
    coarser precision it computes in."""
    own = session.compute_dtype
    coarser = own is not None and UNIT_ROUNDOFF[own] > UNIT_ROUNDOFF[dtype]
    return own if coarser and not session.gating else dtype


def validate_artifact(artifact: Artifact, providers: list, seed: int = 0, use_torch: bool = True,
                      skip_unsupported: bool = False, sentences: list = ()) -> Report:
    """Every comparison for one artifact against the oracle, golden data and PyTorch."""
    m = artifact.manifest
    report = Report(artifact.name, m)
    cases = build_cases(artifact, seed, sentences)
    sessions = open_sessions(artifact, providers, skip_unsupported, report)
    try:
        peer = load_torch_peer(m, artifact.weights) if use_torch else None
    except Exception as e:
        raise _mismatch(artifact, "PyTorch", e) from None
    report.notes.append("live PyTorch comparison: " + ("ran" if peer else "not run (" + (
        "torch is not installed" if use_torch else "disabled by --no-torch") + ")"))
    out_names = [o["name"] for o in m["outputs"]]
    weights64 = oracle.as_float64(artifact.weights)  # once, not per case: bert-large holds 2.7 GB in float64
    for s in sessions:
        report.runtimes[s.name]["runs"] = True
    for case in cases:
        k, stages = model_error_terms(m, _key_length(case.inputs, m))
        try:
            expected = oracle.forward(m["model"]["architecture"], m["model"]["config"], m["model"]["options"],
                                      weights64, case.inputs)
        except Exception as e:
            raise _mismatch(artifact, "the oracle", e) from None
        tol = tolerance(m["dtype"], k, stages)
        if case.golden is not None:
            report.checks += _compare("pytorch-golden", case, out_names, case.golden, {"oracle": (expected, tol)})
        live = peer(case.inputs) if peer is not None else None
        if live is not None:
            report.checks += _compare("pytorch", case, out_names, live, {"oracle": (expected, tol)})
        report.runs[case.name] = (case, {})
        for session in sessions:
            t = tolerance(report.runtimes[session.name]["judged_dtype"], k, stages)
            refs = {"oracle": (expected, t)}
            refs.update({} if case.golden is None else {"golden": (case.golden, 2 * t)})
            refs.update({} if live is None else {"pytorch": (live, 2 * t)})
            try:
                got = session.run(case.inputs)
            except Exception as e:
                error = f"run failed: {first_line(e)}"
                report.runtimes[session.name].update(runs=False, reason=f"{case.name}: {error}")
                report.checks += [_failed(session.name, case, o, r, error) for r in refs for o in out_names]
                continue
            report.checks += _compare(session.name, case, out_names, got, refs, session.gating)
            report.runs[case.name][1][session.name] = (got, t, session.gating)
    return report


def compare_backends(reports: list) -> None:
    """Artifacts of one model, dtype and weights from different backends are compared with each other,
    case by case on every runtime both ran, at twice the tolerance (each side has its own rounding).
    The checks join both reports, with reference 'backend NAME'."""
    groups = {}
    for r in reports:
        m = r.manifest
        groups.setdefault((m["model"]["name"], m["dtype"], m["files"].get("weights.npz", {}).get("sha256")), []).append(r)
    for group in groups.values():
        for a, b in itertools.combinations(group, 2):
            if a.manifest["backend"] == b.manifest["backend"]:
                continue
            out_names = [o["name"] for o in a.manifest["outputs"]]
            for name, (case, runs_a) in a.runs.items():
                other = b.runs.get(name)
                if other is None or not all(np.array_equal(x, y) for x, y in zip(case.inputs, other[0].inputs)):
                    continue
                for runtime in sorted(runs_a.keys() & other[1].keys()):
                    (got_a, tol, gating), (got_b, _, _) = runs_a[runtime], other[1][runtime]
                    a.checks += _compare(runtime, case, out_names, got_a,
                                         {f"backend {b.manifest['backend']}": (got_b, 2 * tol)}, gating)
                    b.checks += _compare(runtime, case, out_names, got_b,
                                         {f"backend {a.manifest['backend']}": (got_a, 2 * tol)}, gating)


def _mismatch(artifact, who, error) -> ArtifactError:
    return ArtifactError(f"{artifact.path / 'manifest.json'}: {who} cannot build the model it describes from "
                         f"weights.npz ({type(error).__name__}: {first_line(error)})")


def _compare(runtime, case, out_names, got, refs, gating: bool = True) -> list:
    checks = []
    for ref_name, (ref_outputs, tol) in refs.items():
        for i, name in enumerate(out_names):
            if i >= len(got):
                checks.append(_failed(runtime, case, name, ref_name, "output missing"))
                continue
            metrics = compare_outputs(got[i], ref_outputs[i], tol)
            checks.append({"runtime": runtime, "case": case.name, "output": name, "reference": ref_name, **metrics,
                           **({} if gating else {"gating": False})})
    return checks


def _failed(runtime, case, output, reference, error) -> dict:
    return {"runtime": runtime, "case": case.name, "output": output, "reference": reference, "passed": False,
            "error": error}
