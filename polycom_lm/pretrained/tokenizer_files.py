"""The tokenizer files of an exported folder: `tokenizer.json` (+ `tokenizer.model` for SentencePiece),
`tokenizer_config.json` and `special_tokens_map.json`, such that `AutoTokenizer.from_pretrained(DIR)`
encodes text to exactly the ids our tokenizer gives (`Tokenizer.encode_batch`, no BOS: training never
added one, so `add_bos_token` is false and no post-processor adds tokens).

A SentencePiece model is converted with the `tokenizers` library from its own protobuf (read here with a
few lines of wire-format parsing, so no protobuf package is needed): the BPE merges (or unigram scores),
byte fallback, user-defined symbols kept whole (a one-character one, our trainer's newline, is a symbol
no merge involves; longer ones are added tokens), and SentencePiece's normalisation (an optional
precompiled character map, extra-whitespace removal, spaces to U+2581 and the dummy prefix). Control
tokens (<unk>, <s>, </s>, <pad>) are special tokens that are *not* matched inside text
(`split_special_tokens`), as in SentencePiece, which encodes the text "</s>" as characters.

Known difference: a multi-character user-defined symbol (`tokenizer train --special-tokens`) is an added
token, and `tokenizers` normalises the text after it as a new segment, so the text right after such a
symbol gets a dummy-prefix "▁" that SentencePiece does not add. Models trained without such symbols
(the quickstart's) convert exactly; `tests/pretrained` checks every eval text.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator, Optional

from polycom_lm.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE, Tokenizer
from polycom_lm.errors import DataError

SPACE = "\u2581"
# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL, UNIGRAM_MODEL = 2, 1


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a serialized protobuf message; length-delimited values are bytes."""
    position = 0

    def varint() -> int:
        nonlocal position
        result = shift = 0
        while True:
            byte = data[position]
            position += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while position < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value: Any = varint()
        elif wire == 1:
            value, position = data[position : position + 8], position + 8
        elif wire == 2:
            length = varint()
            value, position = data[position : position + length], position + length
        elif wire == 5:
            value, position = data[position : position + 4], position + 4
        else:
            raise DataError(f"unsupported protobuf wire type {wire} in a SentencePiece model")
        yield number, wire, value


def read_sentencepiece_model(model_file: Path) -> dict[str, Any]:
    """The parts of a SentencePiece `ModelProto` the conversion needs: pieces (piece, score, type), model
    type, byte fallback, and the normaliser settings (defaults as in sentencepiece_model.proto)."""
    model: dict[str, Any] = {
        "pieces": [], "model_type": UNIGRAM_MODEL, "byte_fallback": False, "treat_whitespace_as_suffix": False,
        "precompiled_charsmap": b"", "add_dummy_prefix": True, "remove_extra_whitespaces": True,
        "escape_whitespaces": True,
    }
    for number, _, value in _fields(Path(model_file).read_bytes()):
        if number == 1:
            piece, score, kind = "", 0.0, NORMAL
            for field, _, item in _fields(value):
                if field == 1:
                    piece = item.decode("utf-8")
                elif field == 2:
                    score = struct.unpack("<f", item)[0]
                elif field == 3:
                    kind = item
            model["pieces"].append((piece, score, kind))
        elif number == 2:  # TrainerSpec
            for field, _, item in _fields(value):
                if field == 3:
                    model["model_type"] = item
                elif field == 35:
                    model["byte_fallback"] = bool(item)
                elif field == 24:
                    model["treat_whitespace_as_suffix"] = bool(item)
        elif number == 3:  # NormalizerSpec
            for field, _, item in _fields(value):
                if field == 2:
                    model["precompiled_charsmap"] = item
                elif field in (3, 4, 5):
                    names = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
                    model[names[field]] = bool(item)
    return model


def _bpe_merges(vocab: dict[str, int], mergeable: set[str]) -> list[tuple[str, str]]:
    """Merges that rebuild every mergeable piece from two pieces, in the order SentencePiece applies them
    (a higher-scoring, i.e. earlier, piece first; for one piece, the split whose halves come first)."""
    merges = []
    for piece in sorted(mergeable, key=vocab.__getitem__):
        splits = [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))]
        splits = [(left, right) for left, right in splits if left in mergeable and right in mergeable]
        merges.extend(sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]])))
    return merges


