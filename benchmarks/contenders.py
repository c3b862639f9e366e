"""The contenders: ORT CPU sessions of each backend's artifact, PyTorch eager on the same weights, and the
peer
path a user has today (Hugging Face BertModel -> TorchScript export -> onnxruntime.transformers optimizer)."""

import logging
import warnings
from pathlib import Path

import numpy as np

PEER = "peer ort-transformers"
EAGER = "torch eager"
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
OUTPUT_NAMES = ("last_hidden_state", "pooler_output")


def session_options(threads: int, spinning: bool = False, profile_prefix: str | None = None):
    """Session options of every timed session: `threads` intra-op threads, one inter-op, sequential,
    every graph optimization, spinning as asked (off for side-by-side runs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def ort_session(path: Path, threads: int, spinning: bool = False, profile_prefix: str | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), session_options(threads, spinning, profile_prefix), providers=["CPUExecutionProvider"]
    )


def bert_inputs(cfg, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full rows (no padding) from the shared input generator: {input_ids, token_type_ids, attention_mask}."""
    from ..inputs import full_rows, make_inputs
    from ..model_defs.registry import bert_spec

    records = bert_spec("bench", cfg).input_records("float32")
    arrays = make_inputs(
        records, cfg.to_dict(), batch, seq, full_rows(batch, seq), np.random.default_rng([seed, batch, seq])
    )
    return {r["name"]: a for r, a in zip(records, arrays, strict=True)}


def ort_runner(session, feeds: dict):
    names = [i.name for i in session.get_inputs()]
    feeds = {n: feeds[n] for n in names}
    return lambda: session.run(None, feeds)


def torch_runner(module, feeds: dict):
    import torch

    args = [torch.from_numpy(feeds[n]) for n in INPUT_NAMES]

    def run():
        with torch.inference_mode():
            return [t.numpy() for t in module(*args)]

    return run


def hf_config(cfg):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size,
        max_position_embeddings=cfg.max_positions,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="gelu",
        attn_implementation="eager",
    )


def hf_bert(module):
    """Hugging Face transformers' BertModel holding `module`'s weights (our names mapped to HF's)."""
    import torch
    from transformers import BertModel

    from ..model_defs.checkpoint import ours_to_hf

    cfg = module.config
    hf = BertModel(hf_config(cfg), add_pooling_layer=cfg.with_pooler).eval()
    hf.load_state_dict({ours_to_hf(k): v for k, v in module.state_dict().items()}, strict=True)

    class Outputs(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, token_type_ids, attention_mask):
            out = self.m(
                input_ids=input_ids,
                token_type_ids=token_type_ids,
                attention_mask=attention_mask,
                return_dict=False,
            )
            return tuple(out[: len(OUTPUT_NAMES) if cfg.with_pooler else 1])

    return Outputs(hf)


def export_peer(module, path: Path, opset: int = 17) -> dict:
    """The peer artifact: HF BertModel with `module`'s weights, TorchScript export (`dynamo=False`), then
    `onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`. Returns its fused-op counts."""
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = module.config
    hf = hf_bert(module)
    raw = path.with_name(path.stem + "-torchscript.onnx")
    ids = torch.zeros((2, 16), dtype=torch.int64)
    outputs = OUTPUT_NAMES if cfg.with_pooler else OUTPUT_NAMES[:1]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            hf,
            (ids, ids, torch.ones_like(ids)),
            str(raw),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=list(outputs),
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in INPUT_NAMES},
        )
        optimized = optimize_model(
            str(raw), model_type="bert", num_heads=cfg.num_heads, hidden_size=cfg.hidden_size, opt_level=0
        )
    optimized.save_model_to_file(str(path))
    return {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}


PEER_INT8 = "peer int8 (Optimum avx512_vnni)"
PEER_INT8_HOW = (
    "the peer's TorchScript export (before ORT's transformers optimizer, as Optimum quantizes it) through "
    "onnxruntime.quantization.quantize_dynamic(per_channel=False, reduce_range=False, weight_type=QInt8, "
    "every op type it supports): what `optimum-cli onnxruntime quantize --avx512_vnni` writes for dynamic "
    "quantization; ORT optimizes the graph at session creation as for every contender"
)


def quantize_peer(peer: Path, out: Path) -> None:
    """The peer recipe for int8: per-tensor dynamic quantization of the peer's float32 TorchScript export
    (`export_peer` leaves it beside the optimized graph as <name>-torchscript.onnx)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ..export.quantize import quiet_quantizer

    raw = peer.with_name(peer.stem + "-torchscript.onnx")
    with quiet_quantizer():
        quantize_dynamic(
            str(raw), str(out), per_channel=False, reduce_range=False, weight_type=QuantType.QInt8
        )


class OpenVinoModel:
    """An OpenVINO CPU compiled model behind the two ORT session methods the runners use."""

    class _Input:
        def __init__(self, name: str):
            self.name = name

    def __init__(self, path: Path, hint: str, threads: int):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.hint = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.request = self.compiled.create_infer_request()

    def get_inputs(self) -> list:
        return [self._Input(i.get_any_name()) for i in self.compiled.inputs]

    def run(self, _names, feeds: dict) -> list:
        self.request.infer(feeds)
        return [self.request.get_output_tensor(i).data.copy() for i in range(len(self.compiled.outputs))]
