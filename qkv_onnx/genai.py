"""genai_config.json: what onnxruntime-genai needs beside a decoder's model.onnx to run it as exported
(`onnxruntime_genai.Model(artifact_dir)`).

It is derived from the manifest alone (the model's sizes, the graph's input and output names, the
checkpoint's special tokens), so validation rebuilds it and requires the artifact's file to be those bytes:
a config that points genai at another file, or gives it other heads or layers, is refused. The model's
whole computation is in the graph (RoPE and its scalings, sliding windows, soft caps, norms), so the config
names genai's plain decoder-only type, `llama`, for every family, and no sliding window: genai passes the
whole cache and the graph applies the window. Torch-free.
"""

import json
from pathlib import Path

from .decoder_format import PRESENT

GENAI_CONFIG = "genai_config.json"
# a decoder checkpoint's tokenizer, beside the config: genai's Tokenizer reads it from the model's directory
GENAI_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GENAI_TYPE = "llama"  # genai's plain decoder-only path; genai refuses a type it does not know
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
INPUTS = {"token_ids": "input_ids", "padding_mask": "attention_mask", "position_ids": "position_ids"}


def special_tokens(checkpoint: Path) -> dict:
    """{bos_token_id, eos_token_id (a list), pad_token_id} of a checkpoint directory: config.json's,
    generation_config.json's where it sets one (what transformers' generate uses); None where neither does."""
    out = dict.fromkeys(TOKEN_KEYS)
    for name in ("config.json", "generation_config.json"):
        path = checkpoint / name
        values = json.loads(path.read_text()) if path.is_file() else {}
        for key in TOKEN_KEYS:
            if isinstance(values.get(key), (int, list)):
                out[key] = values[key]
    eos = out["eos_token_id"]
    out["eos_token_id"] = [eos] if isinstance(eos, int) else eos
    return out


def special_tokens_problem(tokens, vocab_size: int) -> str | None:
    """Why a manifest's `special_tokens` is malformed, or None."""
    if not isinstance(tokens, dict) or set(tokens) != set(TOKEN_KEYS):
        return f"'special_tokens' must hold exactly {', '.join(TOKEN_KEYS)}"
    ids = [tokens["bos_token_id"], tokens["pad_token_id"], *(tokens["eos_token_id"] or [])]
    if not (tokens["eos_token_id"] is None or isinstance(tokens["eos_token_id"], list)) or not all(
        i is None or (type(i) is int and 0 <= i < vocab_size) for i in ids
    ):
        return f"'special_tokens' must be token ids below the vocabulary's {vocab_size} (eos_token_id a list)"
    return None


def _template(name: str) -> str:
    """'past_key_values.0.key' -> 'past_key_values.%d.key'."""
    head, layer, tail = name.split(".", 2)
    return f"{head}.%d.{tail}"


def genai_config(manifest: dict) -> dict:
    """The genai_config.json of a decoder artifact's manifest."""
    cfg = manifest["model"]["config"]
    inputs = {INPUTS[v["role"]]: v["name"] for v in manifest["inputs"] if v["role"] in INPUTS}
    key, value = (
        next(v for v in manifest["inputs"] if v["role"] == role) for role in ("past_key", "past_value")
    )
    inputs["past_key_names"], inputs["past_value_names"] = _template(key["name"]), _template(value["name"])
    present = [o["name"] for o in manifest["outputs"] if o["name"].startswith(PRESENT + ".")]
    outputs = {
        "logits": manifest["outputs"][0]["name"],
        "present_key_names": _template(next(n for n in present if n.endswith(".key"))),
        "present_value_names": _template(next(n for n in present if n.endswith(".value"))),
    }
    tokens = manifest.get("special_tokens") or {}
    context = cfg["max_positions"]
    return {
        "model": {
            **{k: tokens[k] for k in TOKEN_KEYS if tokens.get(k) is not None},
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": key["shape"][3],
                "hidden_size": cfg["hidden_size"],
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": cfg["num_heads"],
                "num_hidden_layers": cfg["num_layers"],
                "num_key_value_heads": key["shape"][1],
            },
            "type": GENAI_TYPE,
            "vocab_size": cfg["vocab_size"],
        },
        "search": {
            "do_sample": False,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,  # the graph returns the whole cache: past + new tokens
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def encode(config: dict) -> bytes:
    return (json.dumps(config, indent=4) + "\n").encode()
