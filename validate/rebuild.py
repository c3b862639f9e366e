"""The graph is the exporter's graph: rebuild model.onnx from the manifest's model and weights.npz with the
exporter installed here, and require the artifact's bytes to be the same.

Possible when torch is installed and the exporter's versions (qkv-onnx, torch, onnx, onnxscript, onnx-ir)
are the ones the manifest records: exports are reproducible (fixed trace inputs, no machine paths), so
the same model, weights, backend, dtype and opset give the same bytes. The seed is not needed: the
weights are weights.npz's. Otherwise the structural contract (`qkv_onnx.graph_contract`) judges it.
"""

import filecmp
from pathlib import Path

from ..artifact_format import MODEL, WEIGHTS
from ..errors import ArtifactError, ExportError, LimitExceeded, first_line, show
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
    if differ:
        return "exported with another exporter: " + ", ".join(differ)
    return None


def _module(manifest: dict, weights: dict):
    """The manifest's model holding weights.npz's parameters, in the artifact's dtype, in eval mode."""
    import torch

    from ..model_defs.config import EncoderConfig
    from ..model_defs.numpy_io import from_numpy
    from ..model_defs.registry import build_module

    model = manifest["model"]
    with torch.device("meta"):  # no random init: every parameter is replaced by weights.npz's
        module = build_module(
            model["architecture"], EncoderConfig.from_dict(model["config"]), model["options"]
        )
    module.load_state_dict({k: from_numpy(v) for k, v in weights.items()}, strict=True, assign=True)
    return module.eval().to(getattr(torch, manifest["dtype"]))


def rebuild(manifest: dict, weights: dict, out: Path) -> dict[str, int]:
    """Write the exporter's model.onnx (and model.onnx.data when the artifact has one) for the manifest's
    model and `weights` into `out`; returns its op counts. ArtifactError when the exporter refuses it."""
    from ..export.graph import export_model
    from ..model_defs.config import EncoderConfig
    from ..model_defs.registry import spec_for

    model = manifest["model"]
    spec = spec_for(
        model["name"], model["architecture"], EncoderConfig.from_dict(model["config"]), model["options"]
    )
    external = MODEL + ".data" in manifest["files"]
    opset = manifest.get("opset", {}).get("ai.onnx") if isinstance(manifest.get("opset"), dict) else None
    problem = "no ai.onnx opset" if type(opset) is not int else None
    from ..artifact_format import BACKENDS

    problem = problem or BACKENDS[manifest["backend"]].opset_problem(opset)
    if problem:
        raise ArtifactError(f"manifest opset: {problem}")
    try:  # ExportError: the exporter's own refusal (an exporter error, the fusion check)
        graph = export_model(
            spec,
            _module(manifest, weights),
            manifest["backend"],
            manifest["dtype"],
            opset,
            external,
            out / MODEL,
        )
    except ExportError as e:
        raise ArtifactError(
            f"the exporter cannot rebuild this model from weights.npz: {first_line(e)}"
        ) from None
    return graph.op_counts


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


def rebuild_in_child(manifest: dict, weights_path: str, out: str) -> dict[str, int]:
    """The rebuild as the sandboxed child runs it: weights.npz read (strictly) from the private copy."""
    from ..artifact_format import expected_weights
    from ..graph_contract import weight_dtype
    from .npz import read_weights

    expected = expected_weights(manifest["model"]["architecture"], manifest["model"]["config"])
    weights = read_weights(Path(weights_path), Path(weights_path), expected, weight_dtype(manifest["dtype"]))
    return rebuild(manifest, weights, Path(out))


def rebuild_limits(model_bytes: int) -> Limits:
    """The exporter's own needs: an interpreter with torch, the module, the traced program and the saved
    graph, each about the model's size (bert-base: 3 GB, 20-40 s here)."""
    return Limits(4 * GIB + 10 * model_bytes, 600.0 + 900.0 * model_bytes / GIB)


class PendingRebuild:
    """The exporter rebuilding model.onnx in a sandboxed child while the caller does other work (the
    oracle): `verify()` waits and requires the artifact's bytes to be the rebuild's."""

    def __init__(self, directory: Path, private: Path, manifest: dict, scratch: Path, model_bytes: int):
        self.directory, self.private, self.scratch = directory, private, scratch
        scratch.mkdir(mode=0o700, exist_ok=True)
        self.sandbox = Sandbox(rebuild_limits(model_bytes), directory / MODEL, private)
        self.sandbox.submit(
            "rebuilding it with the exporter",
            rebuild_in_child,
            manifest,
            str(private / WEIGHTS),
            str(scratch),
        )

    def verify(self) -> dict[str, int]:
        """The rebuild's op counts, once the artifact's model.onnx (and model.onnx.data) are proven to be
        its bytes; ArtifactError (or LimitExceeded) naming the artifact's file otherwise."""
        try:
            with stage(STAGE_REBUILD):
                op_counts = self.sandbox.result()
        except SandboxedError as e:  # the exporter's own failure on this model: not what it wrote
            raise ArtifactError(
                f"{show(self.directory / MODEL)}: the exporter cannot rebuild it: {e}"
            ) from None
        except LimitExceeded:
            raise
        except ArtifactError as e:
            raise ArtifactError(f"{show(self.directory / MODEL)}: {e}") from None
        finally:
            self.sandbox.close()
        versions = ", ".join(f"{k} {v}" for k, v in exporter_versions().items())
        with stage(STAGE_COMPARE):
            for rel in (MODEL, MODEL + ".data"):
                mine, theirs = self.scratch / rel, self.private / rel
                if not mine.exists() and not theirs.exists():
                    continue
                if not (mine.exists() and theirs.exists()) or not filecmp.cmp(mine, theirs, shallow=False):
                    where = (
                        f"first difference at byte {_first_difference(mine, theirs)}"
                        if mine.exists() and theirs.exists()
                        else "the rebuild " + ("has" if mine.exists() else "has no") + f" {rel}"
                    )
                    raise ArtifactError(
                        f"{show(self.directory / rel)}: not the graph the exporter writes for this "
                        f"manifest's model and {WEIGHTS} ({where}; rebuilt with {versions})"
                    )
        return op_counts

    def cancel(self) -> None:
        self.sandbox.close()
