"""torch -> ONNX export with fused attention, the fusion check, and the artifact writer."""

from ..errors import ExportError

__all__ = ["ExportError"]
