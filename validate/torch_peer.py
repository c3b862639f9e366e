"""A live PyTorch run of the artifact's source module, rebuilt from its manifest, where torch is installed."""
import numpy as np


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

    @torch.no_grad()
    def run(inputs: list) -> list:
        out = module(*(torch.from_numpy(np.array(x)) for x in inputs))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    return run
