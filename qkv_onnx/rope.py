"""Rotary position embedding's frequencies, the one home of their formulas (NumPy, torch-free): the module
(float32, as a constant the exporter folds), the oracle (float64) and the structural contract (the bytes of
that constant) read them here.

Dims i and i + r/2 of the first r = rotary_dim dims of a head rotate by the angle position * inv_freq[i], and
cos and sin are multiplied by the attention factor. The base inv_freq[i] = theta^(-2i/r) (Su et al.,
RoFormer); the scalings change it:
- linear (position interpolation, Chen et al. 2023): inv_freq / factor.
- llama3 (Meta's Llama 3.1): wavelengths 2 pi / inv_freq above original / low_freq_factor are divided by
  factor, those below original / high_freq_factor kept, the ones between interpolated by
  s = (original / wavelength - low) / (high - low): (1 - s) inv_freq / factor + s inv_freq.
- yarn (Peng et al. 2023, "YaRN"): per dim, a ramp between the interpolated inv_freq / factor and the base,
  from the correction dims of beta_fast and beta_slow rotations over the original length; attention factor
  0.1 ln(factor) + 1 unless given.
- longrope (Ding et al. 2024, "LongRoPE"): inv_freq[i] = 1 / (ext[i] theta^(2i/r)), with the short factors
  while the call's largest position + 1 is within original_max_position_embeddings, the long ones past it
  (the choice is per call, as transformers makes it); attention factor sqrt(1 + ln(scale) / ln(original)).
"""

import math

import numpy as np

SCALINGS = ("linear", "llama3", "yarn", "longrope")
# the keys each scaling's record holds (manifest config `rope_scaling`), besides rope_type
PARAMETERS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "truncate",
        "attention_factor",
    ),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "attention_factor"),
}


def rotary_dim(cfg: dict) -> int:
    """How many dims of a head rotate: the first rotary_dim (partial rotary), else all of head_dim."""
    from .decoder_format import head_dim

    return cfg.get("rotary_dim") or head_dim(cfg)


def base(theta: float, dim: int, dtype) -> np.ndarray:
    """theta^(-2i/dim), i < dim/2, computed in `dtype` (float32: the bytes torch's float32 ops give)."""
    t = np.dtype(dtype).type
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(dtype) / t(dim)
    return (t(1.0) / np.power(t(theta), exponent)).astype(dtype)


def frequencies(cfg: dict, local: bool = False, long: bool = False, dtype=np.float64) -> tuple:
    """(inv_freq (rotary_dim/2,), attention factor) of a config's RoPE; `local`: a sliding layer's (its own
    theta, unscaled, where the config has rope_local_theta); `long`: longrope's long factors."""
    dim = rotary_dim(cfg)
    scaling = cfg.get("rope_scaling")
    if local and cfg.get("rope_local_theta"):
        return base(cfg["rope_local_theta"], dim, dtype), 1.0
    inv = base(cfg["rope_theta"], dim, dtype)
    if not scaling:
        return inv, 1.0
    kind, t = scaling["rope_type"], np.dtype(dtype).type
    if kind == "linear":
        return (inv / t(scaling["factor"])).astype(dtype), 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv.astype(np.float64)
        smooth = (original / wavelength - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        out = np.where(
            wavelength > original / low, inv / factor, np.where(wavelength < original / high, inv, mid)
        )
        return out.astype(dtype), 1.0
    if kind == "yarn":
        factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

        def correction(rotations):  # the dim whose wavelength fits `rotations` times in the original length
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(cfg["rope_theta"]))

        low, high = correction(scaling["beta_fast"]), correction(scaling["beta_slow"])
        if scaling["truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        keep = 1 - ramp  # the share of the base frequency (extrapolation) per dim
        out = inv / factor * (1 - keep) + inv * keep
        return out.astype(dtype), scaling["attention_factor"]
    if kind == "longrope":
        ext = np.asarray(scaling["long_factor" if long else "short_factor"], dtype=np.float64)
        exponent = np.arange(0, dim, 2, dtype=np.float64) / dim
        return (1.0 / (ext * cfg["rope_theta"] ** exponent)).astype(dtype), scaling["attention_factor"]
    raise ValueError(f"rope_type {kind!r} is not one of {SCALINGS}")


def tables(cfg: dict) -> list[np.ndarray]:
    """Every inverse-frequency table (float32) a model of `cfg` holds as a constant: functions of its config
    alone, the same at any depth (export/stitch.py takes them from a two-layer template)."""
    if cfg.get("positions") != "rope":
        return []
    kinds = [(False, False), (True, False)] + ([(False, True)] if switches(cfg) is not None else [])
    return [frequencies(cfg, local, long, dtype="float32")[0] for local, long in kinds]


def switches(cfg: dict) -> int | None:
    """longrope: the original length past which (largest position + 1 > it) a call uses the long factors."""
    scaling = cfg.get("rope_scaling")
    return (
        scaling["original_max_position_embeddings"]
        if scaling and scaling["rope_type"] == "longrope"
        else None
    )


def scaling_problem(scaling) -> str | None:
    """What is wrong with a manifest's rope_scaling record (None: no scaling), or None."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict) or scaling.get("rope_type") not in SCALINGS:
        return f"rope_scaling must be null or an object whose rope_type is one of {list(SCALINGS)}"
    wanted = PARAMETERS[scaling["rope_type"]]
    if sorted(scaling) != sorted(("rope_type", *wanted)):
        return f"rope_scaling of type {scaling['rope_type']} holds exactly {list(wanted)}"
    for key in wanted:
        v = scaling[key]
        if key == "truncate":
            ok = type(v) is bool
        elif key.endswith("_factor") and key.startswith(("short", "long")):
            ok = isinstance(v, list) and 0 < len(v) <= 4096 and all(type(x) is float and x > 0 for x in v)
        elif key == "original_max_position_embeddings":
            ok = type(v) is int and v > 0
        else:
            ok = type(v) is float and 0 < v < 1e6
        if not ok:
            return f"rope_scaling {key} = {v!r} is not valid"
    return None
