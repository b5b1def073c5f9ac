"""Streaming for real: a training process that tokenises a jsonl file on the fly, killed with SIGKILL and
restarted, resumes at the same position in the stream, and its losses equal, bitwise, those of a run on the
same file tokenised offline into the cache (`data.shuffle: false`, so both read in file order), even when
the resumed run tokenises with another number of processes. The killed run's reader and tokeniser
processes die with it."""

from __future__ import annotations

import json
import os
import random
import signal

import pytest

from trainer_test_helpers import REPO, latest_is, run_cli, train_in_background, train_rows, write_config

pytestmark = pytest.mark.slow

MAX_STEPS = 10
WORDS = "the a cat dog sat ran on under mat hill red blue small river stone and then because".split()


def make_documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80))).capitalize() + "." for _ in range(count)]


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    from polycom_lm.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("stream_corpus")
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for document in make_documents(400, seed=11):
            handle.write(json.dumps({"text": document}) + "\n")
    train_sentencepiece(make_documents(300, seed=99), root / "tokenizer", vocab_size=300)
    return root / "corpus.jsonl", root / "tokenizer"


def _config(corpus_and_tokenizer, folder, name, streaming, stream_workers=1):
    corpus, tokenizer = corpus_and_tokenizer
    raw = {
        "base": str(REPO / "configs" / "model" / "tiny.yaml"),
        "experiment": "streaming_test",
        "model": {"activation": "polynorm", "max_seq_len": 64},
        "data": {"train": [{"source": str(corpus), "max_tokens": 6000}], "tokenizer": {"path": str(tokenizer)},
                 "cache_dir": str(folder / "cache"), "streaming": streaming, "shuffle": False,
                 "stream_workers": stream_workers, "preprocess_workers": 1},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 1},
        "training": {"output_dir": str(folder / name), "max_steps": MAX_STEPS, "seq_len": 32,
                     "global_batch_size": 16, "micro_batch_size": 8, "log_every_steps": 1, "eval_every_steps": 0,
                     "save_every_steps": 2, "keep_last_checkpoints": 2, "seed": 7},
        "logging": {"wandb_mode": "disabled", "progress_bar": False},
    }
    return write_config(folder / f"{name}.yaml", raw)


def _losses(path):
    return [(row["step"], row["loss"], row["grad_norm"]) for row in train_rows(path / "metrics.jsonl")]


def test_sigkilled_streaming_run_resumes_in_place_and_equals_the_offline_run(corpus_and_tokenizer, tmp_path):
    psutil = pytest.importorskip("psutil")
    offline = _config(corpus_and_tokenizer, tmp_path, "offline", streaming=False)
    streamed = _config(corpus_and_tokenizer, tmp_path, "streamed", streaming=True)
    run_cli("train", str(offline), "--no-progress")

    process = train_in_background(streamed, latest_is(tmp_path / "streamed", "step_4"),
                                  "the run ended before it could be killed mid-way")
    helpers = psutil.Process(process.pid).children(recursive=True)  # the stream's reader and tokeniser
    assert len(helpers) >= 2
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (tmp_path / "streamed" / "checkpoints" / "step_4" / "data" / "rank_0.json").is_file()
    killed_at = train_rows(tmp_path / "streamed" / "metrics.jsonl")[-1]["step"]
    assert killed_at < MAX_STEPS
    _, alive = psutil.wait_procs(helpers, timeout=30)
    assert not alive, "the stream's processes outlived the killed trainer"

    # Resume with the tokenising done in the reader process itself: the stream's order does not depend on
    # the number of tokenisers (an operational key: the same command resumes without --resume).
    _config(corpus_and_tokenizer, tmp_path, "streamed", streaming=True, stream_workers=0)
    run_cli("train", str(streamed), "--no-progress")

    resumed = _losses(tmp_path / "streamed")
    assert [step for step, *_ in resumed] == list(range(1, MAX_STEPS + 1))
    assert resumed == _losses(tmp_path / "offline")  # bitwise: the same batches in the same order
    assert len(list((tmp_path / "cache" / "shards").glob("*"))) == 1  # the offline run's; the stream cached nothing


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="utf-8") as handle:
                found += [int(child) for child in handle.read().split()]
        except OSError:
            pass
    return found


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_dead_stream_reader_stops_the_run_with_one_line_and_its_checkpoints_intact(corpus_and_tokenizer, tmp_path):
    """SIGKILL of the streaming reader process mid-run: the trainer says so in one line, exits 2, and
    `latest` names a complete checkpoint."""
    config = _config(corpus_and_tokenizer, tmp_path, "run", streaming=True, stream_workers=1)
    log = tmp_path / "log"
    process = train_in_background(config, latest_is(tmp_path / "run", "step_2"), "the run ended first", log=log)
    reader = next(child for child in _children(process.pid) if "spawn_main" in _name(child))  # not the resource tracker
    os.kill(reader, signal.SIGKILL)
    assert process.wait(timeout=120) == 2
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert "streaming data process of data-parallel rank 0 died (killed by SIGKILL)" in errors[0]
    assert "run the same command to resume from the last checkpoint" in errors[0]
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "run" / "checkpoints" / latest / ".complete").is_file()