def sentencepiece_to_tokenizers(model_file: Path):
    """A `tokenizers.Tokenizer` that encodes like the SentencePiece model in `model_file`."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers
    from tokenizers import Tokenizer as FastTokenizer

    spec = read_sentencepiece_model(model_file)
    if spec["treat_whitespace_as_suffix"] or not spec["escape_whitespaces"]:
        raise DataError(f"{model_file}: SentencePiece models with treat_whitespace_as_suffix or without "
                        "escape_whitespaces are not converted")
    pieces = spec["pieces"]
    vocab = {piece: index for index, (piece, _, _) in enumerate(pieces)}
    unk_id = next((index for index, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN), None)
    if spec["model_type"] == BPE_MODEL:
        mergeable = {piece for piece, _, kind in pieces if kind in (NORMAL, UNUSED)}
        unk_token = pieces[unk_id][0] if unk_id is not None else None
        model = models.BPE(vocab, _bpe_merges(vocab, mergeable), unk_token=unk_token, fuse_unk=True,
                           byte_fallback=spec["byte_fallback"])
    elif spec["model_type"] == UNIGRAM_MODEL:
        # SentencePiece never segments text into control or byte pieces; a unigram lattice would match
        # "<s>" or "<0x41>" written in the text, so they get a score no segmentation can prefer.
        never = (CONTROL, UNKNOWN, BYTE)
        model = models.Unigram([(piece, -1e9 if kind in never else score) for piece, score, kind in pieces],
                               unk_id=unk_id, byte_fallback=spec["byte_fallback"])
    else:
        raise DataError(f"{model_file}: SentencePiece model type {spec['model_type']} (char / word) is not converted")
    steps = []
    if spec["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(spec["precompiled_charsmap"]))
    if spec["remove_extra_whitespaces"]:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", SPACE))
    if spec["add_dummy_prefix"]:
        # Unconditional, as SentencePiece's (a text starting with a space gets two). It is applied to each
        # segment between added tokens: the one place the conversion can differ (see module docstring).
        steps.append(normalizers.Prepend(SPACE))
    tokenizer = FastTokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(content=" ", left=1, right=0)] if spec["add_dummy_prefix"] else []),
    ])
    # User-defined symbols are never merged with their neighbours: a one-character symbol (our trainer's
    # newline) stays an ordinary symbol of the model, which has no merge involving it; longer ones are
    # added tokens, cut out of the text before the model runs.
    tokenizer.add_tokens([AddedToken(piece, normalized=False, special=False)
                          for piece, _, kind in pieces if kind == USER_DEFINED and len(piece) > 1])
    tokenizer.add_special_tokens([AddedToken(piece, normalized=False, special=True)
                                  for piece, _, kind in pieces if kind in (CONTROL, UNKNOWN)])
    return tokenizer


def _token_name(tokenizer: Tokenizer, token_id: Optional[int]) -> Optional[str]:
    if token_id is None:
        return None
    if tokenizer.kind == "sentencepiece":
        return tokenizer.processor.id_to_piece(token_id)
    return tokenizer.backend.id_to_token(token_id)


def write_tokenizer_files(tokenizer: Tokenizer, out: Path, model_max_length: int) -> dict[str, Optional[int]]:
    """Write the tokenizer files into `out`; returns the special token ids {bos, eos, pad, unk}."""
    from tokenizers import Tokenizer as FastTokenizer

    out = Path(out)
    if tokenizer.kind == "sentencepiece":
        shutil.copyfile(tokenizer.directory / SENTENCEPIECE_FILE, out / SENTENCEPIECE_FILE)
        fast = sentencepiece_to_tokenizers(tokenizer.directory / SENTENCEPIECE_FILE)
        unk_id = tokenizer.processor.unk_id()
        unk_id = unk_id if unk_id >= 0 else None
    else:
        fast = FastTokenizer.from_file(str(tokenizer.directory / HF_FILE))
        # Our training encoded without special tokens: drop a post-processor that would add BOS / EOS.
        fast.post_processor = None
        unk_id = None
    fast.save(str(out / HF_FILE))
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id, "unk": unk_id}
    special = {f"{name}_token": _token_name(tokenizer, token_id) for name, token_id in ids.items()}
    special = {key: value for key, value in special.items() if value is not None}
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return ids
