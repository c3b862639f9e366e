"""Measure docs/decoders.md's families table: each family's test checkpoint (tests/test_decoder_families.py)
exported on every backend, its teacher-forced logits over a 40-token decode on ONNX Runtime CPU against
transformers' cached generate and the NumPy oracle (worst max abs error, relative to the largest logit), and
the atol the suite allows. Run: .venv/bin/python scripts/decoder_families_table.py"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_decoder_families import (
    BACKENDS,
    FAMILIES,
    GREEDY_TOKENS,
    PROMPT,
    Decoder,
    generate,
    make_checkpoint,
    oracle_run,
    session_run,
    teacher_forced,
)

from qkv_onnx.export.cli import main as export_main
from qkv_onnx.validate.compare import model_error_terms, tolerance


def main() -> int:
    print("| family | features | backend | vs transformers | vs oracle | atol (suite) |")
    print("|---|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            hf = make_checkpoint(family, Path(tmp) / family)
            tokens, want = generate(hf)
            scale = np.abs(want).max()
            for backend in BACKENDS:
                out = Path(tmp) / f"{family}-{backend}"
                args = ["--weights", str(Path(tmp) / family), "--backend", backend, "--out", str(out)]
                if export_main(args) != 0:
                    print(f"| {family} | | {backend} | export failed | | |")
                    continue
                manifest = json.loads((out / "manifest.json").read_text())
                got = teacher_forced(Decoder(manifest, session_run(out)), tokens)
                ref = teacher_forced(Decoder(manifest, oracle_run(manifest, out)), tokens)
                k, stages = model_error_terms(manifest, PROMPT + GREEDY_TOKENS)
                atol = 2 * tolerance("float32", k, stages) * scale
                features = ", ".join(FAMILIES[family][2])
                print(
                    f"| {family} | {features} | {backend} | {np.abs(got - want).max():.1e} "
                    f"| {np.abs(got - ref).max():.1e} | {atol:.1e} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
