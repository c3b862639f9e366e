"""A live PyTorch run of the artifact's source module, rebuilt from its manifest, where torch is installed."""

from collections.abc import Callable

import numpy as np

from ..errors import BrokenEnvironment, first_line
from ..versions import exporter_versions


def load_torch_peer(manifest: dict, weights: dict) -> Callable[[list], list] | None:
    """A callable inputs -> outputs running the source module in the artifact's dtype, or None without
    torch; BrokenEnvironment when torch is there but fails inside its import."""
    try:
        import torch

        from ..model_defs.numpy_io import from_numpy, to_numpy
        from .rebuild import source_module
    except ImportError as e:
        if exporter_versions()["torch"] is None or getattr(e, "name", None) == "torch":
            return None  # absent (a stale record of it, or blocked in sys.modules, is absent too)
        raise BrokenEnvironment(
            f"torch {exporter_versions()['torch']} is installed but cannot be imported "
            f"({type(e).__name__}: {first_line(e)})"
        ) from None
    module = source_module(manifest, weights)

    @torch.no_grad()
    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        out = module(*(from_numpy(x) for x in inputs))
        return [to_numpy(t) for t in (out if isinstance(out, tuple) else (out,))]

    return run
