"""Package versions, read from installed metadata (nothing is imported): what a manifest records, and
which of them decide the bytes an export writes."""

import sys
from importlib.metadata import PackageNotFoundError, version

from . import __version__

# The packages whose versions decide model.onnx's bytes: the same ones rebuild the same graph.
EXPORTER_PACKAGES = ("qkv-onnx", "torch", "onnx", "onnxscript", "onnx-ir")
RECORDED = ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime-gpu", "onnxruntime", "numpy")


def _installed(name: str) -> str | None:
    if name == "qkv-onnx":
        return __version__
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def package_versions() -> dict[str, str]:
    """What the manifest records: Python, qkv-onnx, the exporter, and what made the golden data."""
    out = {"python": sys.version.split()[0], "qkv-onnx": __version__}
    for name in RECORDED:
        found = _installed(name)
        if found is not None:
            out[name] = found
    return out


def exporter_versions() -> dict[str, str | None]:
    """{package: installed version or None} of EXPORTER_PACKAGES."""
    return {name: _installed(name) for name in EXPORTER_PACKAGES}
