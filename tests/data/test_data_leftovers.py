"""Tokenising leaves nothing behind when it is killed: worker processes die with their parent (even on
SIGKILL), partial output folders of dead writers are removed by the next run, and an output folder that
cannot be created is a one-line error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_helpers import make_documents, tiny_tokenizer, write_text_files  # noqa: F401

from polycom_lm.cli import main
from polycom_lm.data import shards
from polycom_lm.data.preprocess import preprocess

REPOSITORY = Path(__file__).resolve().parents[2]


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker processes")
def test_tokeniser_workers_die_when_their_parent_is_sigkilled(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(make_documents(400, seed=5)) * 60, encoding="utf-8")
    script = (
        "import sys; from polycom_lm.data.preprocess import preprocess\n"
        "from polycom_lm.data.sources import SourceOptions\n"
        "preprocess([sys.argv[1]], sys.argv[2], sys.argv[3], workers=2, chunk_chars=4096,\n"
        "           options=SourceOptions(document_delimiter='blank_lines'))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(corpus), str(tiny_tokenizer.directory),
                               str(tmp_path / "out")], cwd=REPOSITORY, env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    workers: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and parent.poll() is None and len(workers) < 2:
        workers = {pid for pid in _children(parent.pid) if "spawn_main" in (Path("/proc") / str(pid) / "cmdline").read_text()}
        time.sleep(0.05)
    assert parent.poll() is None and len(workers) >= 2, "the tokeniser workers did not start"
    time.sleep(1.0)  # let them load the tokenizer and arm their parent-death signal
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "orphaned tokeniser workers survived their parent"
    leftover = list(tmp_path.glob("out.partial-*"))
    assert leftover, "the killed run should have left its partial folder (cleaned up below)"
    documents = write_text_files(tmp_path / "small", make_documents(5))
    preprocess([str(documents[0].parent)], tiny_tokenizer.directory, tmp_path / "out", workers=1)
    assert not any(path.exists() for path in leftover)


def test_partial_folders_of_live_writers_are_left_alone(tmp_path):
    dead = tmp_path / f"x{shards.PARTIAL_SUFFIX}-999999999-abcd"
    live = tmp_path / f"y{shards.PARTIAL_SUFFIX}-{os.getpid()}-abcd"
    other = tmp_path / "user_folder.partial-notes"
    for folder in (dead, live, other):
        folder.mkdir()
    assert shards.remove_stale_partials(tmp_path) == [dead]
    assert live.is_dir() and other.is_dir() and not dead.exists()


def test_preprocess_into_a_folder_it_cannot_create_is_one_line(capsys, tmp_path, tiny_tokenizer):
    documents = write_text_files(tmp_path / "docs", make_documents(3))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = main(["preprocess", "--source", str(documents[0].parent), "--tokenizer", str(tiny_tokenizer.directory),
                 "--out", str(blocker / "out"), "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and error[0].startswith("error: cannot create output folder")
