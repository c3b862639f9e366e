"""The graph is the exporter's graph: rebuild model.onnx from the manifest's model and weights with the
exporter installed here, and require the artifact's bytes to be the same.

Possible when torch is installed and the exporter's versions (qkv-onnx, torch, onnx, onnxscript, onnx-ir)
are the ones the manifest records: exports are reproducible (fixed trace inputs, no machine paths), so
the same model, weights, backend, dtype and opset give the same bytes. The seed is not needed: the
weights are the artifact's (qkv_onnx/graph_weights.py: a float graph's own initializers, as the manifest
places them, which must be where the rebuild places them). An int8 graph is rebuilt as the export made it:
the float32 graph (its sha256 must be the one the manifest records), quantized by the same onnxruntime
with the products the manifest says the search kept in float32 (the search itself is not rerun). The
manifest's taps must be the rebuild's too. Otherwise the structural contract (`qkv_onnx.graph_contract`)
judges it.
"""

import filecmp
from pathlib import Path

from ..artifact_format import MANIFEST, MODEL, QUANTIZED, WEIGHTS, io_dtype, sha256_file
from ..errors import ArtifactError, BrokenEnvironment, ExportError, LimitExceeded, first_line, show
from ..stages import stage
from ..versions import EXPORTER_PACKAGES, exporter_versions
from .sandbox import GIB, Limits, Sandbox, SandboxedError

STAGE_REBUILD, STAGE_COMPARE = "rebuild model.onnx (exporter)", "compare with the rebuild"


def rebuild_problem(manifest: dict) -> str | None:
    """Why the graph cannot be rebuilt here (torch not installed, other exporter versions), or None."""
    here = exporter_versions()
    if here["torch"] is None or here["onnxscript"] is None:
        return "torch and onnxscript are not installed"
    recorded = manifest.get("versions")
    recorded = recorded if isinstance(recorded, dict) else {}
    differ = [
        f"{name} {recorded.get(name, 'unrecorded')} (here {here[name]})"
        for name in EXPORTER_PACKAGES
        if recorded.get(name) != here[name]
    ]
    if manifest.get("dtype") in QUANTIZED:
        quantizer, ort = manifest["quantization"]["onnxruntime"], onnxruntime_version()
        if quantizer != ort:
            differ.append(f"onnxruntime {quantizer} quantized it (here {ort})")
    if differ:
        return "exported with another exporter: " + ", ".join(differ)
    return None


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version (either distribution: they are one module)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def source_module(manifest: dict, weights: dict):
    """The manifest's model holding the artifact's parameters (their memory shared), in the artifact's dtype,
    in eval mode: what the rebuild exports and the live PyTorch comparison runs."""
    import torch

    from ..model_defs.registry import config_of, module_on

    model = manifest["model"]
    config = config_of(model["architecture"], model["config"])
    module = module_on(model["architecture"], config, model["options"], weights)
    return module.eval().to(getattr(torch, io_dtype(manifest["dtype"])))  # int8: its float32 source


def _spec(manifest: dict):
    """The ModelSpec the manifest's model was exported from."""
    from ..model_defs.registry import config_of, spec_for

    model = manifest["model"]
    config = config_of(model["architecture"], model["config"])
    return spec_for(model["name"], model["architecture"], config, model["options"])


def rebuild_stitched(manifest: dict) -> bool:
    """Whether the rebuild stitches the graph from a template (its memory a layer's, not the model's); False
    (the larger estimate) where the exporter cannot be imported here, which the rebuild then reports."""
    try:
        from ..export.graph import stitched

        return stitched(_spec(manifest), manifest["backend"])
    except ImportError:
        return False


def rebuild(manifest: dict, weights: dict, out: Path) -> dict:
    """Write the exporter's model.onnx (and model.onnx.data when the artifact has one) for the manifest's
    model and `weights` into `out`; returns its {op_counts, taps}. ArtifactError when the exporter refuses
    it."""
    from ..export.graph import export_model, requantize
    from ..model_defs.registry import count_attention_modules

    dtype, spec = manifest["dtype"], _spec(manifest)
    external = MODEL + ".data" in manifest["files"]
    opset = manifest["opset"]["ai.onnx"]  # manifest_problem checked it against the backend's range
    module = source_module(manifest, weights)
    target = out / MODEL
    source = out / "float32" / MODEL if dtype in QUANTIZED else target
    source.parent.mkdir(exist_ok=True)
    try:  # ExportError: the exporter's own refusal (an exporter error, the fusion check)
        # a float graph's external data is hashed, not stored: a rebuild takes no second copy on disk
        keep = dtype in QUANTIZED  # the quantizer reads its float32 source back
        graph = export_model(
            spec, module, manifest["backend"], io_dtype(dtype), opset, external, source, keep
        )
        if dtype in QUANTIZED:
            record = manifest["quantization"]
            if sha256_file(source) != record["float32_graph_sha256"]:
                raise ArtifactError(
                    "the float32 graph the exporter writes for this model is not the one the manifest says "
                    "was quantized (quantization.float32_graph_sha256)"
                )
            keep = [n["node"] for n in record["float_nodes"]]
            n_attention = count_attention_modules(module)
            graph = requantize(source, target, spec, manifest["backend"], n_attention, graph, keep)
    except ExportError as e:
        raise ArtifactError(
            f"the exporter cannot rebuild this model from its weights: {first_line(e)}"
        ) from None
    return {"op_counts": graph.op_counts, "taps": graph.taps, "files": graph.files, "params": graph.params}


