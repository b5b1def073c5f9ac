"""Tokenizers behind one interface: a SentencePiece model folder (`tokenizer.model`) or a Hugging Face
tokenizer folder (`tokenizer.json`), plus SentencePiece training from any data source.

Every tokenizer exposes `encode_batch(texts, add_eos=False) -> list[list[int]]`, `decode(ids)`,
`vocab_size`, `eos_id`, `pad_id`, `bos_id` and `identity` (a hash of the model file: shards record it,
so shards and tokenizers are never mixed up).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from polycom_lm.errors import DataError

logger = logging.getLogger(__name__)

SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
# Ids fixed by `train_sentencepiece`, so every trained model agrees on them.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# SentencePiece's trainer skips longer "sentences"; documents are split into lines to train.
MAX_TRAIN_LINE_BYTES = 4096


def _file_identity(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class Tokenizer:
    """Common interface; see the module docstring."""

    kind: str
    vocab_size: int
    eos_id: int
    pad_id: Optional[int]
    bos_id: Optional[int]
    identity: str
    directory: Path

    def encode_batch(self, texts: Sequence[str], add_eos: bool = False) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        """What shard manifests record about the tokenizer."""
        return {"kind": self.kind, "identity": self.identity, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, directory: Path):
        import sentencepiece

        self.directory = Path(directory)
        model_file = self.directory / SENTENCEPIECE_FILE
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as error:
            raise DataError(f"{model_file}: not a readable SentencePiece model ({error})") from None
        self.vocab_size = self.processor.get_piece_size()
        eos = self.processor.eos_id()
        if eos < 0:
            raise DataError(f"{model_file}: the SentencePiece model defines no EOS token (eos_id = -1)")
        self.eos_id = eos
        self.pad_id = self.processor.pad_id() if self.processor.pad_id() >= 0 else None
        self.bos_id = self.processor.bos_id() if self.processor.bos_id() >= 0 else None
        self.identity = _file_identity(model_file)

    def encode_batch(self, texts: Sequence[str], add_eos: bool = False) -> list[list[int]]:
        return self.processor.encode(list(texts), out_type=int, add_eos=add_eos, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


# Names Hugging Face tokenizers commonly use for end-of-sequence, in order of preference.
_HF_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
_HF_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
_HF_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


class HuggingFaceTokenizer(Tokenizer):
    kind = "huggingface"

    def __init__(self, directory: Path):
        import tokenizers

        self.directory = Path(directory)
        tokenizer_file = self.directory / HF_FILE
        try:
            self.backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the Rust library raises plain Exception subclasses
            raise DataError(f"{tokenizer_file}: not a readable Hugging Face tokenizer ({error})") from None
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        settings = self._read_config()
        self.eos_id = self._special_id(settings.get("eos_token"), _HF_EOS_CANDIDATES)
        if self.eos_id is None:
            raise DataError(
                f"{self.directory}: cannot find the EOS token (set eos_token in tokenizer_config.json; "
                f"looked for {', '.join(_HF_EOS_CANDIDATES)})"
            )
        self.bos_id = self._special_id(settings.get("bos_token"), _HF_BOS_CANDIDATES)
        self.pad_id = self._special_id(settings.get("pad_token"), _HF_PAD_CANDIDATES)
        self.identity = _file_identity(tokenizer_file)

    def _read_config(self) -> dict:
        config_file = self.directory / "tokenizer_config.json"
        if not config_file.is_file():
            return {}
        try:
            return json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as error:
            raise DataError(f"{config_file}: not valid JSON ({error})") from None

    def _special_id(self, configured, candidates: Iterable[str]) -> Optional[int]:
        if isinstance(configured, dict):  # {"content": "</s>", ...} in older configs
            configured = configured.get("content")
        names = [configured] if configured else list(candidates)
        for name in names:
            token_id = self.backend.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode_batch(self, texts: Sequence[str], add_eos: bool = False) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        if add_eos:
            return [encoding.ids + [self.eos_id] for encoding in encodings]
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(directory) -> Tokenizer:
    """Load the tokenizer in `directory`: `tokenizer.model` (SentencePiece) or `tokenizer.json` (HF)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"tokenizer folder {directory} does not exist")
    if (directory / SENTENCEPIECE_FILE).is_file():
        return SentencePieceTokenizer(directory)
    if (directory / HF_FILE).is_file():
        return HuggingFaceTokenizer(directory)
    raise DataError(
        f"{directory} holds no tokenizer: expected {SENTENCEPIECE_FILE} (SentencePiece) or {HF_FILE} "
        f"(Hugging Face); train one with `polycom-lm tokenizer train`"
    )


