"""Run an artifact on each runtime over golden and fresh inputs; judge against oracle, golden data and
PyTorch."""

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ..artifact_format import (
    ARCHITECTURES,
    MANIFEST,
    QUANTIZED,
    TEXT_GOLDEN_SET,
    TOKENIZER_DIR,
    io_dtype,
    max_sequence,
    seeded_cases,
)
from ..decoder_format import LOGITS, unverified
from ..errors import ArtifactError, BrokenEnvironment, LimitExceeded, ProviderError, first_line, show
from ..genai import GENAI_CONFIG
from ..inputs import fit, make_inputs
from ..stages import stage
from . import oracle
from .artifact import Artifact, input_problem
from .caps import max_seq
from .compare import (
    UNIT_ROUNDOFF,
    compare_contract,
    compare_outputs,
    key_length,
    model_error_terms,
    padding_mask,
    tolerance,
)
from .decode import decode_checks, greedy_check, greedy_reference
from .locate import Localization, locate
from .results import Check, RuntimeStatus, failed_check
from .runtimes import RUNTIMES, open_runtime
from .sandbox import SandboxedRuntime, tokenize_sandboxed
from .torch_peer import load_torch_peer

# (batch, seq, real tokens per row): batch 1 and >1, seq 1, odd, 128, a row that is all padding.
STAGE_ORACLE, STAGE_COMPARE, STAGE_SESSIONS, STAGE_PEER = (
    "NumPy float64 oracle",
    "compare",
    "open sessions (every runtime)",
    "build PyTorch peer",
)
STAGE_PEER_RUNS, STAGE_LOCATE = "PyTorch peer runs", "locate (taps exposed)"


LONGEST = 2048  # --long's tokens at most: the float64 oracle's attention is quadratic in them


@dataclass
class Case:
    name: str
    inputs: list[np.ndarray]
    golden: list[np.ndarray] | None = None  # PyTorch outputs written at export time
    trace: oracle.Trace | None = None  # the oracle's taps on this case, kept until localization is done
    scales: dict[int, float] = field(default_factory=dict)  # oracle.Trace.scales, kept for every comparison


@dataclass(frozen=True)
class Contract:
    """Judge by the accuracy contract (quantized artifacts) instead of a rounding tolerance: the case's
    padding mask, and whether its sequences are real sentences (the sentence-embedding metrics apply)."""

    mask: np.ndarray | None
    sentences: bool


@dataclass
class RuntimeRun:
    """One runtime's outputs on one case, kept for the sibling-backend comparison."""

    outputs: list[np.ndarray]
    tol: float | Contract
    gating: bool


def is_text(case: Case, manifest: dict) -> bool:
    """Whether a case's sequences are real sentences: --text, or the golden set of a tokenizer's sentences."""
    tokenizer = (manifest.get("checkpoint") or {}).get("tokenizer")
    return case.name.startswith("text_") or (bool(tokenizer) and case.name == f"golden_{TEXT_GOLDEN_SET}")


@dataclass
class CaseRun:
    case: Case
    runs: dict[str, RuntimeRun] = field(default_factory=dict)  # runtime name -> its outputs


@dataclass
class Report:
    artifact: str
    manifest: dict
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(
        default_factory=list
    )  # a runtime asked for that cannot run the artifact (exit 2)
    runtimes: dict[str, RuntimeStatus] = field(
        default_factory=dict
    )  # the compatibility matrix's raw material
    runs: dict[str, CaseRun] = field(default_factory=dict)  # case name -> outputs per runtime
    localization: Localization | None = None  # where it diverges (--locate, or a failed parity check)
    attention_maps: object | None = None  # AttentionMaps (--attention-maps)
    graph_check: str = ""  # how the graph was judged (rebuild or structural contract)
    weights_sha256: str = ""  # graph_weights.weights_sha256, set where several artifacts are validated

    def forget_traces(self) -> None:
        """Drop the oracle's intermediates (bert-large: hundreds of MB) once localization is done."""
        for run in self.runs.values():
            run.case.trace = None

    @property
    def judged(self) -> bool:
        """Whether a gating runtime compared the graph's outputs with a reference (numbers, not only errors).
        PyTorch against the oracle, integrity and a non-gating runtime's numbers say nothing of the graph."""
        return any(c.judges_graph for c in self.checks)

    @property
    def verdict(self) -> str:
        """'error' (a runtime asked for cannot run it: exit 2), 'fail' (a deciding check failed), 'not judged'
        (nothing failed, and no gating runtime compared the graph's outputs), or 'pass'."""
        if self.errors:
            return "error"
        if not all(c.passed for c in self.checks if c.decides):
            return "fail"
        return "pass" if self.judged else "not judged"

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


