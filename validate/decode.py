"""A decoder's cache, proven on every runtime that ran it (beside the full-sequence parity of every artifact):

- decode: a left-padded prompt prefilled, then one token per step with `present` fed back as `past`; at
  every step the logits, and each layer's cache, equal the runtime's own full-sequence pass at that position
  (within twice the rounding tolerance: two computations, each within it of the truth). An int8 artifact's
  activations are quantized per tensor at run time, so its two passes round differently: its steps are held
  to the contract's token cosine and relative error instead (its next-token agreement is judged against the
  oracle on the full-sequence cases, and by the greedy tokens). A mismatch names the step ('step 3') and the
  output ('present.1.key': layer 1).
- greedy: GREEDY_TOKENS tokens generated greedily from the same prompt with the cache give the same ids as
  the PyTorch source with its own cache (or, without torch, the NumPy oracle with its cache), up to a near tie
  that the policy's logit bound explains (greedy_check).
"""

import numpy as np

from .. import rope
from ..accuracy_contract import NEXT_TOKEN_TIE
from ..artifact_format import QUANTIZED, io_dtype, np_dtype
from ..decoder_format import head_dim, kv_heads
from ..inputs import make_inputs
from ..stages import stage
from .compare import compare_contract, compare_outputs, model_error_terms, tolerance
from .results import Check, failed_check

PROMPT = (2, 8, [8, 5])  # batch, prompt tokens, real ones per row (left padded)
DECODE_STEPS = 8
GREEDY_TOKENS = 32
STAGE_DECODE, STAGE_GREEDY = "cached decode vs full sequence", "greedy generation"


class Decoder:
    """Feeds in graph order for a manifest's decoder; `run(inputs) -> outputs` is a session or a peer."""

    def __init__(self, manifest: dict, run):
        self.m, self.run = manifest, run
        self.cfg = manifest["model"]["config"]
        self.layers = self.cfg["num_layers"]
        self.dtype = np_dtype(io_dtype(manifest["dtype"]))

    def empty(self, batch: int) -> list:
        shape = (batch, kv_heads(self.cfg), 0, head_dim(self.cfg))
        return [np.zeros(shape, self.dtype) for _ in range(2 * self.layers)]

    def __call__(self, ids, mask, past) -> tuple[np.ndarray, list]:
        """(logits, present) for new tokens `ids` under `mask` (past + new), positions from the mask."""
        positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 1)[:, -ids.shape[1] :]
        out = self.run([ids, mask, positions.astype(np.int64), *past])
        return out[0], list(out[1:])

    def extend(self, ids, mask, past, new: int = 1) -> tuple[np.ndarray, list]:
        """(logits, present) of the last `new` tokens of the sequence so far (`ids`, `mask`), reading `past`,
        the cache of the ones before. A longrope model chooses its factors per call, by the call's largest
        position: where this call crosses the switch (largest position + 1 past original_max_position_
        embeddings) over a cache made below it, the whole sequence is run again without a cache, as Phi-3's
        generate drops its cache there (docs/decoders.md)."""
        if self.switch is not None and past[0].shape[2]:
            longest = mask.sum(axis=1).max()  # largest position + 1: positions count the real tokens
            if longest - new <= self.switch < longest:
                logits, present = self(ids, mask, self.empty(ids.shape[0]))
                return logits[:, -new:], present
        return self(ids[:, -new:], mask, past)

    @property
    def switch(self) -> int | None:
        return rope.switches(self.cfg) if self.cfg["positions"] == "rope" else None

    def prefix(self, ids, mask, length: int) -> tuple[np.ndarray, list]:
        """The uncached pass over the first `length` tokens: what each cached step is held to."""
        return self(ids[:, :length], mask[:, :length], self.empty(ids.shape[0]))


