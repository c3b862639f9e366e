"""torch <-> NumPy, bfloat16 included: NumPy has no bfloat16 of its own, ml_dtypes' (what onnx uses)
holds it."""

import warnings

import ml_dtypes
import numpy as np
import torch


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a NumPy array of the same dtype (torch.bfloat16 -> ml_dtypes.bfloat16)."""
    t = t.detach().cpu()
    return t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A NumPy array as a tensor of the same dtype (ml_dtypes.bfloat16 -> torch.bfloat16), never sharing
    memory with `a`."""
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def shared(a: np.ndarray) -> torch.Tensor:
    """A read-only array (validation's memory-mapped weights) as a tensor on the same memory, for a module
    that only reads its parameters (inference, export): a model's weights are not copied into the heap."""
    if a.dtype == ml_dtypes.bfloat16:
        return from_numpy(a)
    with warnings.catch_warnings():  # torch warns that it cannot protect a read-only array from writes
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def weights_to_numpy(state: dict) -> dict[str, np.ndarray]:
    """A state_dict as weights.npz holds it: bfloat16 as float32 (exact; .npy has no bfloat16)."""
    return {
        k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        for k, v in state.items()
    }
