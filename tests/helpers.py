"""Helpers shared by the test modules (import them from here; no test module imports another)."""

import hashlib
import json
import os
import stat
from pathlib import Path

import onnx

from qkv_onnx.artifact_format import DIGEST_KEY, canonical_json, manifest_digest, sha256_file
from qkv_onnx.errors import ArtifactError, show
from qkv_onnx.validate.cli import main as validate_main
from qkv_onnx.validate.runtimes import RUNTIMES, Reference, parse_providers
from qkv_onnx.validate.sandbox import Sandbox, answer

ROOT = Path(__file__).resolve().parents[1]
AUTO = parse_providers("auto")[0]
GATING = [r for r in AUTO if RUNTIMES[r].gating]
OPENVINO = RUNTIMES["openvino"].problem() is None
# --providers auto runs openvino-default only where the CPU plugin's default precision is not f32
OPENVINO_DEFAULT_IN_AUTO = "openvino-default" in AUTO
# Every model of the registry small enough to export in seconds
SMALL_MODELS = [
    *("mha", "mha-causal", "mha-cross", "mha-gqa"),
    *("encoder-block", "encoder-block-prenorm", "bert-tiny"),
]
# Cases with a row that is all padding (golden set 1, two fresh shapes): where kernels disagree about a query
# that has no key to attend to.
EMPTY_ROW_CASES = {"golden_1", "b2xs1", "b3xs7"}
NO_TORCH = (
    "import sys; sys.modules['torch'] = None; "
    "from qkv_onnx.validate.cli import main; sys.exit(main(sys.argv[1:]))"
)
NO_OPENVINO = NO_TORCH.replace("'torch'", "'openvino'")  # as if OpenVINO were not installed: its import fails
# qkv-validate as `python -m qkv_onnx.validate` runs it, with the session's rebuild cache when one is set.
VALIDATE_WITH_CACHE = (
    "import os, sys; from pathlib import Path; sys.path.insert(0, os.path.join(os.getcwd(), 'tests')); "
    "cache = os.environ.get('QKV_TEST_REBUILD_CACHE'); "
    "cache and __import__('helpers').install_rebuild_cache(Path(cache)); "
    "from qkv_onnx.validate.cli import main; sys.exit(main(sys.argv[1:]))"
)


def sampled(values, keep) -> list:
    """`values` as pytest params, all but `keep` marked `matrix` (pytest -m matrix, which CI runs too)."""
    import pytest

    return [pytest.param(v, marks=() if v == keep else pytest.mark.matrix) for v in values]


def rotation(primary: list, *others: list) -> list:
    """The cross product primary x others as pytest params: the default run keeps one cell per primary value,
    the n-th taking others' values (d[n % len(d)] for each d), so every value of every axis is met when
    primary is at least as long as each other axis; every other cell is marked `matrix` (pytest -m matrix,
    which CI runs too). Deterministic: the same cells every run."""
    import itertools

    import pytest

    chosen = {(p, *(d[n % len(d)] for d in others)) for n, p in enumerate(primary)}
    return [
        pytest.param(*cell, marks=() if cell in chosen else pytest.mark.matrix)
        for cell in itertools.product(primary, *others)
    ]


