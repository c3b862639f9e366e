"""qkv-onnx: PyTorch attention and BERT-style encoders to ONNX with fused attention, with parity proved
against PyTorch and a NumPy float64 oracle on every runtime the artifact ships to.

The flow, one subpackage each: model_defs (PyTorch modules) -> export (torch -> ONNX artifact) ->
validate (runtimes, oracle, reports); benchmarks measures it. This folder holds what they share and that
needs no torch: the artifact format, the errors and exit codes, the input generator, the stage hook.
"""

from pathlib import Path as _Path

__version__ = "0.3.0"

# pyproject.toml maps the sibling folders model_defs/, export/, validate/ and benchmarks/ into this package
# when it is installed. In a source checkout that is not installed, find them there too.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "validate" / "__init__.py").is_file():
    __path__.append(str(_checkout))