def prompt(manifest: dict, seed: int, extra: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of the seeded left-padded prompt followed by `extra` real tokens."""
    batch, k, lengths = PROMPT
    records = [i for i in manifest["inputs"] if i["role"] in ("token_ids", "padding_mask")]
    rng = np.random.default_rng([seed, 7])
    ids, mask = make_inputs(
        records, manifest["model"]["config"], batch, k + extra, [n + extra for n in lengths], rng, past=0
    )
    return ids, mask


def decode_checks(name: str, run, manifest: dict, weights: dict, seed: int, gating: bool = True) -> list:
    """Prefill then DECODE_STEPS single-token steps against the full-sequence pass of the same run."""
    dec = Decoder(manifest, run)
    ids, mask = prompt(manifest, seed, DECODE_STEPS)
    k = PROMPT[1]
    tol = 2 * tolerance(io_dtype(manifest["dtype"]), *model_error_terms(manifest, ids.shape[1], weights))
    names = [o["name"] for o in manifest["outputs"]]
    checks = []

    def judge(a, b, real):
        if manifest["dtype"] in QUANTIZED:  # activations quantized per tensor at run time: scales differ
            return compare_contract(a, b, real, False)  # a cache judged per real token, as the contract reads
        return compare_outputs(a, b, tol)

    with stage(STAGE_DECODE):
        try:
            full = dec(ids, mask, dec.empty(ids.shape[0]))

            def reference(length):  # the uncached pass's logits and cache up to `length`
                logits, cache = full if dec.switch is None else dec.prefix(ids, mask, length)
                return logits[:, :length], [c[:, :, :length] for c in cache]

            logits, past = dec.prefix(ids, mask, k)
            steps = [("prefill", logits, *reference(k), past, k)]
            for i in range(DECODE_STEPS):
                t = k + i
                logits, past = dec.extend(ids[:, : t + 1], mask[:, : t + 1], past)
                want, want_cache = reference(t + 1)
                steps.append((f"step {i + 1}", logits, want[:, t : t + 1], want_cache, past, t + 1))
        except Exception as e:
            return [failed_check(name, "cached decode", "logits", "full sequence", f"run failed: {e}", tol)]
        for case, got, want, want_cache, cache, length in steps:
            pairs = [(got, want)] + list(zip(cache, want_cache))
            real = [mask[:, length - got.shape[1] : length]] + [mask[:, :length]] * len(cache)
            checks += [
                Check(name, case, out, "full sequence", judge(a, b, m), gating)
                for out, (a, b), m in zip(names, pairs, real)
            ]
    return checks


def greedy(dec: Decoder, ids: np.ndarray, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, n), each step's last logits (B, n, vocab)): greedy decoding with the cache."""
    logits, past = dec(ids, mask, dec.empty(ids.shape[0]))
    tokens, lasts = [], []
    for step in range(n):
        lasts.append(logits[:, -1].astype(np.float64))
        tokens.append(lasts[-1].argmax(-1))
        if step + 1 < n:
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
            ids = np.concatenate([ids, tokens[-1][:, None].astype(np.int64)], axis=1)
            logits, past = dec.extend(ids, mask, past)
    return np.stack(tokens, 1), np.stack(lasts, 1)


def margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit along the last axis."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def greedy_reference(reference_run, manifest: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's greedy (tokens, logits) on the prompt greedy_check uses: computed once per artifact."""
    ids, mask = prompt(manifest, seed, 0)
    with stage(STAGE_GREEDY):
        return greedy(Decoder(manifest, reference_run), ids, mask, GREEDY_TOKENS)


def logit_tolerance(manifest: dict, reference: str, key_length: int) -> float:
    """The rounding tolerance of a float artifact's logits against `reference` (oracle; PyTorch: twice)."""
    tol = tolerance(io_dtype(manifest["dtype"]), *model_error_terms(manifest, key_length))
    return tol if reference == "oracle" else 2 * tol


def greedy_check(name: str, run, reference: str, expected: tuple, manifest: dict, seed: int, gating=True):
    """(check, note): the runtime's GREEDY_TOKENS greedy ids against the reference's (`expected`:
    greedy_reference), from the same prompt.
    Equal passes. At the first step where they differ, both runs read the same tokens, so their logits there
    differ only by the runtime's error. The flip is a near tie, a pass with a note, when every logit up to
    that step is within its bound (float: the rounding tolerance's atol, doubled against PyTorch; int8: the
    contract) and the reference's top-2 margin there is within what that bound allows, never what this
    runtime's own error would: 2 * atol (two logits each within atol of the reference's; docs/tolerance.md),
    or for int8 the contract's NEXT_TOKEN_TIE share of the position's logit range. Otherwise a failure naming
    the step."""
    ids, mask = prompt(manifest, seed, 0)
    out = f"greedy {GREEDY_TOKENS} tokens"
    with stage(STAGE_GREEDY):
        try:
            got, got_logits = greedy(Decoder(manifest, run), ids, mask, GREEDY_TOKENS)
        except Exception as e:
            return failed_check(name, "greedy", out, reference, f"run failed: {e}", 0.0), None
    want, want_logits = expected
    if np.array_equal(got, want):
        return Check(name, "greedy", out, reference, compare_outputs(got, want, 0.0), gating), None
    step = int(np.argwhere(got != want)[:, 1].min())
    b = int(np.argwhere(got[:, step] != want[:, step])[0, 0])
    upto = got_logits[:, : step + 1], want_logits[:, : step + 1]  # the last position's logits of each step
    if manifest["dtype"] in QUANTIZED:
        logits = compare_contract(*upto, None, False, logits=True)
        allowance = NEXT_TOKEN_TIE * float(np.ptp(want_logits[b, step]))
    else:
        logits = compare_outputs(*upto, logit_tolerance(manifest, reference, ids.shape[1] + step + 1))
        allowance = 2 * logits.metrics.atol if logits.metrics else 0.0
    margin = float(margins(want_logits[b, step]))
    where = (
        f"row {b} step {step + 1}: token {int(got[b, step])}, {reference} {int(want[b, step])}, "
        f"{reference}'s top-2 logit margin there {margin:.3g}, near-tie allowance {allowance:.3g}"
    )
    if margin <= allowance and logits.passed:
        note = f"{name}: greedy tokens equal for {step} steps, then a near tie ({where})"
        return Check(name, "greedy", out, reference, logits, gating), note
    if margin <= allowance:
        where += f", but its logits up to it are not within their bound ({describe(logits)})"
    return failed_check(name, "greedy", out, reference, where, 0.0), None


def describe(c) -> str:
    """A failed comparison in a few words: its error, its contract misses, or max abs against atol."""
    if c.error is not None:
        return c.error
    if c.contract is not None:
        return c.contract.describe()
    return f"max abs {c.metrics.max_abs:.3g} > atol {c.metrics.atol:.3g}"
