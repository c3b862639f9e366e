"""Real sentences as model inputs: a checkpoint's own tokenizer files through the `tokenizers` library.

Imports numpy and (lazily) tokenizers only: never torch, so validation runs without torch.
"""

import json
from pathlib import Path

import numpy as np

from .errors import UsageError, first_line, show

# Files that carry a BERT checkpoint's tokenizer: tokenizer.json is used when present, else vocab.txt
# with tokenizer_config.json's casing options. Export copies whichever exist into the artifact.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")

# Real sentences of different lengths (a padded batch) for golden data: the first three are issue 4's
# river/bank example, the next three a second related/related/unrelated triple.
SAMPLE_SENTENCES = (
    "The river bank was flooded.",
    "Water overflowed the riverside.",
    "I deposited money at the bank.",
    "A man is playing a guitar on the street corner tonight.",
    "Someone strums an instrument outdoors.",
    "The stock market fell sharply.",
)

# The int8 corpus (qkv-export --dtype int8), written for this project and shipped with it: the sensitivity
# search chooses on `search`, and the result is accepted only if it also holds on `holdout`, which the search
# never sees. Disjoint from each other, from SAMPLE_SENTENCES, from docs/attention/sentences.txt and from the
# tests' unseen sentences (tests/data/unseen_sentences.txt), on which artifacts are then judged.
CORPUS = Path(__file__).with_name("corpus")


def corpus(name: str) -> list[str]:
    """The sentences of corpus file `name` ('search' or 'holdout'), one per line."""
    return [line for line in (CORPUS / f"{name}.txt").read_text(encoding="utf-8").splitlines() if line]


class TextError(UsageError):
    """Sentences that cannot be tokenized: no tokenizers library, no tokenizer files, no sentences."""


def _failure(e: BaseException) -> BaseException:
    """What a tokenizers call raised, unless it is an interruption: a Rust panic in the library surfaces
    as pyo3's PanicException, a BaseException, and is a finding about the tokenizer file like any other."""
    if isinstance(e, KeyboardInterrupt | SystemExit | GeneratorExit):
        raise e
    return e


CONFIG_TYPES = {  # tokenizer_config.json keys read, and the JSON types they may have
    "do_lower_case": (bool,),
    "strip_accents": (bool, type(None)),
    "tokenize_chinese_chars": (bool,),
}


def _load_tokenizer(tokenizer_dir: Path):
    try:
        import tokenizers
    except ImportError:
        raise TextError(
            "tokenizing text needs the tokenizers library: pip install tokenizers "
            "(or the package's 'text' extra)"
        ) from None
    if (tokenizer_dir / "tokenizer.json").is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        except BaseException as e:
            reason = first_line(_failure(e))
            raise TextError(
                f"{show(tokenizer_dir / 'tokenizer.json')}: tokenizers cannot load it ({reason})"
            ) from None
    if (tokenizer_dir / "vocab.txt").is_file():
        conf = {}
        path = tokenizer_dir / "tokenizer_config.json"
        if path.is_file():
            try:
                conf = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
                raise TextError(f"{show(path)}: not JSON ({first_line(e)})") from None
            if not isinstance(conf, dict):
                raise TextError(f"{show(path)}: not a JSON object")
            bad = [k for k, types in CONFIG_TYPES.items() if k in conf and not isinstance(conf[k], types)]
            if bad:
                raise TextError(
                    f"{show(path)}: {bad[0]} is {conf[bad[0]]!r}, not a {CONFIG_TYPES[bad[0]][0].__name__}"
                )
        try:
            wordpiece = tokenizers.BertWordPieceTokenizer(
                str(tokenizer_dir / "vocab.txt"),
                lowercase=conf.get("do_lower_case", True),
                strip_accents=conf.get("strip_accents"),
                handle_chinese_chars=conf.get("tokenize_chinese_chars", True),
            )
        except BaseException as e:
            raise TextError(
                f"{show(tokenizer_dir / 'vocab.txt')}: tokenizers cannot load it ({first_line(_failure(e))})"
            ) from None
        return wordpiece._tokenizer  # the underlying tokenizers.Tokenizer (same API as from_file)
    raise TextError(f"{show(tokenizer_dir)}: no tokenizer files (tokenizer.json or vocab.txt)")


