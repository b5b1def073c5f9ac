"""Shared helpers for the data tests: a small deterministic corpus and a tiny SentencePiece tokenizer.

Imported by the test modules (pytest puts this folder on sys.path); not collected itself.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from polycom_lm.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
if not SHARED_DATA.is_dir():
    SHARED_DATA = Path("/work/shared/data")

WORDS = ("the cat sat on a mat while her dog ran after one red ball and they were happy together until "
         "night came over hills where small birds sang softly about rivers trees stones and old friends").split()


def make_documents(count: int, seed: int = 0, words: tuple[int, int] = (5, 60)) -> list[str]:
    """`count` pseudo-English documents with several lines each (unique, deterministic)."""
    rng = random.Random(seed)
    documents = []
    for index in range(count):
        lines = []
        for _ in range(rng.randint(1, 4)):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))).capitalize() + ".")
        documents.append(f"Document {index}: " + "\n".join(lines))
    return documents


def write_text_files(folder: Path, documents: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, document in enumerate(documents):
        path = folder / f"doc{index:04d}.txt"
        path.write_text(document, encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    """A 400-token BPE model with byte fallback, trained on `make_documents(300)`."""
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    return train_sentencepiece(make_documents(300, seed=99), directory, vocab_size=400, special_tokens=["<|sep|>"])


def reference_tokens(tokenizer, documents: list[str]) -> list[int]:
    """The obvious definition of a shard's contents: each document's ids, then EOS, concatenated."""
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer.encode_batch([document])[0])
        ids.append(tokenizer.eos_id)
    return ids
