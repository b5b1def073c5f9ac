"""Time to the first training step on a large local jsonl: streaming (`data.streaming: true`) against
preprocessing the file first (`polycom-lm preprocess`, then training from the shards), measured side by
side in one run with the same model, tokenizer and worker count. Both go through the real CLI, so each
number includes starting Python, building the model and, for streaming, starting the reader and tokeniser
processes. Timings on a shared machine are noisy; the ratio is what to compare.

    .venv/bin/python scripts/bench_streaming.py                        # 1000 MB, 2 tokeniser processes
    .venv/bin/python scripts/bench_streaming.py --size-mb 200 --workers 4 --tokenizer DIR

The corpus is made in a temporary folder (deleted at the end) from the shared pretraining text (TinyStories,
the novels, WikiText, Tiny Shakespeare), repeated in shuffled order with a counter so no two lines are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "pretrain"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data/pretrain")


def source_documents() -> list[str]:
    documents: list[str] = []
    for path in sorted((SHARED / "tinystories").glob("*train*.txt")):
        documents += [d.strip() for d in path.read_text(encoding="utf-8").split("<|endoftext|>") if d.strip()]
    for path in sorted((SHARED / "english_novels").rglob("*.txt")):
        paragraphs = [p for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8-sig")) if p.strip()]
        documents += ["\n\n".join(paragraphs[i:i + 20]) for i in range(0, len(paragraphs), 20)]
    for path in [*sorted((SHARED / "wikitext-2").glob("*.txt")), SHARED / "tinyshakespeare" / "input.txt"]:
        if path.is_file():
            documents += [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if len(p.strip()) > 200]
    if not documents:
        from polycom_lm.data.pydoc_corpus import iter_documents

        documents = list(iter_documents("train"))
    return documents


def write_corpus(path: Path, size_bytes: int) -> int:
    documents = source_documents()
    rng = random.Random(0)
    written = copy = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size_bytes:
            order = list(range(len(documents)))
            rng.shuffle(order)
            for index in order:
                line = json.dumps({"text": f"[{copy}] {documents[index]}"}) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                if written >= size_bytes:
                    break
            copy += 1
    return written


def write_config(folder: Path, name: str, source: str, tokenizer: Path, streaming: bool, workers: int) -> Path:
    raw = {"base": str(ROOT / "configs" / "model" / "small.yaml"), "experiment": name,
           "model": {"activation": "polynorm"},
           "data": {"train": [{"source": source}], "tokenizer": {"path": str(tokenizer)},
                    "cache_dir": str(folder / "cache"), "streaming": streaming, "stream_workers": workers},
           "training": {"output_dir": str(folder / "runs" / name), "max_steps": 3, "seq_len": 256,
                        "global_batch_size": 8, "micro_batch_size": 8, "log_every_steps": 1,
                        "eval_every_steps": 0, "save_every_steps": 0, "compile": False},
           "logging": {"wandb_mode": "disabled", "progress_bar": False}}
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def seconds_to_step_1(config: Path, metrics: Path, environment: dict) -> float:
    """Wall seconds from starting `polycom-lm train` to its first metrics row (step 1)."""
    start = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "polycom_lm.cli", "train", str(config), "--no-progress"],
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while process.poll() is None:
        if first is None and metrics.is_file() and metrics.read_text(encoding="utf-8").strip():
            first = time.monotonic() - start
        time.sleep(0.05)
    if process.returncode != 0:
        raise SystemExit(f"training failed:\n{process.stderr.read()[-2000:]}")
    return first if first is not None else time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="tokeniser processes, for both")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: train 8192-token BPE on builtin:pydoc)")
    args = parser.parse_args()
    environment = {**os.environ, "WANDB_MODE": "disabled"}
    environment.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="bench_streaming_") as scratch:
        folder = Path(scratch)
        tokenizer = args.tokenizer
        if tokenizer is None:
            from polycom_lm.data.sources import open_source
            from polycom_lm.data.tokenizer import train_sentencepiece

            tokenizer = folder / "tokenizer"
            train_sentencepiece(open_source("builtin:pydoc").documents(), tokenizer, 8192, max_chars=5_000_000)
        corpus = folder / "corpus.jsonl"
        size = write_corpus(corpus, args.size_mb * 1_000_000)
        print(f"corpus: {size / 1e6:.0f} MB jsonl; tokenizer {tokenizer}; {args.workers} tokeniser processes; "
              f"{os.cpu_count()} CPUs")

        streamed = seconds_to_step_1(write_config(folder, "stream", str(corpus), tokenizer, True, args.workers),
                                     folder / "runs" / "stream" / "metrics.jsonl", environment)
        print(f"streaming:            step 1 after {streamed:7.1f} s")

        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "polycom_lm.cli", "preprocess", "--source", str(corpus), "--tokenizer",
                        str(tokenizer), "--out", str(folder / "shards"), "--workers", str(args.workers),
                        "--no-progress"], env=environment, check=True, stdout=subprocess.DEVNULL)
        preprocessing = time.monotonic() - start
        tokens = json.loads((folder / "shards" / "train" / "manifest.json").read_text())["num_tokens"]
        from_shards = seconds_to_step_1(write_config(folder, "shards", str(folder / "shards"), tokenizer, False,
                                                     args.workers), folder / "runs" / "shards" / "metrics.jsonl",
                                        environment)
        print(f"preprocess first:     {preprocessing:7.1f} s tokenising {tokens / 1e6:.0f}M tokens "
              f"({tokens / preprocessing / 1e3:.0f}k tokens/s), then step 1 after {from_shards:.1f} s: "
              f"{preprocessing + from_shards:.1f} s in all")
        print(f"ratio: streaming reaches step 1 {(preprocessing + from_shards) / streamed:.0f}x sooner")


if __name__ == "__main__":
    main()
