"""The accuracy contract of quantized artifacts: what "still the same model" means when the rounding policy
cannot apply (int8 moves outputs by ~10% of their scale, far beyond any float tolerance, and loosening that
tolerance would let anything pass). Judged against the float64 reference on every case; on real sentences
also through what sentence embeddings are used for. The thresholds are here, in code, never read from a
manifest; docs/accuracy-contract.md gives the reasoning. NumPy only: export and validate both use it.
"""

from dataclasses import dataclass, field

import numpy as np

from .text import mean_pool

# name: (comparison, threshold). Per output of every case:
TOKEN_COSINE_MIN = 0.95  # every real token's hidden vector (every row of a 2-D output) keeps its direction
RELATIVE_ERROR_MAX = 0.2  # ||actual - reference|| / ||reference|| over the output
# On real sentences (mean-pooled, L2-normalized last_hidden_state, as sentence-transformers computes it):
SENTENCE_COSINE_MIN = 0.99  # each sentence's embedding
SIMILARITY_DEVIATION_MAX = 0.02  # every pairwise cosine similarity between the sentences
RANK_AGREEMENT_MIN = 0.95  # Spearman correlation of the pairwise similarities: retrieval order kept
# A decoder's logits (every real position): the next token it would pick, greedy, is the reference's, except
# where the reference itself nearly ties (top-2 margin under NEXT_TOKEN_TIE of the position's logit range:
# there any rounding picks either, float32 included)
NEXT_TOKEN_AGREEMENT_MIN = 0.95
NEXT_TOKEN_TIE = 0.01

LIMITS = {
    "token_cosine_min": (">=", TOKEN_COSINE_MIN),
    "relative_error": ("<=", RELATIVE_ERROR_MAX),
    "sentence_cosine_min": (">=", SENTENCE_COSINE_MIN),
    "similarity_deviation_max": ("<=", SIMILARITY_DEVIATION_MAX),
    "rank_agreement": (">=", RANK_AGREEMENT_MIN),
    "next_token_agreement": (">=", NEXT_TOKEN_AGREEMENT_MIN),
}


@dataclass(frozen=True)
class ContractResult:
    """The contract's metrics for one output of one case, and which of them miss their limit."""

    values: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.values.items() if not within(v, *LIMITS[k])]

    @property
    def passed(self) -> bool:
        return not self.failed

    def describe(self) -> str:
        """'sentence_cosine_min 0.9895 < 0.99, ...' for the misses, or the metrics when all hold."""
        keys = self.failed or list(self.values)
        return ", ".join(
            f"{k} {self.values[k]:.4f} {_sign(k, k in self.failed)} {LIMITS[k][1]}" for k in keys
        )

    def to_json(self) -> dict:
        return {
            "values": self.values,
            "limits": {k: list(LIMITS[k]) for k in self.values},
            "failed": self.failed,
        }


def within(value: float, op: str, limit: float) -> bool:
    return bool(np.isfinite(value)) and (value >= limit if op == ">=" else value <= limit)


def _sign(key: str, failed: bool) -> str:
    op = LIMITS[key][0]
    if not failed:
        return op.replace(">=", "≥").replace("<=", "≤")
    return "<" if op == ">=" else ">"


def _rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The vectors whose direction matters: real tokens of a (B, L, H) output, the rows of a (B, H) one. A
    cache output (B, heads, L, head_dim) whose L is the mask's is a token's keys or values: one vector per
    real token, all heads together (a padded position's cache entry is never attended to)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 4 and mask is not None and mask.shape == (x.shape[0], x.shape[2]):
        x = x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
    if x.ndim == 3 and mask is not None and mask.shape == x.shape[:2]:
        return x[mask.astype(bool)]
    return x.reshape(-1, x.shape[-1])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (1 where both rows are zero, 0 where only one is)."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    both = (na > 0) & (nb > 0)
    out = np.where((na == 0) & (nb == 0), 1.0, 0.0)
    return np.where(both, (a * b).sum(-1) / np.where(both, na * nb, 1.0), out)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two vectors (average ranks for ties)."""

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        _, tie, count = np.unique(x, return_inverse=True, return_counts=True)
        return (np.bincount(tie, weights=r) / count)[tie]  # ties share their average rank

    ra, rb = ranks(np.asarray(a, np.float64)), ranks(np.asarray(b, np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def judge(
    actual: np.ndarray, reference: np.ndarray, mask: np.ndarray | None, sentences: bool, logits: bool = False
) -> ContractResult:
    """The contract's metrics of one output: token cosines and relative error always; with `sentences` (a
    case of real sentences, `actual` the last hidden state) the sentence-embedding metrics too; with `logits`
    (a decoder's logits) the share of real positions whose greedy next token is the reference's."""
    a, r = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    ra, rr = _rows(a, mask), _rows(r, mask)
    values = {
        "token_cosine_min": float(cosines(ra, rr).min()),
        "relative_error": float(np.linalg.norm(a - r) / max(np.linalg.norm(r), np.finfo(np.float64).tiny)),
    }
    if logits and len(ra):
        top2 = np.sort(rr, axis=-1)[:, -2:]
        tie = top2[:, 1] - top2[:, 0] <= NEXT_TOKEN_TIE * (rr.max(-1) - rr.min(-1))
        values["next_token_agreement"] = float(((ra.argmax(-1) == rr.argmax(-1)) | tie).mean())
    if sentences and a.ndim == 3 and mask is not None:
        ea, er = mean_pool(a, mask), mean_pool(r, mask)
        values["sentence_cosine_min"] = float(cosines(ea, er).min())
        if len(ea) > 1:
            upper = np.triu_indices(len(ea), 1)
            sa, sr = (ea @ ea.T)[upper], (er @ er.T)[upper]
            values["similarity_deviation_max"] = float(np.abs(sa - sr).max())
            values["rank_agreement"] = spearman(sa, sr) if len(sa) > 2 else 1.0
    return ContractResult(values)


def worst_values(results: list[ContractResult]) -> dict[str, float]:
    """The worst value of each metric over several results (the smallest of a >= limit, largest of a <=); a
    NaN anywhere is the worst value (Python's min and max keep or drop a NaN by where it stands)."""
    seen: dict[str, list[float]] = {}
    for r in results:
        for k, v in r.values.items():
            seen.setdefault(k, []).append(v)
    return {k: worst_of(vs, LIMITS[k][0]) for k, vs in seen.items()}


def worst_of(values: list[float], op: str) -> float:
    """The value furthest on the wrong side of a limit `op` ('>=': the smallest), NaN if any is NaN."""
    a = np.asarray(values, dtype=np.float64)
    return float("nan") if np.isnan(a).any() else float(a.min() if op == ">=" else a.max())
