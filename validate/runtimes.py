"""Runtimes that execute an artifact: ONNX Runtime's CPU provider and onnx's ReferenceEvaluator."""
from pathlib import Path

PROVIDERS = {"cpu": "ONNX Runtime CPUExecutionProvider", "reference": "onnx.reference.ReferenceEvaluator"}


class ProviderError(Exception):
    """The requested runtime cannot run here (exit code 2)."""


class OrtCpu:
    name = "cpu"

    def __init__(self, model_path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ProviderError(f"{model_path}: ONNX Runtime CPU cannot load it: {str(e).strip().splitlines()[0]}") from None
        if self.session.get_providers()[0] != "CPUExecutionProvider":
            raise ProviderError(f"{model_path}: session runs on {self.session.get_providers()}, not the CPU provider")
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: list) -> list:
        return self.session.run(None, dict(zip(self.input_names, inputs)))


class Reference:
    name = "reference"

    def __init__(self, model_path: Path):
        import onnx
        from onnx.reference import ReferenceEvaluator

        try:
            self.session = ReferenceEvaluator(onnx.load(str(model_path)))
        except Exception as e:
            raise ProviderError(f"{model_path}: ReferenceEvaluator cannot load it: {str(e).strip().splitlines()[0]}") from None
        self.input_names = list(self.session.input_names)

    def run(self, inputs: list) -> list:
        return self.session.run(None, dict(zip(self.input_names, inputs)))


RUNTIMES = {"cpu": OrtCpu, "reference": Reference}


def parse_providers(text: str) -> list:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in RUNTIMES]
    if unknown or not names:
        raise ProviderError(f"unknown provider(s) {unknown or text!r}; available: {', '.join(RUNTIMES)}")
    return names
