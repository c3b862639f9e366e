"""ONNX Runtime, one adapter per execution provider.

An ORT session runs on the provider asked for, never quietly on the CPU: for any other provider
the session is first created with CPU fallback disabled (`session.disable_cpu_ep_fallback`), and
`get_providers()` must confirm it. ORT's CUDA provider moves small shape computations (int64
Gather/Concat on tensor shapes) to the CPU by its own cost model even though it has kernels for
them, which a strict session refuses. Only when every node ORT puts on the CPU is such a
cost-model placement is the session made with fallback allowed, and those nodes are reported;
a node the provider has no kernel for is always an error that names it.
"""

import ctypes
import os
import tempfile
from pathlib import Path

from ...errors import first_line
from .base import ProviderError, Runtime

ORT_PROVIDERS = {"cpu": ("CPUExecutionProvider", {}), "cuda": ("CUDAExecutionProvider", {"use_tf32": "0"})}


class _Stderr:
    """Capture what native code writes to file descriptor 2 (ORT's logger) while the block runs."""

    def __enter__(self):
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()


def parse_placements(log: str) -> dict:
    """{provider: [node, ...] or a node count} from ORT's verbose 'Node placements' log."""
    placements, current = {}, None
    for line in log.splitlines():
        if "placed on [" in line:
            ep = line.split("placed on [", 1)[1].split("]", 1)[0]
            count = int(line.rsplit(":", 1)[1])
            placements[ep] = count if "All nodes" in line else []
            current = None if "All nodes" in line else ep
        elif current and "VerifyEachNodeIsAssignedToAnEp]" in line:
            placements[current].append(line.split("]", 1)[1].strip())
    return placements


COST_MODEL = "Force fallback to CPU execution for node: "


def cost_model_nodes(log: str) -> set:
    """Names of the nodes ORT's log says it moved to the CPU by cost, though the provider could run them."""
    return {
        line.split(COST_MODEL, 1)[1].split(" because ", 1)[0].strip()
        for line in log.splitlines()
        if COST_MODEL in line
    }


def _node_name(entry: str) -> str:
    """'Gather (node_Gather_4)' -> 'node_Gather_4'."""
    return entry[entry.find("(") + 1 : entry.rfind(")")] if entry.endswith(")") else entry


def cpu_placement(log: str) -> tuple:
    """(nodes on the CPU, those among them ORT did not move by cost) from its verbose session log.
    Nodes are 'OpType (name)' entries, or a count when the whole graph is on the CPU."""
    on_cpu = parse_placements(log).get("CPUExecutionProvider", [])
    if isinstance(on_cpu, int):
        return on_cpu, on_cpu
    cheap = cost_model_nodes(log)
    return on_cpu, [n for n in on_cpu if _node_name(n) not in cheap]


def placement_log(model_path: Path, ep: str) -> str:
    """ORT's verbose log of creating a session for `ep` with CPU fallback allowed."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 0
    ort.set_default_logger_severity(0)  # the cost-model lines go to the default logger
    with _Stderr() as err:
        try:
            ort.InferenceSession(str(model_path), opts, providers=[ep])
        except Exception:
            pass
    ort.set_default_logger_severity(2)  # ORT's default, warnings
    return err.text


def _listing(nodes: list) -> str:
    return f"{len(nodes)}: " + ", ".join(nodes[:5]) + (" ..." if len(nodes) > 5 else "")


class OrtSession(Runtime):
    """An ONNX Runtime session pinned to one execution provider (see the module docstring)."""

    def __init__(self, model_path: Path, name: str = "cpu"):
        super().__init__(model_path)
        self.name = name
        self.cpu_nodes = []  # shape nodes ORT's cost model keeps on the CPU, when there are any
        ep, options = ORT_PROVIDERS[name]
        try:
            self.session = self._create(model_path, ep, options, strict=ep != "CPUExecutionProvider")
        except Exception as e:
            reason = first_line(e).split(" : ")[-1]
            if "fallback to CPU EP has been explicitly disabled" not in reason:
                raise ProviderError(f"{model_path}: ONNX Runtime {ep} cannot run it: {reason}") from None
            on_cpu, unexplained = cpu_placement(placement_log(model_path, ep))
            if not on_cpu or unexplained:
                detail = (
                    f"all {unexplained} nodes"
                    if isinstance(unexplained, int)
                    else _listing(unexplained)
                    if unexplained
                    else reason
                )
                raise ProviderError(
                    f"{model_path}: ONNX Runtime {ep} has no kernel for node(s) that CPU fallback "
                    f"would take, and fallback is disabled: {detail}"
                ) from None
            self.session = self._create(model_path, ep, options, strict=False)
            self.cpu_nodes = on_cpu
        if self.session.get_providers()[0] != ep:
            raise ProviderError(f"{model_path}: session runs on {self.session.get_providers()}, not {ep}")
        self.providers = self.session.get_providers()
        if self.cpu_nodes:
            self.notes.append(
                f"{len(self.cpu_nodes)} shape node(s) left on the CPU by ORT's cost model (the "
                f"provider has kernels for them): {', '.join(self.cpu_nodes)}"
            )
        self.input_names = [i.name for i in self.session.get_inputs()]

    @staticmethod
    def _create(model_path: Path, ep: str, options: dict, strict: bool):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if strict:
            opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        with _Stderr():
            return ort.InferenceSession(str(model_path), opts, providers=[(ep, options)])

    def run(self, inputs: list) -> list:
        return self.session.run(None, dict(zip(self.input_names, inputs)))


class OrtCpu(OrtSession):
    name, label, short = "cpu", "ONNX Runtime CPUExecutionProvider", "ORT CPU"

    def __init__(self, model_path: Path):
        super().__init__(model_path, "cpu")

    @classmethod
    def gap(cls, artifact) -> str | None:
        if artifact.manifest["dtype"] == "bfloat16":
            return (
                "ONNX Runtime's CPU provider has no bfloat16 kernels; validate bfloat16 artifacts with "
                "--providers cuda on a GPU machine, or openvino"
            )
        return None


class OrtCuda(OrtSession):
    name, label, short = "cuda", "ONNX Runtime CUDAExecutionProvider (TF32 off)", "ORT CUDA"

    def __init__(self, model_path: Path):
        super().__init__(model_path, "cuda")

    @classmethod
    def problem(cls) -> str | None:
        return cuda_problem()


def single_node_model(path: Path, node, elem_type: int, shape: list) -> Path:
    """Write a model of one node `x -> y` (both of `elem_type` and `shape`) to `path`: provider probes."""
    import onnx
    from onnx import helper

    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", elem_type, shape)],
        [helper.make_tensor_value_info("y", elem_type, shape)],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(node.domain, 1)] if node.domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), str(path))
    return path


def cuda_problem() -> str | None:
    """Why ONNX Runtime's CUDA provider cannot run here, or None when a CUDA session really works."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            f"onnxruntime {ort.__version__} is built without CUDAExecutionProvider (install onnxruntime-gpu)"
        )
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if library.exists():
        try:
            ctypes.CDLL(str(library))
        except OSError as e:
            return f"the CUDA provider library does not load: {e}"
    with tempfile.TemporaryDirectory() as d:
        path = single_node_model(
            Path(d) / "probe.onnx", helper.make_node("Add", ["x", "x"], ["y"]), TensorProto.FLOAT, [1]
        )
        try:
            OrtSession(path, "cuda")
        except ProviderError as e:
            return str(e).split(": ", 1)[-1]
    return None
