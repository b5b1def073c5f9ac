"""Shared fixtures: one tiny tokenised corpus per session, for the trainer and end-to-end launcher tests."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

# Helper modules shared across test folders (trainer_test_helpers, engine_harness, ...).
for _folder in ("train", "distributed", "checkpoint", "eval", "pretrained"):
    _path = str(Path(__file__).resolve().parent / _folder)
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Every training run (and each rank of one) would otherwise time its MFU peak with 1024³ and 2048³ matmuls at
# start-up: about 1.3 s of CPU each, a few minutes over the suite. The measurement itself is tested in
# test_mfu.py and test_logging_outputs.py with this unset. Exported, so that subprocesses inherit it.
os.environ.setdefault("POLYCOM_LM_PEAK_FLOPS", "1e12")

_WORDS = (
    "the a one two three red green blue cat dog bird tree river stone small large quick slow runs jumps sees "
    "finds under over near far and but then because model token train loss step layer norm poly relu gelu"
).split()


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> dict[str, Path]:
    """{"train": shard folder, "validation": shard folder} of a small synthetic corpus (tokenised once)."""
    from polycom_lm.config import config_from_dict
    from polycom_lm.data import prepare_run_data

    root = tmp_path_factory.mktemp("train_data")
    generator = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for index in range(40):
        sentences = [
            " ".join(generator.choice(_WORDS) for _ in range(generator.randint(5, 14))).capitalize() + "."
            for _ in range(60)
        ]
        (corpus / f"doc{index:03d}.txt").write_text(" ".join(sentences) + "\n", encoding="utf-8")
    config = config_from_dict(
        {
            "data": {
                "train": [{"source": str(corpus)}],
                "tokenizer": {"vocab_size": 200, "byte_fallback": False, "train_max_chars": 200_000},
                "cache_dir": str(root / "cache"),
                "val_fraction": 0.1,
                "preprocess_workers": 1,
            }
        }
    )
    prepared = prepare_run_data(config.data, is_main_process=True, barrier=lambda: None)
    assert prepared.vocab_size <= 512, "the tiny model's vocabulary must cover the test tokenizer"
    return {"train": prepared.train[0][0], "validation": next(iter(prepared.validation.values()))}
