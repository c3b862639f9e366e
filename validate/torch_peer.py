"""A live PyTorch run of the artifact's source module, rebuilt from its manifest, where torch is installed."""
import numpy as np
from ml_dtypes import bfloat16 as x_bf16


def load_torch_peer(manifest: dict, weights: dict):
    """A callable inputs -> outputs running the source module in the artifact's dtype, or None without torch."""
    try:
        import torch

        from model_defs.config import EncoderConfig
        from model_defs.registry import build_module
    except ImportError:
        return None
    model = manifest["model"]
    module = build_module(model["architecture"], EncoderConfig.from_dict(model["config"]), model["options"])
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()}, strict=True)
    module = module.eval().to(getattr(torch, manifest["dtype"]))

    def to_torch(x):
        if x.dtype.name == "bfloat16":
            return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(np.array(x))

    def to_numpy(t):
        return t.float().numpy().astype(x_bf16) if t.dtype == torch.bfloat16 else t.numpy()

    @torch.no_grad()
    def run(inputs: list) -> list:
        out = module(*(to_torch(x) for x in inputs))
        return [to_numpy(t) for t in (out if isinstance(out, tuple) else (out,))]

    return run