def snapshot(directory: Path) -> dict:
    """Every entry under `directory`, symlinks and special files included: what 'nothing changed' means.
    Regular files by sha256, symlinks by target, others by file type."""
    state = {}
    for parent, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = Path(parent, name)
            mode = path.lstat().st_mode
            rel = path.relative_to(directory).as_posix()
            if stat.S_ISLNK(mode):
                state[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISREG(mode):
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                state[rel] = stat.S_IFMT(mode)
    return state


def tree_bytes(directory: Path) -> dict:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def edit_manifest(directory: Path, edit, sign: bool = True) -> None:
    """Apply `edit` to the manifest and, when `sign`, re-sign it as qkv-export would (a consistent tamper)."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop(DIGEST_KEY)
    edit(manifest)
    path.write_text(canonical_json({**manifest, DIGEST_KEY: manifest_digest(manifest)} if sign else manifest))


def rehash(directory: Path, rel: str) -> None:
    """Make the manifest agree with the current bytes of `rel`."""
    entry = {"sha256": sha256_file(directory / rel), "bytes": (directory / rel).stat().st_size}
    edit_manifest(directory, lambda m: m["files"].__setitem__(rel, entry))


def weights_of(d: Path) -> dict:
    """The parameters of artifact `d` as writable arrays (from its graph, or its weights.npz)."""
    import numpy as np

    from qkv_onnx.graph_weights import artifact_weights

    manifest = json.loads((d / "manifest.json").read_text())
    return {k: np.array(v) for k, v in artifact_weights(d, d, manifest).items()}


def reweight(d: Path, weights: dict) -> None:
    """Write into artifact `d` the graph the exporter makes of `weights` (and its weights.npz where it keeps
    one), re-hashed: a consistent artifact whose golden data are the old weights' outputs."""
    from qkv_onnx.export.graph import export_model
    from qkv_onnx.export.writer import save_weights_npz
    from qkv_onnx.validate.rebuild import _spec, source_module

    manifest = json.loads((d / "manifest.json").read_text())
    external = "model.onnx.data" in manifest["files"]
    graph = export_model(
        _spec(manifest),
        source_module(manifest, weights),
        manifest["backend"],
        manifest["dtype"],
        manifest["opset"]["ai.onnx"],
        external,
        d / "model.onnx",
    )
    if "weights.npz" in manifest["files"]:
        save_weights_npz(d / "weights.npz", weights)
        rehash(d, "weights.npz")
    else:
        edit_manifest(d, lambda m: m["weights"].__setitem__("in_graph", graph.params))
    for rel in graph.files:
        rehash(d, rel)


def rewrite(d: Path, rel: str, data: bytes) -> None:
    """Replace a file and re-sign the manifest for it: a tamper the digests cannot see."""
    (d / rel).write_bytes(data)
    rehash(d, rel)


def edit_model(d: Path, edit) -> None:
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    edit(model)
    rewrite(d, "model.onnx", model.SerializeToString())


def scale_attention(d: Path, scale: float = 0.5) -> None:
    """The first Attention node given an explicit scale (the spec's default is 1/sqrt(head size), 0.25 for
    mha, 0.125 for bert-tiny): the exporter's ops, counts and weights, a different function. The structural
    contract (--no-torch) lets it through to parity; a rebuild refuses it."""
    model = onnx.load(str(d / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "Attention")
    node.attribute.append(onnx.helper.make_attribute("scale", scale))
    onnx.save(model, str(d / "model.onnx"))
    rehash(d, "model.onnx")


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def run_cli(capsys, *args):
    """qkv-validate's main(args) in-process -> (exit code, stdout, stderr, JSON document or None)."""
    argv = [str(a) for a in args]
    code = validate_main(argv)
    out, err = capsys.readouterr()
    doc = json.loads(Path(argv[argv.index("--json") + 1]).read_text()) if "--json" in argv else None
    return code, out, err, doc


def decides(check: dict) -> bool:
    """A JSON check that counts for the verdict: a non-gating runtime's numbers do not, its errors do."""
    return check["gating"] or check["verdict"] == "error"


def failing(doc: dict) -> set:
    """(runtime, reference, case) of the failed checks that decide the verdict."""
    return {
        (c["runtime"], c["reference"], c["case"])
        for a in doc["artifacts"]
        for c in a["checks"]
        if not c["passed"] and decides(c)
    }


def single_error_line(err: str, prog: str = "qkv-validate") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err
    return lines[0]


def openvino_native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin has native bfloat16 here (AVX512_BF16/AMX: 'BF16' in its capabilities).
    Without it, OpenVINO 2026.4's bfloat16 ONNX `Attention` gives a query whose keys are all masked a
    non-zero output (the average of V) where the op's spec says 0: a runtime defect the validator reports."""
    if not OPENVINO:
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# --- the session's rebuild cache ----------------------------------------------------------------------
#
# A rebuild is a function of the manifest's model, backend, dtype, opset, quantization record, external-data
# choice and weights (the exporter's versions are this session's): the session rebuilds each distinct one
# once and every later validation of it compares the artifact's bytes with that rebuild, exactly as with a
# fresh one. In-process runs get it from conftest, subprocesses (run_capped) from REBUILD_CACHE in their
# environment; a test that must see the exporter run itself is marked `real_rebuild`.

REBUILD_CACHE = "QKV_TEST_REBUILD_CACHE"


def rebuild_key(manifest: dict, private: Path) -> str:
    from qkv_onnx.graph_weights import artifact_weights, weights_sha256

    fields = {k: manifest.get(k) for k in ("model", "backend", "dtype", "opset", "quantization")}
    fields["external"] = "model.onnx.data" in manifest["files"]
    fields["weights"] = weights_sha256(artifact_weights(private, private, manifest))
    fields["in_graph"] = manifest["weights"]["in_graph"] if "weights.npz" not in manifest["files"] else None
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()


def cached_rebuild(cache: Path):
    """A PendingRebuild that takes the rebuild from `cache` when it holds this one, and adds it when not."""
    import shutil

    from qkv_onnx.validate import rebuild

    class CachedRebuild(rebuild.PendingRebuild):
        SANDBOX = InProcessSandbox

        def start(self):
            try:
                self.entry = cache / rebuild_key(self.manifest, self.private)
            except ArtifactError:  # weights the validation refuses itself, before the rebuild's verdict
                self.entry = None
            self.hit = self.entry is not None and (self.entry / "built.json").is_file()
            if not self.hit:
                super().start()
                return
            for f in self.entry.iterdir():
                if f.name != "built.json":
                    shutil.copyfile(f, self.scratch / f.name)

        def built(self):
            if self.hit:
                return json.loads((self.entry / "built.json").read_text())
            result = super().built()
            if self.entry is None:
                return result
            staging = cache / f".{self.entry.name}.{os.getpid()}"
            staging.mkdir(parents=True, exist_ok=True)
            for name in ("model.onnx", "model.onnx.data"):
                if (self.scratch / name).is_file():
                    shutil.copyfile(self.scratch / name, staging / name)
            (staging / "built.json").write_text(json.dumps(result))
            try:
                staging.rename(self.entry)
            except OSError:  # another process stored it first: the same bytes
                shutil.rmtree(staging, ignore_errors=True)
            return result

    return CachedRebuild


class InProcessSandbox(Sandbox):
    """A Sandbox without the child: the call runs here, warm (torch imported, the exporter's templates built),
    and its answer is read as the child's would be. The session's first rebuild of each artifact runs so;
    tests marked `real_rebuild` see the sandboxed child."""

    def __init__(self, limits, shown: Path, private: Path | None = None):
        self.limits, self.shown_path, self.private, self.shown = limits, shown, private, show(shown)

    def submit(self, what: str, function, *args) -> None:
        reply = answer(function, *args)  # this process's peak memory is not the call's: 0
        self.what, self.reply = what, (*reply[:4], 0) if reply[0] == "error" else reply

    def result(self):
        return self.answered(self.what, self.reply)

    def close(self) -> None:
        pass


def install_rebuild_cache(cache: Path) -> None:
    """Make this process's validations use the session's rebuild cache."""
    import qkv_onnx.validate.artifact as artifact

    artifact.PendingRebuild = cached_rebuild(cache)


CLI_MEMORY = 6 << 30  # RLIMIT_AS of a qkv-validate run in a subprocess: bert-tiny with torch needs ~3 GiB
CLI_TIMEOUT = 600


def run_capped(
    *args, memory: int = CLI_MEMORY, timeout: float = CLI_TIMEOUT, code: str | None = None, env=None
):
    """qkv-validate in a subprocess under an address-space cap and a timeout (an attack must be refused, not
    endured) -> CompletedProcess with text stdout/stderr. `code`: a `python -c` program to run instead of
    the CLI (it gets the arguments in sys.argv[1:]); `env`: variables to set in its environment."""
    import resource
    import subprocess
    import sys

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    command = [sys.executable, "-c", code or VALIDATE_WITH_CACHE]
    return subprocess.run(
        [*command, *(str(a) for a in args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=cap,
        env={**os.environ, **(env or {})},
    )


class DoublingRuntime:
    """A third-party runtime adapter as a plugin would ship it (any importable class with the Runtime
    interface): its outputs are its inputs doubled. The sandbox must host it like a built-in one."""

    name, label, short, gating = "doubling", "a doubling plugin", "doubling", True

    def __init__(self, model_path):
        self.providers, self.notes, self.compute_dtype = [f"doubling {Path(model_path).name}"], [], None

    @classmethod
    def problem(cls):
        return None

    @classmethod
    def gap(cls, artifact):
        return None

    def run(self, inputs):
        return [2 * x for x in inputs]


class RefusingRuntime(DoublingRuntime):
    """A runtime that cannot load any model, as a runtime without a kernel for a node would refuse it."""

    name, label, short = "refusing", "a refusing runtime", "refusing"

    def __init__(self, model_path):
        from qkv_onnx.errors import ProviderError

        raise ProviderError(f"{model_path}: a refusing runtime cannot load it: no kernel for node 'odd_node'")


class AgainReference(Reference):
    name, label, short = "reference-again", "a second ReferenceEvaluator", "reference again"


def trained_vectors(model, seed: int, scale: float = 0.2) -> None:
    """Move a fresh transformers model's norm weights off 1 and its biases off 0 (by N(0, scale²)), as
    training leaves them: a fresh model's equal and all-zero vectors let the exporter merge or fold
    initializers that a real checkpoint's never are."""
    import torch

    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for key, p in model.named_parameters():
            if p.ndim == 1:
                base = (
                    1.0 if any(n in key.lower() for n in ("norm", "ln")) and key.endswith("weight") else 0.0
                )
                p.copy_(base + scale * torch.randn(p.shape, generator=g))


CONFIDENT_HEAD = 16.0  # the permutation's weight in the LM head (logit units per unit of cosine)
CONFIDENT_EMBEDDING = 100.0  # token embeddings scaled so they dominate the residual stream


def save_hf_decoder(directory: Path, config: dict, kind: str, confident: bool = False):
    """transformers' GPT2LMHeadModel or LlamaForCausalLM (`kind` gpt2 or llama) of `config`, random weights at
    init scale 0.2, norms and biases off their 1 and 0 too, saved as a checkpoint (config.json +
    model.safetensors) in `directory`; returns the model.

    `confident` (an untied head in `config`): greedy margins far above int8's logit error. Plain random
    weights give near ties (the smallest top-2 margin over 64 greedy steps is ~0.001 of the logit spread,
    int8 moves logits by a few percent of it). Here the token embeddings are scaled by CONFIDENT_EMBEDDING,
    so the residual stream points along the current token's, and the head adds CONFIDENT_HEAD times the
    unit embeddings in a fixed permuted order: the next token is the permutation's image of the current one,
    by a margin of ~3.5-5 logit standard deviations, while attention and the MLPs still move every logit."""
    import torch
    import transformers as t

    t.logging.set_verbosity_error()
    hf_cfg = (t.GPT2Config if kind == "gpt2" else t.LlamaConfig)(
        **config, initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0
    )
    torch.manual_seed(1)
    hf = t.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    trained_vectors(hf, 2)
    if confident:
        embedding, head = hf.get_input_embeddings().weight, hf.get_output_embeddings().weight
        assert embedding.data_ptr() != head.data_ptr(), "a confident decoder needs an untied head"
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            embedding.copy_(torch.randn(embedding.shape, generator=g) * 0.2)  # a padding row is all zero
            order = torch.randperm(len(embedding), generator=g)
            head += CONFIDENT_HEAD * (embedding / embedding.norm(dim=1, keepdim=True))[order]
            embedding *= CONFIDENT_EMBEDDING
    hf.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    return hf