def text_case(artifact: Artifact, sentences: list[str]) -> Case:
    """The sentences, tokenized with the artifact's own tokenizer files and padded to one batch."""
    m = artifact.manifest
    checkpoint = m.get("checkpoint")
    tokenizer = checkpoint.get("tokenizer") if isinstance(checkpoint, dict) else None
    if not tokenizer:
        raise ArtifactError(
            f"{show(artifact.path)}: --text needs the tokenizer of the checkpoint the artifact was "
            "exported from, and this artifact has none"
        )
    if tokenizer != TOKENIZER_DIR:
        raise ArtifactError(
            f"{show(artifact.path / MANIFEST)}: tokenizer {tokenizer!r} is not the artifact's "
            f"{TOKENIZER_DIR}/"
        )
    feeds = tokenize_sandboxed(  # the verified private copy; errors name the artifact's files
        artifact.private / tokenizer,
        artifact.path / tokenizer,
        sentences,
        max_sequence(m["model"]["config"]),
        artifact.limits,
        m["model"]["config"]["pad_token_id"],
    )
    inputs = [feeds[i["name"]] for i in m["inputs"]]
    for x, spec in zip(inputs, m["inputs"]):
        problem = input_problem(x, spec, m["model"]["config"])
        if problem:
            raise ArtifactError(f"{show(artifact.path / tokenizer)}: the tokenizer gives {problem}")
    return Case(f"text_{len(sentences)}x{feeds['input_ids'].shape[1]}", inputs)


