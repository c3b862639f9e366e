"""torch -> ONNX export with fused attention, the fusion check, and the artifact writer."""


class ExportError(RuntimeError):
    """The export failed: the exporter errored or the fusion check refused the graph (exit code 1)."""
