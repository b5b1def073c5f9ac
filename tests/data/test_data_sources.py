"""Each source kind yields exactly the documents that were written, in a fixed order."""

from __future__ import annotations

import json
import itertools

import pytest
from data_helpers import SHARED_DATA, make_documents, write_text_files

from polycom_lm.data import pydoc_corpus
from polycom_lm.data.sources import SOURCES, SourceOptions, open_source
from polycom_lm.errors import DataError


def documents_of(spec, **options):
    return list(open_source(str(spec), SourceOptions(**options)).documents())


def test_registry_lists_every_source_kind():
    assert {"files", "hf", "builtin:pydoc"} <= set(SOURCES)
    with pytest.raises(DataError, match="builtin:pydoc"):
        open_source("builtin:nonsense")


def test_text_directory_is_one_document_per_file_in_sorted_order(tmp_path):
    documents = make_documents(5)
    write_text_files(tmp_path / "corpus", documents)
    (tmp_path / "corpus" / "ignored.bin").write_bytes(b"\x00\x01")
    assert documents_of(tmp_path / "corpus") == documents


def test_glob_and_single_file(tmp_path):
    documents = make_documents(4)
    paths = write_text_files(tmp_path, documents)
    assert documents_of(tmp_path / "doc000[12].txt") == documents[1:3]
    assert documents_of(paths[3]) == [documents[3]]


def test_byte_order_mark_is_dropped(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffGreat expectations".encode("utf-8"))
    assert documents_of(tmp_path / "bom.txt") == ["Great expectations"]


def test_delimiter_lines_and_blank_lines_split_documents(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("First story.\nStill first.\n<|endoftext|>\nSecond story.\n\n<|endoftext|>\n", encoding="utf-8")
    assert documents_of(path, document_delimiter="<|endoftext|>") == ["First story.\nStill first.", "Second story."]
    path.write_text("one a\none b\n\n\ntwo\n  \nthree", encoding="utf-8")
    assert documents_of(path, document_delimiter="blank_lines") == ["one a\none b", "two", "three"]


def test_jsonl_json_and_parquet_read_the_text_field(tmp_path):
    import pyarrow
    import pyarrow.parquet

    documents = make_documents(6)
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as handle:
        for document in documents[:2]:
            handle.write(json.dumps({"id": 1, "body": document}) + "\n")
        handle.write("\n")
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in documents[2:4]]), encoding="utf-8")
    pyarrow.parquet.write_table(pyarrow.table({"body": documents[4:], "n": [1, 2]}), tmp_path / "c.parquet")
    assert documents_of(tmp_path, text_field="body") == documents


def test_hf_save_to_disk_folder(tmp_path):
    import datasets

    documents = make_documents(7)
    datasets.Dataset.from_dict({"text": documents}).save_to_disk(str(tmp_path / "saved"))
    assert documents_of(f"hf:{tmp_path / 'saved'}") == documents
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": documents[:2]})}).save_to_disk(
        str(tmp_path / "dict"))
    assert documents_of(f"hf:{tmp_path / 'dict'}::validation") == documents[:2]
    with pytest.raises(DataError, match="no split 'train'"):
        documents_of(f"hf:{tmp_path / 'dict'}")


def test_hf_load_dataset_streams_a_local_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    documents = make_documents(5)
    folder = tmp_path / "hub_like"
    folder.mkdir()
    with open(folder / "train.jsonl", "w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps({"text": document}) + "\n")
    assert documents_of(f"hf:{folder}") == documents


def test_hf_unreachable_dataset_is_a_one_line_error(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # The libraries read these at import time; patch the parsed values so nothing waits on the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)  # datasets >= 3 reads this one
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(DataError, match="hf:no-such-user/no-such-dataset.*cannot load") as error:
        documents_of("hf:no-such-user/no-such-dataset")
    assert "\n" not in str(error.value)


def test_builtin_pydoc_has_a_fixed_disjoint_held_out_part():
    validation = list(open_source("builtin:pydoc:validation").documents())
    train_head = list(itertools.islice(open_source("builtin:pydoc").documents(), 200))
    assert len(validation) >= 10
    assert not set(validation) & set(train_head)
    assert list(open_source("builtin:pydoc:validation").documents()) == validation
    assert any("def" in doc or "class" in doc or "return" in doc for doc in train_head)
    assert "python=" in open_source("builtin:pydoc").describe()
    assert 0.0 < pydoc_corpus.HELD_OUT_FRACTION < 0.5


def test_description_changes_when_a_file_changes(tmp_path):
    write_text_files(tmp_path, ["one"])
    before = open_source(str(tmp_path)).describe()
    (tmp_path / "doc0000.txt").write_text("one two", encoding="utf-8")
    assert open_source(str(tmp_path)).describe() != before


@pytest.mark.skipif(not (SHARED_DATA / "pretrain" / "tinystories").is_dir(), reason="shared data absent")
def test_shared_tinystories_splits_on_endoftext_lines():
    path = SHARED_DATA / "pretrain" / "tinystories" / "tinystories_v2gpt4_train_first10000lines.txt"
    documents = documents_of(path, document_delimiter="<|endoftext|>")
    assert 1700 <= len(documents) <= 1730  # README: 1,727 full stories + 1 partial
    assert not any("<|endoftext|>" in document for document in documents)


@pytest.mark.skipif(not (SHARED_DATA / "pretrain" / "english_novels").is_dir(), reason="shared data absent")
def test_shared_english_novels_are_one_document_per_book_without_bom():
    documents = documents_of(SHARED_DATA / "pretrain" / "english_novels" / "valid")
    assert len(documents) == 2  # README: Burnett_Princess_1905, Chesterton_Innocence_1911
    assert not any(document.startswith("\ufeff") for document in documents)
    assert sum(map(len, documents)) > 700_000