def _first_difference(a: Path, b: Path) -> int:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return offset + next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            if not x:
                return -1
            offset += len(x)


def rebuild_in_child(manifest: dict, private: str, out: str) -> dict:
    """The rebuild as the sandboxed child runs it: the weights read (strictly) from the private copy."""
    from ..graph_weights import artifact_weights

    weights = artifact_weights(Path(private), Path(private), manifest)
    return rebuild(manifest, weights, Path(out))


def rebuild_limits(model_bytes: int) -> Limits:
    """The exporter's own needs: an interpreter with torch, the module, the traced program and the saved
    graph, each about the model's size (bert-base: 3 GB, 20-40 s here)."""
    return Limits(4 * GIB + 10 * model_bytes, 600.0 + 900.0 * model_bytes / GIB)


class PendingRebuild:
    """The exporter rebuilding model.onnx in a sandboxed child while the caller does other work (the
    oracle): `verify()` waits and requires the artifact's bytes to be the rebuild's."""

    def __init__(
        self,
        directory: Path,
        private: Path,
        manifest: dict,
        scratch: Path,
        model_bytes: int,
        start: bool = True,
    ):
        self.directory, self.private, self.scratch, self.manifest = directory, private, scratch, manifest
        self.model_bytes = model_bytes
        scratch.mkdir(mode=0o700, exist_ok=True)
        self.sandbox, self.started = None, start
        if start:  # else in verify(): after the runtimes have closed (a memory budget's plan)
            self.start()

    SANDBOX = Sandbox  # where the exporter runs (the tests' session cache runs its first rebuilds in-process)

    def start(self) -> None:
        """Start the exporter in its sandbox, writing into `scratch`."""
        self.sandbox = self.SANDBOX(rebuild_limits(self.model_bytes), self.directory / MODEL, self.private)
        self.sandbox.submit(
            "rebuilding it with the exporter",
            rebuild_in_child,
            self.manifest,
            str(self.private),
            str(self.scratch),
        )

    def built(self) -> dict:
        """Wait for the rebuild: its {op_counts, taps}, its files in `scratch`; ArtifactError (or
        LimitExceeded) naming the artifact's file when the exporter cannot rebuild it."""
        try:
            with stage(STAGE_REBUILD):
                return self.sandbox.result()
        except SandboxedError as e:  # the exporter's own failure on this model: not what it wrote
            raise ArtifactError(
                f"{show(self.directory / MODEL)}: the exporter cannot rebuild it: {e}"
            ) from None
        except (LimitExceeded, BrokenEnvironment):
            raise
        except ArtifactError as e:
            raise ArtifactError(f"{show(self.directory / MODEL)}: {e}") from None
        finally:
            self.cancel()

    def verify(self) -> dict[str, int]:
        """The rebuild's op counts, once the artifact's model.onnx (and model.onnx.data) are proven to be
        its bytes; ArtifactError (or LimitExceeded) naming the artifact's file otherwise."""
        if not self.started:
            self.started = True
            self.start()
        built = self.built()
        versions = ", ".join(f"{k} {v}" for k, v in exporter_versions().items())
        with stage(STAGE_COMPARE):
            for rel in (MODEL, MODEL + ".data"):
                mine, theirs = self.scratch / rel, self.private / rel
                if not mine.exists() and not theirs.exists():
                    continue
                hashed = built["files"].get(rel)
                if not mine.exists() and hashed is not None and theirs.exists():  # hashed, not stored
                    if hashed != self.manifest["files"][rel]:  # the private copy's bytes: as listed
                        raise ArtifactError(
                            f"{show(self.directory / rel)}: not the bytes the exporter writes for this "
                            f"manifest's model and weights (its sha256 is {hashed['sha256']}; rebuilt with "
                            f"{versions})"
                        )
                    continue
                if not (mine.exists() and theirs.exists()) or not filecmp.cmp(mine, theirs, shallow=False):
                    where = (
                        f"first difference at byte {_first_difference(mine, theirs)}"
                        if mine.exists() and theirs.exists()
                        else "the rebuild " + ("has" if mine.exists() else "has no") + f" {rel}"
                    )
                    raise ArtifactError(
                        f"{show(self.directory / rel)}: not the graph the exporter writes for this "
                        f"manifest's model and weights ({where}; rebuilt with {versions})"
                    )
        if WEIGHTS not in self.manifest["files"] and self.manifest["weights"]["in_graph"] != built["params"]:
            raise ArtifactError(
                f"{show(self.directory / MANIFEST)}: weights.in_graph is not where the exporter puts the "
                "weights in this graph"
            )
        if "taps" in self.manifest and self.manifest["taps"] != built["taps"]:
            raise ArtifactError(
                f"{show(self.directory / MANIFEST)}: taps are not the ones the exporter finds in this graph"
            )
        return built["op_counts"]

    def cancel(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