def copy_tokenizer(tokenizer: Tokenizer, destination: Path) -> None:
    """Copy the files that make up `tokenizer` into `destination` (created)."""
    destination.mkdir(parents=True, exist_ok=True)
    names = [SENTENCEPIECE_FILE] if tokenizer.kind == "sentencepiece" else [
        HF_FILE, "tokenizer_config.json", "special_tokens_map.json"]
    for name in names:
        if (tokenizer.directory / name).is_file():
            shutil.copyfile(tokenizer.directory / name, destination / name)


def check_vocab(dataset_vocab_size: int, model_vocab_size: int, culprit: str) -> None:
    """Raise a one-line DataError when the data's token ids can reach beyond the model's embedding."""
    if dataset_vocab_size > model_vocab_size:
        raise DataError(
            f"{culprit}: the data's tokenizer has {dataset_vocab_size} tokens but the model's vocab_size is "
            f"{model_vocab_size}; set model.vocab_size >= {dataset_vocab_size}"
        )


def _training_lines(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    """The non-empty lines of the first `max_chars` characters of `documents`, each cut to what
    SentencePiece's trainer accepts."""
    remaining = max_chars
    for document in documents:
        for line in document.split("\n"):
            if not line.strip():
                continue
            line = line[: MAX_TRAIN_LINE_BYTES // 4] if len(line.encode("utf-8")) > MAX_TRAIN_LINE_BYTES else line
            yield line
            remaining -= len(line)
            if remaining <= 0:
                return


def train_sentencepiece(documents: Iterable[str], out: Path, vocab_size: int, model_type: str = "bpe",
                        byte_fallback: bool = True, special_tokens: Sequence[str] = (),
                        max_chars: int = 20_000_000, threads: int = 1) -> SentencePieceTokenizer:
    """Train a SentencePiece model on the first `max_chars` characters of `documents` and write
    `out/tokenizer.model` (written to a temporary name first, then renamed).

    Text is kept as it is (identity normalisation, whitespace preserved, newline a token of its own), so
    decoding gives back the original text. Ids: unk 0, bos 1, eos 2, pad 3.
    """
    import sentencepiece

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"tokenizer model type {model_type!r} is not supported; use bpe or unigram")
    minimum = 4 + 1 + len(special_tokens) + (256 if byte_fallback else 0)
    if vocab_size <= minimum:
        raise DataError(f"tokenizer vocab size {vocab_size} is too small; it must exceed {minimum} "
                        f"(4 control ids, newline, special tokens{', 256 byte-fallback ids' if byte_fallback else ''})")
    lines = _training_lines(documents, max_chars)
    first = next(lines, None)
    if first is None:
        raise DataError("cannot train a tokenizer: the source yielded no text")

    def all_lines() -> Iterator[str]:
        yield first
        yield from lines

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=all_lines(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=byte_fallback, user_defined_symbols=["\n", *special_tokens],
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True, hard_vocab_limit=False,
            character_coverage=0.9995 if byte_fallback else 1.0, input_sentence_size=0,
            max_sentence_length=MAX_TRAIN_LINE_BYTES + 16, num_threads=threads, minloglevel=2,
        )
    except RuntimeError as error:
        raise DataError(f"SentencePiece training failed: {str(error).strip().splitlines()[-1]}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / (SENTENCEPIECE_FILE + ".partial")
    temporary.write_bytes(model.getvalue())
    temporary.rename(out / SENTENCEPIECE_FILE)
    tokenizer = SentencePieceTokenizer(out)
    logger.info("trained a %s SentencePiece tokenizer with %d tokens into %s", model_type, tokenizer.vocab_size, out)
    return tokenizer
