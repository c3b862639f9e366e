"""Accuracy next to speed: every contender's outputs against the float64 oracle, by the accuracy contract
(qkv_onnx.accuracy_contract) on the benchmark's own random tokens and, for a checkpoint with a tokenizer, on
real sentences it was never calibrated on."""

from pathlib import Path

from ..accuracy_contract import judge, worst_values
from .contenders import EAGER, bert_inputs, torch_runner

HELD_OUT = Path(__file__).resolve().parents[1] / "docs" / "attention" / "sentences.txt"


def _sentences() -> list[str]:
    from ..text import SAMPLE_SENTENCES

    return HELD_OUT.read_text().splitlines() if HELD_OUT.is_file() else list(SAMPLE_SENTENCES)


def accuracy(models: dict, module, tokenizer_dir: Path | None, batch: int, seq: int, seed: int) -> dict:
    """{contender: {metric: worst value, 'contract': passed, 'inputs': what it was judged on}}."""
    from ..validate import oracle

    cfg = module.config
    cases = [(bert_inputs(cfg, batch, seq, seed), False)]
    if tokenizer_dir is not None:
        from ..text import tokenize

        cases.append((tokenize(tokenizer_dir, _sentences(), max_length=cfg.max_positions), True))
    weights = {k: v.detach().double().numpy() for k, v in module.state_dict().items()}
    references = [
        oracle.forward(
            "bert", cfg.to_dict(), {}, weights, [f["input_ids"], f["token_type_ids"], f["attention_mask"]]
        )
        for f, _ in cases
    ]
    out = {}
    for name, model in {**models, EAGER: None}.items():
        if name.endswith("(again)"):
            continue
        results = []
        for (feeds, sentences), ref in zip(cases, references):
            if model is None:
                got = torch_runner(module, feeds)()
            else:
                names = [i.name for i in model.get_inputs()]
                got = model.run(None, {n: feeds[n] for n in names})
            results += [judge(g, r, feeds["attention_mask"], sentences) for g, r in zip(got, ref)]
        out[name] = {**worst_values(results), "contract": all(r.passed for r in results)}
    what = f"random tokens ({batch}x{seq})" + (
        f" and {len(cases[1][0]['input_ids'])} held-out sentences" if len(cases) > 1 else ""
    )
    return {"inputs": what, "contenders": out}
