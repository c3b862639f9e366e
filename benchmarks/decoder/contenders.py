"""The contenders of `qkv-bench decoder`, all reading one transformers checkpoint: our artifacts on ONNX
Runtime, transformers eager, onnxruntime-genai (its builder's output, in a worker of its own environment)."""

import inspect
import json
import re
import shlex
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .options import INIT_STD, WORKER


def hf_config(cfg):
    """transformers' config of the preset `cfg` (model_defs' transformers_config). The end-of-sequence id is
    the last token (onnxruntime-genai's builder requires one); no contender stops on it."""
    from ...model_defs.decoder_families import transformers_config

    ids = dict(bos_token_id=0, eos_token_id=cfg.vocab_size - 1, pad_token_id=0)
    return transformers_config(cfg, initializer_range=INIT_STD, **ids)


def make_checkpoint(cfg, directory: Path, seed: int) -> str:
    """A transformers checkpoint of the preset's shape with random weights (normal, std INIT_STD) and a
    word-level tokenizer over its ids ("t0" ...; the genai builder loads a tokenizer), in `directory`; returns
    the family."""
    import torch
    import transformers as t
    from tokenizers import Tokenizer, models, pre_tokenizers

    t.logging.set_verbosity_error()
    family = "gpt2" if cfg.positions == "learned" else "llama"
    torch.manual_seed(seed)
    model = t.AutoModelForCausalLM.from_config(hf_config(cfg))
    model.save_pretrained(directory)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0").save_pretrained(directory)
    return family


class Local:
    """A contender in this process: `step(ids, total)` runs new tokens over the cache it holds and returns the
    last position's logits (B, V); `reset()` empties the cache."""

    def decode(self, prompt: np.ndarray, steps: int, settle: float, margins: bool = False):
        """(seconds of `steps` greedy steps after an untimed prefill of `prompt`, tokens (B, steps)[, top-2
        margins (B, steps)])."""
        self.reset()
        logits = self.step(prompt, prompt.shape[1])
        tokens, gaps = [], []
        time.sleep(settle)
        t0 = time.perf_counter()
        for i in range(steps):
            if margins:
                top2 = np.sort(logits.astype(np.float64), axis=-1)[:, -2:]
                gaps.append(top2[:, 1] - top2[:, 0])
            tokens.append(logits.argmax(-1)[:, None].astype(np.int64))
            logits = self.step(tokens[-1], prompt.shape[1] + i + 1)
        seconds = time.perf_counter() - t0
        self.reset()
        out = (seconds, np.concatenate(tokens, 1))
        return out + (np.stack(gaps, 1),) if margins else out

    def prefill(self, ids: np.ndarray, settle: float) -> float:
        self.reset()
        time.sleep(settle)
        t0 = time.perf_counter()
        self.step(ids, ids.shape[1])
        seconds = time.perf_counter() - t0
        self.reset()
        return seconds

    def close(self):
        pass


class OrtDecoder(Local):
    """An artifact's model.onnx on ONNX Runtime CPU, `present` fed back as `past`."""

    def __init__(self, path: Path, cfg, threads: int, spinning: bool):
        from ..contenders import ort_session

        self.session = ort_session(path, threads, spinning)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.layers, self.kv_heads, self.head_dim = cfg.num_layers, cfg.kv_heads, cfg.head_size
        self.past = None

    def reset(self):
        self.past = None

    def step(self, ids, total):
        batch, seq = ids.shape
        if self.past is None:
            empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
            self.past = {
                f"past_key_values.{i}.{t}": empty for i in range(self.layers) for t in ("key", "value")
            }
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((batch, total), np.int64),
            "position_ids": np.ascontiguousarray(
                np.broadcast_to(np.arange(total - seq, total), (batch, seq))
            ),
            **self.past,
        }
        out = dict(zip(self.outputs, self.session.run(None, feeds)))
        self.past = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n != "logits"}
        return out["logits"][:, -1]


class EagerDecoder(Local):
    """transformers' model from the checkpoint (its default attention), with its own cache."""

    def __init__(self, checkpoint: Path):
        import transformers as t

        self.model = t.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        self.cache = None
        # transformers 5.x renamed the forward's `past_key_values` to `cache` (the old name warns)
        forward = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward else "past_key_values"

    def reset(self):
        self.cache = None

    def step(self, ids, total):
        import torch

        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.ones((ids.shape[0], total), dtype=torch.int64),
                use_cache=True,
                **{self.cache_arg: self.cache},
            )
        self.cache = out.cache if self.cache_arg == "cache" else out.past_key_values
        return out.logits[:, -1].numpy()


class GenaiDecoder:
    """onnxruntime-genai in a worker process of its own environment (benchmarks/decoder/genai_worker.py)."""

    def __init__(self, python: Path, model_dir: Path, threads: int, spinning: bool, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [str(python), str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            cwd=model_dir,
        )
        self.versions = self.call(
            {"op": "load", "dir": str(model_dir), "threads": threads, "spinning": spinning}
        )

    def call(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            tail = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
            raise RuntimeError(f"the genai worker exited: {tail[-1][:300] if tail else 'no output'}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def decode(self, prompt, steps, settle, margins=False):
        a = self.call({"op": "decode", "prompt": prompt.tolist(), "steps": steps, "settle": settle})
        return a["s"], np.asarray(a["tokens"], np.int64)

    def prefill(self, ids, settle):
        return self.call({"op": "prefill", "ids": ids.tolist(), "settle": settle})["s"]

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def _error_line(text: str, replace: dict) -> str:
    """The line that says what stopped a process: the last `SomethingError: ...` line, else the last line."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    errors = [x for x in lines if re.match(r"^([\w.]+)?(Error|Exception)\b", x.split(":")[0].split(".")[-1])]
    line = (errors or lines or ["no output"])[-1]
    for old, new in replace.items():
        line = line.replace(old, new)
    return line[:400]


def build_genai(python: Path, checkpoint: Path, out: Path) -> dict:
    """Run onnxruntime-genai's model builder on the checkpoint (fp32, cpu): {ok, s, ops} or {error}."""
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out)]
    cmd += ["-p", "fp32", "-e", "cpu", "-c", str(out.parent / f"{out.name}-cache")]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=out.parent)
    except subprocess.TimeoutExpired:
        return {"error": "the builder ran past 900 s", "command": _shown(cmd, checkpoint, out)}
    seconds = time.perf_counter() - t0
    if p.returncode != 0 or not (out / "genai_config.json").is_file():
        line = _error_line(p.stderr + "\n" + p.stdout, {str(checkpoint): "<checkpoint>"})
        return {"error": f"exit code {p.returncode}: {line}", "command": _shown(cmd, checkpoint, out)}
    import onnx

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node
    )
    return {"ok": True, "s": seconds, "ops": dict(ops.most_common()), "command": _shown(cmd, checkpoint, out)}


def _shown(cmd: list, checkpoint: Path, out: Path) -> str:
    return (
        shlex.join(["python", *cmd[1:]])
        .replace(str(checkpoint), "<checkpoint>")
        .replace(str(out.parent), "<work>")
    )
