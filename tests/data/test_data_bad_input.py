"""Every bad input named in issue 3, through the CLI: a one-line `error:` naming the culprit, exit status 2,
and no partial output left behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_helpers import make_documents, tiny_tokenizer, write_text_files  # noqa: F401 (fixture)

from polycom_lm.cli import main
from polycom_lm.data import PackedDataset, ValidationDataset, check_vocab, read_shard
from polycom_lm.data.preprocess import preprocess
from polycom_lm.errors import DataError


def run_cli(capsys, *argv):
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.err.strip()


def assert_one_line_error(status, error, *fragments):
    assert status == 2, error
    assert error.startswith("error: ") and "\n" not in error, error
    for fragment in fragments:
        assert fragment in error, error


def preprocess_cli(capsys, tokenizer, out, *source_args):
    # With the progress bar on: an input error must still print exactly one line.
    return run_cli(capsys, "preprocess", *source_args, "--tokenizer", str(tokenizer.directory), "--out", str(out))


def test_empty_source(tmp_path, capsys, tiny_tokenizer):
    (tmp_path / "empty.txt").write_text("  \n\n")
    status, error = preprocess_cli(capsys, tiny_tokenizer, tmp_path / "out", "--source", str(tmp_path / "empty.txt"))
    assert_one_line_error(status, error, "empty.txt", "yielded no documents")
    assert not (tmp_path / "out").exists()


def test_glob_matching_nothing_and_missing_path(tmp_path, capsys, tiny_tokenizer):
    status, error = preprocess_cli(capsys, tiny_tokenizer, tmp_path / "out", "--source", str(tmp_path / "*.jsonl"))
    assert_one_line_error(status, error, "no files match the glob", "*.jsonl")
    status, error = run_cli(capsys, "tokenizer", "train", "--source", str(tmp_path / "nope.txt"), "--vocab-size", "300",
                            "--out", str(tmp_path / "tok"))
    assert_one_line_error(status, error, "nope.txt", "does not exist")
    assert not (tmp_path / "tok").exists() and not (tmp_path / "out").exists()


def test_non_utf8_names_file_and_byte_offset_and_replace_flag_accepts_it(tmp_path, capsys, tiny_tokenizer):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nna\u00efve\n".encode("latin-1"))
    args = ("--source", str(path), "--document-delimiter", "blank_lines")
    status, error = preprocess_cli(capsys, tiny_tokenizer, tmp_path / "out", *args)
    assert_one_line_error(status, error, "latin1.txt", "not UTF-8 at byte offset 13")
    assert list(tmp_path.iterdir()) == [path]
    status, _ = preprocess_cli(capsys, tiny_tokenizer, tmp_path / "out", *args, "--decode-errors", "replace")
    assert status == 0
    tokens = read_shard(tmp_path / "out" / "train").tokens
    assert "\ufffd" in tiny_tokenizer.decode(tokens[:-1])


def test_jsonl_line_not_json_or_without_text_field(tmp_path, capsys, tiny_tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    status, error = preprocess_cli(capsys, tiny_tokenizer, tmp_path / "out", "--source", str(path))
    assert_one_line_error(status, error, "data.jsonl:2", "not valid JSON")
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x", "id": 3}) + "\n")
    status, error = preprocess_cli(capsys, tiny_tokenizer, tmp_path / "out", "--source", str(path))
    assert_one_line_error(status, error, "data.jsonl:2", "no 'text' field", "keys: body, id")
    assert not (tmp_path / "out").exists()


def test_token_ids_outside_the_vocab_are_rejected(tmp_path, tiny_tokenizer):
    write_text_files(tmp_path / "corpus", make_documents(5))
    shard = preprocess([str(tmp_path / "corpus")], tiny_tokenizer.directory, tmp_path / "out")["train"]
    manifest = json.loads((shard / "manifest.json").read_text())
    manifest["vocab_size"] = manifest["max_token_id"]  # the ids now reach past the declared vocabulary
    (shard / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"token id \d+ is outside the vocabulary"):
        read_shard(shard)


def test_tokenizer_and_model_vocab_mismatch_at_training_start(tmp_path, tiny_tokenizer):
    write_text_files(tmp_path / "corpus", make_documents(20))
    shard = preprocess([str(tmp_path / "corpus")], tiny_tokenizer.directory, tmp_path / "out")["train"]
    dataset = PackedDataset([(shard, 1.0)], seq_len=8, seed=0)
    with pytest.raises(DataError, match="vocab_size is 256") as error:
        check_vocab(dataset.vocab_size, 256, str(shard))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage", ["missing", "not_json", "wrong_format", "truncated_tokens", "bad_offsets"])
def test_shard_with_missing_or_inconsistent_manifest(tmp_path, tiny_tokenizer, damage):
    write_text_files(tmp_path / "corpus", make_documents(6))
    shard = preprocess([str(tmp_path / "corpus")], tiny_tokenizer.directory, tmp_path / "out")["train"]
    manifest_path = shard / "manifest.json"
    if damage == "missing":
        manifest_path.unlink()
        expected = "manifest.json is missing"
    elif damage == "not_json":
        manifest_path.write_text("{")
        expected = "not valid JSON"
    elif damage == "wrong_format":
        manifest_path.write_text(json.dumps({"format": "something-else"}))
        expected = "not a polycom_lm shard manifest"
    elif damage == "truncated_tokens":
        data = (shard / "tokens.bin").read_bytes()
        (shard / "tokens.bin").write_bytes(data[:-2])
        expected = "tokens.bin has"
    else:
        offsets = np.fromfile(shard / "document_offsets.bin", dtype="<i8")
        offsets[-1] -= 1
        offsets.tofile(shard / "document_offsets.bin")
        expected = "does not span"
    for open_shard in (lambda: PackedDataset([(shard, 1.0)], 4, 0), lambda: ValidationDataset(shard, 4)):
        with pytest.raises(DataError, match=expected) as error:
            open_shard()
        assert str(shard) in str(error.value) and "\n" not in str(error.value)


def test_preprocess_refuses_an_existing_output_and_a_missing_tokenizer(tmp_path, capsys, tiny_tokenizer):
    write_text_files(tmp_path / "corpus", make_documents(2))
    (tmp_path / "out").mkdir()
    status, error = preprocess_cli(capsys, tiny_tokenizer, tmp_path / "out", "--source", str(tmp_path / "corpus"))
    assert_one_line_error(status, error, "already exists")
    status, error = run_cli(capsys, "preprocess", "--source", str(tmp_path / "corpus"), "--tokenizer",
                            str(tmp_path / "corpus"), "--out", str(tmp_path / "out2"))
    assert_one_line_error(status, error, "holds no tokenizer")
    assert not (tmp_path / "out2").exists()


def test_cli_round_trip_tokenizer_train_then_preprocess(tmp_path, capsys):
    write_text_files(tmp_path / "corpus", make_documents(50))
    status, _ = run_cli(capsys, "tokenizer", "train", "--source", str(tmp_path / "corpus"), "--vocab-size", "300",
                        "--no-byte-fallback", "--model-type", "unigram", "--out", str(tmp_path / "tok"))
    assert status == 0 and (tmp_path / "tok" / "tokenizer.model").is_file()
    status, _ = run_cli(capsys, "preprocess", "--source", str(tmp_path / "corpus"), "--tokenizer", str(tmp_path / "tok"),
                        "--out", str(tmp_path / "out"), "--val-fraction", "0.2", "--workers", "1", "--no-progress")
    assert status == 0
    assert read_shard(tmp_path / "out" / "train").num_documents + read_shard(tmp_path / "out" / "validation").num_documents == 50