def build_cases(artifact: Artifact, seed: int, sentences: list[str] = (), long: bool = False) -> list[Case]:
    """Golden sets, the sentences, the seeded validation shapes, and with `long` a batch of two at the longest
    sequence the model takes (its position table; 512 for a model without one; at most LONGEST), the second
    row padded."""
    cases = [Case(f"golden_{n}", ins, outs) for n, (ins, outs) in enumerate(artifact.golden)]
    if sentences:
        cases.append(text_case(artifact, sentences))
    m = artifact.manifest
    shapes = seeded_cases("validation", m["model"]["architecture"])
    if long:
        longest = min(max_seq(m), LONGEST)
        shapes = [*shapes, (2, longest, [longest, -(-3 * longest // 5)], 0)]
    for n, shape in enumerate(shapes):
        rng = np.random.default_rng([seed, n])
        batch, seq, lengths = fit(shape[:3], max_seq(m) - shape[3])  # a short position table
        inputs = make_inputs(m["inputs"], m["model"]["config"], batch, seq, lengths, rng, past=shape[3])
        cases.append(Case(f"b{batch}xs{seq}" + (f"+past{shape[3]}" if shape[3] else ""), inputs))
    return cases


def start_sessions(
    artifact: Artifact, providers: list[str], skip_unsupported: bool, report: Report
) -> list[SandboxedRuntime]:
    """A sandboxed session per runtime, all opening at once (`await_sessions` waits for them). With
    skip_unsupported (--providers auto), a runtime known to lack the artifact's dtype or ops is skipped with
    a note instead of an error. The sandboxes open the screened graph while a background rebuild may still
    run: nothing they compute is reported unless it proves the graph (validate_artifact)."""
    shown = artifact.shown_model_path
    opening = []
    for name in providers:
        runtime = RUNTIMES[name]
        status = report.runtimes[name] = RuntimeStatus(runtime.label, runtime.gating)
        if artifact.plan.sessions is not None and len(opening) >= artifact.plan.sessions:
            status.reason = "not run: it does not fit the memory budget (--max-memory)"
            continue
        gap = runtime.gap(artifact)
        if gap:
            status.reason = f"not run: {gap}"
            report.notes.append(f"{runtime.label}: not run ({gap})")
            if not skip_unsupported:
                report.errors.append(f"{show(shown)}: {gap}")
            continue
        opening.append(open_runtime(name, artifact.screened_model_path, artifact.limits, shown))
    return opening


def await_sessions(
    artifact: Artifact, opening: list[SandboxedRuntime], report: Report
) -> list[SandboxedRuntime]:
    """The sessions of `opening` that loaded the artifact; each outcome goes to report.runtimes. A runtime
    that cannot load it, or passes a sandbox limit doing so, is a finding there and a report error (exit 2),
    and the other runtimes still run."""
    shown = artifact.shown_model_path
    sessions = []
    for session in opening:
        status = report.runtimes[session.name]
        try:
            session.wait_open()
        except (ProviderError, ArtifactError) as e:
            status.loads = False
            status.reason = str(e).removeprefix(f"{shown}: ").removeprefix(f"{show(shown)}: ")
            report.errors.append(str(e))
            continue
        status.loads, status.judged_dtype = True, _judged_dtype(artifact.manifest["dtype"], session)
        if status.judged_dtype != artifact.manifest["dtype"]:
            session.notes.append(
                f"it computes in {status.judged_dtype}, coarser than the artifact's "
                f"{artifact.manifest['dtype']}: "
                f"judged at the {status.judged_dtype} tolerance and reported, not deciding pass/fail"
            )
        report.notes.append(
            f"{session.label}: ran, session providers {session.providers}"
            + "".join(f"; {n}" for n in session.notes)
        )
        sessions.append(session)
    if sessions and not any(s.gating for s in sessions):
        report.notes.append(
            "every runtime that ran is non-gating: its numbers are reported, not judged, so the graph's "
            "outputs are not judged at all (verdict NOT JUDGED, exit 4, unless --allow-unjudged); its run "
            "errors and NaN/Inf still fail"
        )
    if not sessions and not report.errors and artifact.plan.sessions != 0:
        report.errors.append(f"{show(shown)}: no runtime asked for can run it: " + "; ".join(report.notes))
    return sessions


def holdout_note(quantization: dict) -> str:
    """What the exporter recorded of its held-out check (an int8 artifact's margin), as the report's note:
    figures from the manifest, shown as recorded (validation judges the artifact itself, by the contract)."""
    held = quantization.get("holdout")
    numbers = (
        isinstance(held, dict)
        and all(isinstance(held.get(k), dict) for k in ("worst", "margin"))
        and all(type(v) is float and k in held["margin"] for k, v in held["worst"].items())
        and all(type(v) is float for v in held["margin"].values())
    )
    if not numbers:
        return "int8 held-out check at export: not recorded (an artifact from before qkv-onnx 0.3)"
    figures = ", ".join(f"{k} {v:.4f} (margin {held['margin'][k]:.4f})" for k, v in held["worst"].items())
    size = held.get("sentences")
    on = f"{size} held-out sentences and seeded tokens" if type(size) is int and size else "seeded tokens"
    return f"int8 held-out check at export, as the manifest records it ({on}; worst values): {figures}"


def _judged_dtype(dtype: str, session) -> str:
    """The dtype whose tolerance judges a session: the artifact's, or for a non-gating runtime the
    coarser precision it computes in. A quantized artifact is judged by the accuracy contract on every
    runtime, whatever it computes in."""
    if dtype in QUANTIZED:
        return dtype
    own = session.compute_dtype
    coarser = own is not None and UNIT_ROUNDOFF[own] > UNIT_ROUNDOFF[dtype]
    return own if coarser and not session.gating else dtype


@dataclass
class Expected:
    """What one case is judged against: the oracle's outputs, PyTorch's live ones, and the error terms."""

    oracle: list
    live: list | None
    k: int
    stages: int


def validate_artifact(
    artifact: Artifact,
    providers: list[str],
    seed: int = 0,
    use_torch: bool = True,
    skip_unsupported: bool = False,
    sentences: list[str] = (),
    long: bool = False,
) -> Report:
    """Every comparison for one artifact against the oracle, golden data and PyTorch. The runtimes'
    sandboxes open the (screened) model at once while the references are computed, then each case runs on
    one runtime at a time, all while a background rebuild of the graph may still run; the report is
    returned only once the graph is proven (ArtifactError otherwise, and every result is dropped)."""
    m = artifact.manifest
    report = Report(artifact.name, m, graph_check=artifact.graph_check)
    report.notes.append(artifact.graph_check)
    if artifact.limits is not None:
        report.notes.append(
            "sandbox limits (each runtime, and onnx.checker in structural mode): "
            + artifact.limits.describe()
        )
    if m["dtype"] in QUANTIZED:
        report.notes.append(holdout_note(m["quantization"]))
    if GENAI_CONFIG in m["files"]:
        report.notes.append(
            "genai_config.json: the exporter's for this manifest (what onnxruntime-genai reads; genai itself "
            "is not run here)"
        )
    decoder = ARCHITECTURES[m["model"]["architecture"]].cached
    if decoder and unverified(m["model"]["config"]):
        report.notes.append(
            "not verified, the graph does not encode it: " + "; ".join(unverified(m["model"]["config"]))
        )
    report.notes += artifact.plan.notes
    cases = build_cases(artifact, seed, sentences, long)
    opening = start_sessions(artifact, providers, skip_unsupported, report)  # they open while references run
    try:
        expected, peer_note, peer = _references(artifact, cases, use_torch, report)
        with stage(STAGE_SESSIONS):
            sessions = await_sessions(artifact, opening, report)
        report.notes.append(peer_note)
        _run_cases(artifact, cases, expected, sessions, report)
        if decoder:
            _decoder_checks(artifact, sessions, report, seed, peer)
        if artifact.plan.rebuild == "after":  # the runtimes' memory is the rebuild's now
            for session in opening:
                session.close()
        artifact.verify_graph()  # nothing above counts unless the graph is the exporter's
        if artifact.graph_check != report.graph_check:  # the rebuild could not run: structural instead
            report.notes[report.notes.index(report.graph_check)] = artifact.graph_check
            report.graph_check = artifact.graph_check
    finally:
        for session in opening:
            session.close()
    return report


def _decoder_checks(artifact: Artifact, sessions: list, report: Report, seed: int, peer) -> None:
    """The cache proven on PyTorch and every runtime (validate/decode.py): cached decode against the full
    sequence, and greedy tokens against PyTorch with its cache (the oracle's without torch)."""
    m, w = artifact.manifest, artifact.weights
    reference, reference_run = "pytorch", peer
    if peer is None:
        weights64 = oracle.as_float64(w, lazy=not artifact.plan.oracle_cached)

        def reference_run(inputs):
            return list(
                oracle.forward(m["model"]["architecture"], m["model"]["config"], {}, weights64, inputs)
            )

        reference = "oracle"
    if peer is not None:
        report.checks += decode_checks("pytorch", peer, m, w, seed)
    expected = None
    for s in sessions:
        report.checks += decode_checks(s.name, s.run, m, w, seed, s.gating)
        if s.gating:  # a non-gating runtime's numbers are reported, not judged: its tokens too
            expected = expected or greedy_reference(reference_run, m, seed)
            check, note = greedy_check(s.name, s.run, reference, expected, m, seed)
            report.checks.append(check)
            if note:
                report.notes.append(note)


def _references(
    artifact: Artifact, cases: list[Case], use_torch: bool, report: Report
) -> tuple[list[Expected], str, object]:
    """The oracle's and PyTorch's outputs for every case, PyTorch judged against the oracle; the note
    saying whether PyTorch ran; and the PyTorch peer (None when it did not)."""
    m = artifact.manifest
    why = "disabled by --no-torch" if not use_torch else "torch is not installed"
    with stage(STAGE_PEER):
        try:
            peer = load_torch_peer(m, artifact.weights) if use_torch else None
        except BrokenEnvironment as e:
            peer, why = None, str(e)
    note = "live PyTorch comparison: " + ("ran" if peer else f"not run ({why})")
    out_names = [o["name"] for o in m["outputs"]]
    # once, not per case (bert-large holds 2.7 GB in float64), unless the memory plan says per read
    weights64 = oracle.as_float64(artifact.weights, lazy=not artifact.plan.oracle_cached)
    out = []
    for case in cases:
        k, stages = model_error_terms(m, key_length(case.inputs, m), artifact.weights)
        with stage(STAGE_ORACLE):
            case.trace = oracle.Trace()
            outputs = oracle.forward(
                m["model"]["architecture"],
                m["model"]["config"],
                m["model"]["options"],
                weights64,
                case.inputs,
                case.trace,
            )
            case.scales = case.trace.scales
        tol = tolerance(io_dtype(m["dtype"]), k, stages)  # PyTorch's (float32 for a quantized artifact)
        if case.golden is not None:
            report.checks += _compare(
                "pytorch-golden", case, out_names, case.golden, {"oracle": (outputs, tol)}
            )
        live = None
        if peer is not None:
            with stage(STAGE_PEER_RUNS):
                live = peer(case.inputs)
            report.checks += _compare("pytorch", case, out_names, live, {"oracle": (outputs, tol)})
        out.append(Expected(outputs, live, k, stages))
    return out, note, peer


def _run_cases(
    artifact: Artifact, cases: list[Case], expected: list[Expected], sessions: list, report: Report
):
    m = artifact.manifest
    out_names = [o["name"] for o in m["outputs"]]
    for s in sessions:
        report.runtimes[s.name].runs = True
    quantized = m["dtype"] in QUANTIZED
    for case, exp in zip(cases, expected):
        report.runs[case.name] = CaseRun(case)
        for session in list(sessions):  # one at a time: each runtime's thread pool has the CPUs to itself
            status = report.runtimes[session.name]
            if quantized:  # the accuracy contract, against every reference alike
                t = t2 = Contract(padding_mask(case.inputs, m), is_text(case, m))
            else:
                t = tolerance(status.judged_dtype, exp.k, exp.stages)
                t2 = 2 * t
            refs = {"oracle": (exp.oracle, t)}
            if case.golden is not None:
                refs["golden"] = (case.golden, t2)
            if exp.live is not None:
                refs["pytorch"] = (exp.live, t2)
            try:
                with stage(f"{session.short} runs"):
                    got = session.run(case.inputs)
            except LimitExceeded as e:  # the artifact made the runtime pass a limit: invalid, exit 2
                report.errors.append(str(e))
                status.runs, status.reason = False, f"{case.name}: {e}"
                sessions.remove(session)
                session.close()
                continue
            except Exception as e:  # the runtime's own failure on this artifact: a finding, not our bug
                error = f"run failed: {first_line(e)}"
                status.runs, status.reason = False, f"{case.name}: {error}"
                tol_of = math.inf if quantized else t
                report.checks += [
                    failed_check(session.name, case.name, o, r, error, tol_of)
                    for r in refs
                    for o in out_names
                ]
                continue
            report.checks += _compare(session.name, case, out_names, got, refs, session.gating)
            report.runs[case.name].runs[session.name] = RuntimeRun(got, t, session.gating)


def compare_backends(reports: list[Report]) -> None:
    """Artifacts of one model, dtype and weights from different backends are compared with each other,
    case by case on every runtime both ran, at twice the tolerance (each side has its own rounding).
    The checks join both reports, with reference 'backend NAME'."""
    groups = {}
    for r in reports:
        m = r.manifest
        key = (m["model"]["name"], m["dtype"], r.weights_sha256)
        groups.setdefault(key, []).append(r)
    for (_, dtype, _), group in groups.items():
        if dtype in QUANTIZED and len({r.manifest["backend"] for r in group}) > 1:
            for r in group:  # the contract bounds each against the reference, not two against each other
                r.notes.append(
                    "not compared with its sibling backends: each quantizes different products (ort-contrib "
                    "keeps Q, K and V inside its fused op), so each is judged against the oracle by the "
                    "contract"
                )
            continue
        for a, b in itertools.combinations(group, 2):
            if a.manifest["backend"] == b.manifest["backend"]:
                continue
            out_names = [o["name"] for o in a.manifest["outputs"]]
            for name, run_a in a.runs.items():
                run_b = b.runs.get(name)
                if run_b is None or not all(
                    np.array_equal(x, y) for x, y in zip(run_a.case.inputs, run_b.case.inputs)
                ):
                    continue
                for runtime in sorted(run_a.runs.keys() & run_b.runs.keys()):
                    tol = run_a.runs[runtime].tol
                    tol = tol if isinstance(tol, Contract) else 2 * tol
                    for report, mine, theirs, sibling in ((a, run_a, run_b, b), (b, run_b, run_a, a)):
                        got = mine.runs[runtime]
                        ref = {f"backend {sibling.manifest['backend']}": (theirs.runs[runtime].outputs, tol)}
                        report.checks += _compare(runtime, mine.case, out_names, got.outputs, ref, got.gating)


def _compare(
    runtime: str, case: Case, out_names: list[str], got: list, refs: dict, gating: bool = True
) -> list[Check]:
    checks = []
    with stage(STAGE_COMPARE):
        for ref_name, (ref_outputs, tol) in refs.items():
            for i, name in enumerate(out_names):
                if i >= len(got):
                    bound = math.inf if isinstance(tol, Contract) else tol
                    checks.append(failed_check(runtime, case.name, name, ref_name, "output missing", bound))
                    continue
                if isinstance(tol, Contract):
                    comparison = compare_contract(
                        got[i], ref_outputs[i], tol.mask, tol.sentences, name == LOGITS
                    )
                else:
                    comparison = compare_outputs(got[i], ref_outputs[i], tol, case.scales.get(i, 0.0))
                checks.append(Check(runtime, case.name, name, ref_name, comparison, gating))
    return checks


def localize(report: Report, artifact: Artifact, everything: bool = False) -> None:
    """Locate where the artifact diverges: each runtime with a failed check runs its failing cases again with
    the taps exposed; with `everything` (--locate) every runtime that ran does, on every case. An artifact
    without taps (qkv-onnx 0.1) gets a note instead."""
    if "taps" not in report.manifest:
        decoder = ARCHITECTURES[report.manifest["model"]["architecture"]].cached
        why = "decoder taps are not recorded yet" if decoder else "the artifact has no taps (qkv-onnx 0.1)"
        report.notes.append(f"localization: unavailable, {why}")
        return
    ran = {name for name, status in report.runtimes.items() if status.loads}
    failed: dict[str, set[str]] = {}
    for c in report.checks:
        if c.runtime in ran and (everything or (c.decides and not c.passed)):
            failed.setdefault(c.runtime, set()).add(c.case)
    if not failed:
        return
    found = report.localization = Localization()
    judged = {name: report.runtimes[name].judged_dtype for name in failed}
    with stage(STAGE_LOCATE):
        for name, cases in failed.items():
            chosen = [run.case for case, run in report.runs.items() if case in cases]
            locate(artifact, [name], chosen, judged, found)