def tokenize(tokenizer_dir, sentences, max_length: int | None = None, pad_id: int | None = None) -> dict:
    """Encode `sentences` as one batch: {'input_ids', 'token_type_ids', 'attention_mask'}, int64 (batch, seq).

    Each sentence becomes [CLS] tokens [SEP] (the tokenizer's own post-processor), segment 0,
    padded on the right with the tokenizer's pad token to the longest sentence in the batch
    (the tokenizer file's own padding/truncation settings are replaced: MiniLM's pads to a
    fixed 128). Sentences longer than `max_length` tokens (special tokens included) are
    truncated to it; with max_length None nothing is truncated. `pad_id`: the model's pad token (its
    config's pad_token_id; RoBERTa's is 1, <pad>), else the tokenizer's own or [PAD].
    """
    sentences = list(sentences)
    if not sentences:
        raise TextError("no sentences to tokenize")
    bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
    if bad:
        raise TextError(f"sentence(s) {bad} are not strings")
    tokenizer_dir = Path(tokenizer_dir)
    tok = _load_tokenizer(tokenizer_dir)
    try:  # the tokenizer file drives the library from here on: any failure, a panic included, is its
        pad = tok.padding or {}
        if pad_id is not None:
            pad_token = tok.id_to_token(pad_id)
            if pad_token is None:
                raise TextError(f"{show(tokenizer_dir)}: the tokenizer has no token {pad_id} (pad_token_id)")
        else:
            pad_token = pad.get("pad_token", "[PAD]")
            pad_id = pad.get("pad_id", tok.token_to_id(pad_token))
        if pad_id is None:
            raise TextError(f"{show(tokenizer_dir)}: the tokenizer has no pad token {pad_token!r}")
        tok.enable_padding(
            direction="right", pad_id=pad_id, pad_type_id=pad.get("pad_type_id", 0), pad_token=pad_token
        )
        if max_length is None:
            tok.no_truncation()
        else:
            tok.enable_truncation(max_length=int(max_length))
        encodings = tok.encode_batch(sentences)
    except TextError:
        raise
    except BaseException as e:
        raise TextError(
            f"{show(tokenizer_dir)}: the tokenizer fails on these sentences ({first_line(_failure(e))})"
        ) from None
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def token_strings(tokenizer_dir, ids) -> list[str]:
    """The token strings of a sequence of ids ([CLS], word pieces, ...), for labelling plots."""
    tok = _load_tokenizer(Path(tokenizer_dir))
    return [tok.id_to_token(int(i)) or f"<{int(i)}>" for i in ids]


def mean_pool(last_hidden_state, attention_mask) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them: the mean of the hidden states over real
    tokens (attention_mask 1), L2-normalised. (batch, seq, hidden), (batch, seq) -> (batch, hidden) float64.
    A row without real tokens gives zeros."""
    h = np.asarray(last_hidden_state, dtype=np.float64)
    m = np.asarray(attention_mask, dtype=np.float64)[..., None]
    mean = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    norm = np.linalg.norm(mean, axis=-1, keepdims=True)
    return mean / np.maximum(norm, 1e-12)


def read_sentences(text_args=None, file=None) -> list:
    """Sentences from repeated --text values, then from `file` (one per line; blank lines skipped)."""
    sentences = [t for t in (text_args or [])]
    if file is not None:
        path = Path(file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise TextError(f"{path}: cannot read sentences ({e})") from None
        sentences += [line.strip() for line in lines if line.strip()]
    empty = [i for i, s in enumerate(sentences) if not s.strip()]
    if empty:
        raise TextError(f"empty sentence(s) at position(s) {empty}")
    return sentences
