"""The onnxruntime-genai contender of `qkv-bench decoder`, run by the Python of a separate environment (its
wheel pulls the `onnxruntime` package, which must not sit beside `onnxruntime-gpu` in the project's .venv).
Standalone: imports neither qkv_onnx nor torch.

    python genai_worker.py    # then one JSON request per line on stdin, one JSON answer per line on stdout

Requests (`op`):
  load     {dir, threads, spinning}: og.Model of a model builder output, its session options overlaid
  decode   {prompt (B, P) ids, steps, settle}: append the prompt (the prefill, untimed), pick the first token
           (untimed: genai picks it from the prefill's logits without a model run), then `steps` timed
           generate_next_token calls, each one forward over the cache plus the greedy pick
           -> {s, tokens (B, steps): the first `steps` generated ids}
  prefill  {ids (B, L), settle}: append_tokens on a fresh generator, timed -> {s}
Answers carry {"error": one line} when a request fails. ONNX Runtime's own prints go to stderr: stdout is the
answer channel only.
"""

import json
import os
import sys
import time


def main() -> int:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print lands on stderr
    import numpy as np
    import onnxruntime
    import onnxruntime_genai as og

    model = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "load":
                config = og.Config(request["dir"])
                options = {
                    "intra_op_num_threads": request["threads"],
                    "inter_op_num_threads": 1,
                    "session.intra_op.allow_spinning": "1" if request["spinning"] else "0",
                }
                config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
                model = og.Model(config)
                answer = {"genai": og.__version__, "onnxruntime": onnxruntime.__version__}
            elif op == "decode":
                prompt = np.asarray(request["prompt"], dtype=np.int32)
                batch, past = prompt.shape
                steps = request["steps"]
                total = past + steps + 1
                params = og.GeneratorParams(model)
                # min_length = max_length: the end-of-sequence id is never picked, every row runs all steps
                params.set_search_options(
                    max_length=total, min_length=total, do_sample=False, batch_size=batch
                )
                generator = og.Generator(model, params)
                generator.append_tokens(prompt)
                generator.generate_next_token()
                time.sleep(request["settle"])
                t0 = time.perf_counter()
                for _ in range(steps):
                    generator.generate_next_token()
                seconds = time.perf_counter() - t0
                tokens = [
                    [int(t) for t in generator.get_sequence(b)[past : past + steps]] for b in range(batch)
                ]
                answer = {"s": seconds, "tokens": tokens}
            elif op == "prefill":
                ids = np.asarray(request["ids"], dtype=np.int32)
                params = og.GeneratorParams(model)
                params.set_search_options(max_length=ids.shape[1], do_sample=False, batch_size=ids.shape[0])
                generator = og.Generator(model, params)
                time.sleep(request["settle"])
                t0 = time.perf_counter()
                generator.append_tokens(ids)
                answer = {"s": time.perf_counter() - t0}
                del generator
            else:
                answer = {"error": f"unknown op {op!r}"}
        except Exception as e:  # the parent records the line and goes on without this contender
            first = (str(e).strip().splitlines() or [""])[0]
            answer = {"error": f"{type(e).__name__}: {first[:300]}"}
        answers.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
