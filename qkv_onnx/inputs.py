"""Model inputs generated from their roles: one generator for export's golden sets, validation's fresh
cases and the benchmarks. NumPy only (validation runs without torch)."""

from collections.abc import Sequence

import numpy as np

from .artifact_format import FLOAT_ROLES, np_dtype

KV_EXTRA = 3  # cross-attention: the context (keys) is this much longer than the queries


def make_inputs(
    inputs: Sequence[dict],
    config: dict,
    batch: int,
    seq: int,
    lengths: Sequence[int],
    rng: np.random.Generator,
    kv_seq: int | None = None,
    past: int = 0,
) -> list[np.ndarray]:
    """Seeded inputs in graph order for `inputs` (manifest records: name, role, dtype, shape with symbolic
    'batch', 'seq', 'kv_seq'). `lengths[b]` real tokens in row b of the padding mask, 0 = a row that is all
    padding; cross-attention keys are `kv_seq` long (default seq + KV_EXTRA). Hidden states are standard
    normal in the input's dtype; token and segment ids uniform over the config's vocabularies, and the
    config's pad_token_id where the padding mask is 0 (as a tokenizer pads).

    A decoder's (inputs with a past_key role) mask spans the `past` cached tokens and the `seq` new ones, and
    its rows are padded on the left, as batched generation pads a prompt: row b's last `lengths[b]` of them
    are real. Its position ids count the real tokens from 0 (1 at padding, as transformers' generate gives
    them), and the cache is standard normal."""
    if len(lengths) != batch:
        raise ValueError(f"{len(lengths)} row lengths for batch {batch}")
    dims = {"batch": batch, "seq": seq, "kv_seq": seq + KV_EXTRA if kv_seq is None else kv_seq}
    dims.update(past=past, total=past + seq)
    lengths = np.asarray(lengths)[:, None]
    decoder = any(spec["role"] == "past_key" for spec in inputs)
    if past and not decoder:
        raise ValueError(f"past {past}: only a decoder has a cache")
    if decoder:
        mask = np.arange(dims["total"])[None, :] >= dims["total"] - lengths
        positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 1)[:, past:]
    else:
        mask = np.arange(dims["seq"])[None, :] < lengths
    real = mask[:, past:]
    out = []
    for spec in inputs:
        shape = tuple(dims[d] if isinstance(d, str) else d for d in spec["shape"])
        role = spec["role"]
        if role in FLOAT_ROLES:
            x = rng.standard_normal(shape).astype(np_dtype(spec["dtype"]))
        elif role == "token_ids":
            x = rng.integers(0, config["vocab_size"], shape, dtype=np.int64)
            x[~real] = config.get("pad_token_id", 0)
        elif role == "segment_ids":
            x = rng.integers(0, config["type_vocab_size"], shape, dtype=np.int64)
        elif role == "padding_mask":
            x = mask if decoder else np.arange(shape[1])[None, :] < lengths
            x = x.astype(np.int64)
        elif role == "position_ids":
            x = positions.astype(np.int64)
        else:
            raise ValueError(f"input {spec['name']!r}: unknown role {role!r}")
        out.append(x)
    return out


def full_rows(batch: int, seq: int) -> list[int]:
    """Row lengths of a batch without padding."""
    return [seq] * batch


def fit(shape: tuple, longest: int) -> tuple:
    """A (batch, seq, lengths) case shortened to a model's longest sequence, its lengths in proportion."""
    batch, seq, lengths = shape
    if seq <= longest:
        return shape
    return batch, longest, [min(longest, -(-n * longest // seq)) for n in lengths]
