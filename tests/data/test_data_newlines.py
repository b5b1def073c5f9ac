"""Clean text by default: `\\r\\n` and lone `\\r` become `\\n` and a UTF-8 BOM at the start of a file is dropped,
as Python's text mode reads files (and `datasets`' text loader, which keeps the BOM); `newlines: keep` keeps
the decoded text; changing the setting never reuses shards cached under the other one."""

from __future__ import annotations

import json

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest

from data_helpers import tiny_tokenizer  # noqa: F401  (fixture)
from polycom_lm.config import config_from_dict
from polycom_lm.data import prepare_run_data, read_shard
from polycom_lm.data.sources import SourceOptions, open_source

RAW = b"\xef\xbb\xbfFirst line\r\nsecond line\rthird\n\r\nfourth \r\r\nend\r"


def documents(spec, **options) -> list[str]:
    return list(open_source(str(spec), SourceOptions(**options)).documents())


def test_a_text_file_reads_as_python_text_mode_reads_it(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(RAW)
    python_text_mode = path.read_text(encoding="utf-8-sig")  # universal newlines, BOM dropped
    assert documents(path) == [python_text_mode]
    assert "\r" not in python_text_mode and not python_text_mode.startswith("\ufeff")


def test_the_same_text_as_datasets_text_loader_apart_from_its_kept_bom(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "crlf.txt"
    path.write_bytes(RAW)
    loaded = datasets.load_dataset("text", data_files=str(path), sample_by="document", split="train")
    assert documents(path) == [loaded[0]["text"].removeprefix("\ufeff")]


def test_keep_leaves_the_decoded_text_but_still_drops_the_bom(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(RAW)
    assert documents(path, newlines="keep") == [RAW.decode("utf-8").removeprefix("\ufeff")]


def test_delimited_documents_split_at_carriage_return_only_line_endings(tmp_path):
    path = tmp_path / "old_mac.txt"
    path.write_bytes(b"\xef\xbb\xbfone\rtwo\r\rthree\r\n\r\nfour\r<|endoftext|>\rfive\r")
    assert documents(path, document_delimiter="blank_lines") == ["one\ntwo", "three", "four\n<|endoftext|>\nfive"]
    assert documents(path, document_delimiter="<|endoftext|>") == ["one\ntwo\n\nthree\n\nfour", "five"]
    # `\v` and U+2028 are text, not line breaks (str.splitlines would split there).
    other = tmp_path / "separators.txt"
    other.write_bytes("a\u2028b\x0bc\r\n\r\nd".encode())
    assert documents(other, document_delimiter="blank_lines") == ["a\u2028b\x0bc", "d"]


def test_json_parquet_and_saved_dataset_strings_are_normalised_too(tmp_path):
    rows = ["windows\r\nline\r\nendings", "old\rmac", "unix\nalready"]
    expected = ["windows\nline\nendings", "old\nmac", "unix\nalready"]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps({"text": row}) for row in rows).encode())
    parquet = tmp_path / "rows.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": rows}), parquet)
    assert documents(jsonl) == expected
    assert documents(parquet) == expected
    assert documents(jsonl, newlines="keep") == rows
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "saved"))
    assert documents(f"hf:{tmp_path / 'saved'}") == expected


def test_bad_newlines_setting_is_a_one_line_error():
    with pytest.raises(Exception, match="newlines='lf' is invalid; use normalize or keep"):
        SourceOptions(newlines="lf")


def test_shards_cached_with_other_newline_settings_are_never_reused(tmp_path, tiny_tokenizer):  # noqa: F811
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(6):
        (corpus / f"doc{index}.txt").write_bytes(b"\xef\xbb\xbf" + b"the cat sat\r\non a mat\r\n" * (20 + index))

    def prepare(newlines: str):
        config = config_from_dict({"data": {
            "train": [{"source": str(corpus)}], "tokenizer": {"path": str(tiny_tokenizer.directory)},
            "cache_dir": str(tmp_path / "cache"), "newlines": newlines, "preprocess_workers": 1}})
        return prepare_run_data(config.data, is_main_process=True, barrier=lambda: None).train[0][0]

    kept, normalised = prepare("keep"), prepare("normalize")
    assert kept != normalised  # a separate cache entry, not the other setting's shards
    kept_tokens, clean_tokens = read_shard(kept).tokens, read_shard(normalised).tokens
    assert clean_tokens.size < kept_tokens.size
    assert "\r" in tiny_tokenizer.decode(np.asarray(kept_tokens[:200]).tolist())
    assert "\r" not in tiny_tokenizer.decode(np.asarray(clean_tokens).tolist())
    assert prepare("normalize") == normalised  # and the same setting reuses its own entry
