"""StreamingDataset against the obvious reference: the same documents tokenised offline (`preprocess`) and
read by `PackedDataset(shuffle=False)`. Local files in every format a source reads (our jsonl / json /
parquet / text readers, and `datasets`' json, parquet and `save_to_disk` arrow through `hf:`), token
budgets, epochs, document ids, mixtures, resuming from saved positions, and each rank's share."""

from __future__ import annotations

import json

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest

from data_helpers import make_documents, tiny_tokenizer  # noqa: F401  (fixture)
from polycom_lm.config import config_from_dict
from polycom_lm.data import PackedDataset, StreamingDataset, prepare_run_data
from polycom_lm.data.preprocess import preprocess
from polycom_lm.data.sources import SourceOptions, open_source
from polycom_lm.data.stream_worker import StreamedSource
from polycom_lm.errors import CheckpointError, DataError

SEQ_LEN = 16
BATCH = 8
DOCUMENTS = make_documents(240, seed=5)


def write_source(folder, kind: str, documents=DOCUMENTS) -> str:
    """`documents` in one of the formats a source reads; returns the source spec."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"text": text, "id": index} for index, text in enumerate(documents)]
    if kind == "jsonl":
        (folder / "part.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(folder / "part.jsonl")
    if kind == "json":
        (folder / "part.json").write_text(json.dumps(rows))
        return str(folder / "part.json")
    if kind == "parquet":
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), folder / "part.parquet", row_group_size=50)
        return str(folder / "part.parquet")
    if kind == "text":
        for index, text in enumerate(documents):
            (folder / f"doc{index:04d}.txt").write_text(text)
        return str(folder)
    if kind == "hf-json":
        (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return f"hf:{folder}"
    if kind == "hf-parquet":
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), folder / "data.parquet", row_group_size=50)
        return f"hf:{folder}"
    if kind == "hf-arrow":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(folder / "saved"))
        return f"hf:{folder / 'saved'}"
    raise ValueError(kind)


def offline(tmp_path, spec, tokenizer, max_tokens=None, name="offline"):
    return preprocess([spec], tokenizer.directory, tmp_path / name, max_tokens=max_tokens)["train"]


def streamed(spec, tokenizer, max_tokens=None, workers=1, **kwargs) -> StreamingDataset:
    return StreamingDataset([(StreamedSource(spec, SourceOptions(), max_tokens), 1.0)], tokenizer.directory,
                            SEQ_LEN, seed=0, workers=workers, **kwargs)


def batches(dataset, steps, start=0, rank=0, ranks=1):
    rows = BATCH // ranks
    return [dataset.global_batch(step * BATCH, BATCH, rank, ranks)["input_ids"].numpy().copy()[: rows]
            for step in range(start, start + steps)]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "text", "hf-json", "hf-parquet", "hf-arrow"])
def test_streamed_batches_equal_offline_tokenised_batches_in_every_format(tmp_path, tiny_tokenizer, kind):
    spec = write_source(tmp_path / "data", kind)
    reference = PackedDataset([(offline(tmp_path, spec, tiny_tokenizer), 1.0)], SEQ_LEN, seed=0, shuffle=False)
    stream = streamed(spec, tiny_tokenizer, workers=1 if kind in ("jsonl", "hf-arrow") else 0)
    try:
        steps = reference.samples_per_epoch[0] // BATCH + 3  # into the second epoch
        for got, expected in zip(batches(stream, steps), batches(reference, steps)):
            np.testing.assert_array_equal(got, expected)
    finally:
        stream.close()


def test_a_token_budget_cuts_each_epoch_exactly_where_preprocess_cuts_and_document_ids_match(tmp_path, tiny_tokenizer):
    spec = write_source(tmp_path / "data", "jsonl")
    shard = offline(tmp_path, spec, tiny_tokenizer, max_tokens=1234)
    from polycom_lm.data import read_shard

    assert read_shard(shard).num_tokens == 1234
    reference = PackedDataset([(shard, 1.0)], SEQ_LEN, seed=0, shuffle=False, document_ids=True)
    stream = streamed(spec, tiny_tokenizer, max_tokens=1234, document_ids=True)
    try:
        for step in range(3 * (1233 // SEQ_LEN) // BATCH):  # three epochs of the budget
            got, expected = stream.global_batch(step * BATCH, BATCH, 0, 1), reference.global_batch(step * BATCH, BATCH, 0, 1)
            np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
            np.testing.assert_array_equal(got["document_ids"], expected["document_ids"])
    finally:
        stream.close()


# Stops within the first epoch, and after the budget wrapped once and twice (each resume starts a reader
# process, and `datasets` takes a few seconds to resolve a folder's files in each).
@pytest.mark.parametrize("kind, stops", [("jsonl", (1, 17, 33)), ("hf-parquet", (17,))])
def test_a_saved_position_resumes_at_exactly_the_next_batch(tmp_path, tiny_tokenizer, kind, stops):
    spec = write_source(tmp_path / "data", kind)
    stream = streamed(spec, tiny_tokenizer, max_tokens=2500)
    whole, positions = [], {}
    try:
        for step in range(40):
            whole += batches(stream, 1, start=step)
            if step + 1 in stops:
                positions[step + 1] = json.loads(json.dumps(stream.state_dict()))  # what a checkpoint keeps
    finally:
        stream.close()
    for stop in stops:
        resumed = streamed(spec, tiny_tokenizer, max_tokens=2500, workers=0)
        resumed.load_state_dict(positions[stop])
        try:
            for got, expected in zip(batches(resumed, 6, start=stop), whole[stop:stop + 6]):
                np.testing.assert_array_equal(got, expected)
        finally:
            resumed.close()


@pytest.mark.parametrize("kind", ["jsonl", "hf-arrow"])
def test_each_rank_streams_a_disjoint_deterministic_share(tmp_path, tiny_tokenizer, kind):
    spec = write_source(tmp_path / "data", kind)
    for rank in range(2):
        # The reference: rank r's documents (every second one) tokenised offline, in order.
        share = write_source(tmp_path / f"share{rank}", "jsonl", DOCUMENTS[rank::2])
        reference = PackedDataset([(offline(tmp_path, share, tiny_tokenizer, name=f"o{rank}"), 1.0)], SEQ_LEN,
                                  seed=0, shuffle=False)
        stream = streamed(spec, tiny_tokenizer, workers=0)
        try:
            got = batches(stream, 12, rank=rank, ranks=2)
        finally:
            stream.close()
        expected = [reference.global_batch(step * BATCH // 2, BATCH // 2, 0, 1)["input_ids"].numpy()
                    for step in range(12)]
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


def test_ranks_of_a_many_file_dataset_read_whole_disjoint_files(tmp_path, tiny_tokenizer):
    pytest.importorskip("datasets")
    folder = tmp_path / "files"
    folder.mkdir()
    parts = [DOCUMENTS[i::5] for i in range(5)]  # five files over two ranks: 3 + 2, not every second row
    for index, part in enumerate(parts):
        (folder / f"part{index}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in part))
    source = open_source(f"hf:{folder}", SourceOptions())
    if not hasattr(source._iterable(0, 2)[0], "shard"):
        pytest.skip("this datasets version has no IterableDataset.shard: rows are dealt instead")
    shares = [list(source.stream(rank, 2)) for rank in range(2)]
    assert shares == [parts[0] + parts[1] + parts[2], parts[3] + parts[4]]  # whole files, in file order
    again = open_source(f"hf:{folder}", SourceOptions())
    assert list(again.stream(1, 2)) == shares[1]  # deterministic
    stream = again.stream(0, 2)
    documents = iter(stream)
    head = [next(documents) for _ in range(len(parts[0]) + 3)]  # into the second file
    position = json.loads(json.dumps(stream.position()))
    assert head + list(open_source(f"hf:{folder}", SourceOptions()).stream(0, 2, position)) == shares[0]


def test_a_mixture_of_streams_and_a_shard_folder_equals_the_offline_mixture(tmp_path, tiny_tokenizer):
    first = write_source(tmp_path / "a", "jsonl", DOCUMENTS[:120])
    second = write_source(tmp_path / "b", "parquet", DOCUMENTS[120:])
    third = write_source(tmp_path / "c", "text", make_documents(60, seed=8))
    shards = [offline(tmp_path, spec, tiny_tokenizer, name=f"o{i}") for i, spec in enumerate((first, second, third))]
    weights = (3.0, 1.0, 0.5)
    reference = PackedDataset(list(zip(shards, weights)), SEQ_LEN, seed=4, shuffle=False)
    mixture = [(StreamedSource(first, SourceOptions()), 3.0), (StreamedSource(second, SourceOptions()), 1.0),
               (shards[2], 0.5)]
    stream = StreamingDataset(mixture, tiny_tokenizer.directory, SEQ_LEN, seed=4, workers=1, shuffle=False)
    try:
        for got, expected in zip(batches(stream, 30), batches(reference, 30)):
            np.testing.assert_array_equal(got, expected)
    finally:
        stream.close()


def test_stream_errors_are_one_line(tmp_path, tiny_tokenizer):
    tiny = write_source(tmp_path / "tiny", "jsonl", ["a b"])
    stream = streamed(tiny, tiny_tokenizer)
    with pytest.raises(DataError, match=r"fewer than 17 tokens per epoch"):
        stream.global_batch(0, BATCH, 0, 1)
    stream.close()
    spec = write_source(tmp_path / "data", "jsonl")
    first = streamed(spec, tiny_tokenizer, workers=0)
    batches(first, 2, rank=1, ranks=2)
    position = first.state_dict()
    first.close()
    moved = streamed(spec, tiny_tokenizer, workers=0)
    moved.load_state_dict(position)
    with pytest.raises(CheckpointError, match="saved by data-parallel rank 1 of 2; .* resume on 2"):
        moved.global_batch(2 * BATCH, BATCH, 0, 4)
    with pytest.raises(CheckpointError, match="not a stream position"):
        streamed(spec, tiny_tokenizer).load_state_dict({"format": "other"})


def test_close_stops_the_reader_and_tokeniser_processes(tmp_path, tiny_tokenizer):
    psutil = pytest.importorskip("psutil")
    stream = streamed(write_source(tmp_path / "data", "jsonl"), tiny_tokenizer, workers=2)
    batches(stream, 2)
    reader = psutil.Process(stream._process.pid)
    processes = [reader, *reader.children(recursive=True)]
    assert len(processes) == 3  # the reader and its two tokenisers
    stream.close()
    gone, alive = psutil.wait_procs(processes, timeout=20)
    assert not alive


def test_prepare_streams_raw_sources_and_caches_only_validation(tmp_path, tiny_tokenizer):
    spec = write_source(tmp_path / "data", "jsonl")
    shard = offline(tmp_path, spec, tiny_tokenizer, name="ready")
    config = config_from_dict({"data": {
        "streaming": True, "cache_dir": str(tmp_path / "cache"), "tokenizer": {"path": str(tiny_tokenizer.directory)},
        "train": [{"source": spec, "max_tokens": 999}, {"source": str(shard), "weight": 0.5},
                  {"source": "builtin:pydoc", "streaming": False, "max_tokens": 3000}],
        "validation": [{"name": "held", "source": spec, "max_tokens": 500}]}})
    prepared = prepare_run_data(config.data, is_main_process=True, barrier=lambda: None)
    (first, w1), (second, w2), (third, w3) = prepared.train
    assert first == StreamedSource(spec, SourceOptions(), 999) and w1 == 1.0
    assert (second, w2) == (shard, 0.5)  # an already tokenised folder is read from disk either way
    from polycom_lm.data import read_shard

    assert read_shard(third).num_tokens == 3000  # cached, cut at its budget
    assert read_shard(prepared.validation["held"]).num_tokens == 500
    assert not list((tmp_path / "cache" / "shards").glob("*/train/manifest.json")) == []
    no_validation = config_from_dict({"data": {
        "streaming": True, "val_fraction": 0.1, "tokenizer": {"path": str(tiny_tokenizer.directory)},
        "cache_dir": str(tmp_path / "cache"), "train": [{"source": spec}]}})
    with pytest.raises(DataError, match=r"data.train\[0\] .* is streamed; name held-out sets in data.validation"):
        prepare_run_data(no_validation.data, is_main_process=True, barrier=lambda: None)
    with pytest.raises(DataError, match="does not exist"):
        prepare_run_data(config_from_dict({"data": {
            "streaming": True, "tokenizer": {"path": str(tiny_tokenizer.directory)},
            "train": [{"source": str(tmp_path / "missing.jsonl")}]}}).data, is_main_process=True, barrier=lambda: None)


def test_hf_names_with_a_folder_inside_the_repository_read_only_that_folder():
    source = open_source("hf:allenai/OLMoE-mix-0924/data/dclm", SourceOptions())
    assert (source.name, source.data_dir, source.split) == ("allenai/OLMoE-mix-0924", "data/dclm", "train")
    plain = open_source("hf:Salesforce/wikitext:wikitext-103-raw-v1:validation", SourceOptions())
    assert (plain.name, plain.data_dir, plain.config_name, plain.split) == (
        "Salesforce/wikitext", None, "wikitext-103-raw-v1", "validation")
