"""Data pipeline throughput, measured side by side in one run (timings on a shared machine are noisy;
the ratios are what to compare).

1. Preprocessing: tokens/s of `preprocess` with 1 and 2 workers, against raw
   `SentencePieceProcessor.encode` (one thread) on the same documents; target ratio >= 0.8 per worker.
   Reported per wall second and per CPU second (all processes summed: the per-worker efficiency).
2. Training reads: tokens/s of random packed batches from `PackedDataset`, against the tokens/s a
   training step (forward + backward + AdamW step of `--model-config`) consumes; target >= 1000x.

    .venv/bin/python scripts/bench_data.py                     # english_novels/train, 8192-token BPE
    .venv/bin/python scripts/bench_data.py --tokenizer DIR     # reuse a tokenizer, skip its training
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polycom_lm.data.preprocess import preprocess  # noqa: E402
from polycom_lm.data.sources import open_source  # noqa: E402
from polycom_lm.data.tokenizer import load_tokenizer, train_sentencepiece  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "pretrain" / "english_novels" / "train"


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the preprocessing workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def raw_encode_tokens_per_second(model_file: Path, documents: list[str]) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of plain SentencePiece encoding."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    start, cpu_start = time.perf_counter(), cpu_seconds()
    tokens = sum(len(ids) + 1 for ids in (processor.encode(document) for document in documents))  # +1: EOS
    return tokens / (time.perf_counter() - start), tokens / (cpu_seconds() - cpu_start)


def preprocess_tokens_per_second(source: str, tokenizer_dir: Path, workers: int, scratch: Path) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second summed over the main process and the workers)."""
    out = scratch / f"shards_w{workers}_{time.monotonic_ns()}"
    start, cpu_start = time.perf_counter(), cpu_seconds()
    outputs = preprocess([source], tokenizer_dir, out, workers=workers)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    tokens = json.loads((outputs["train"] / "manifest.json").read_text())["num_tokens"]
    return tokens / elapsed, tokens / cpu


def training_step_seconds(model_config_path: Path, vocab_size: int, seq_len: int, batch: int, steps: int) -> float:
    import torch

    from polycom_lm.config import load_config
    from polycom_lm.models import build_model

    config = load_config(model_config_path)
    config.model.vocab_size = max(config.model.vocab_size, vocab_size)
    config.model.max_seq_len = max(config.model.max_seq_len, seq_len)
    torch.manual_seed(0)
    model = build_model(config.model, device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1))

    def step() -> None:
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="any data source (default: english_novels/train)")
    parser.add_argument("--tokenizer", default=None, help="existing tokenizer folder; default: train one")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokenizer-chars", type=int, default=3_000_000, help="characters to train the tokenizer on")
    parser.add_argument("--model-config", default=str(ROOT / "configs" / "model" / "small.yaml"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per training step / per read batch")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--read-batches", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the preprocessing measurements")
    args = parser.parse_args()

    if args.corpus == str(DEFAULT_CORPUS) and not DEFAULT_CORPUS.is_dir():
        print(f"corpus {args.corpus} not found; pass --corpus", file=sys.stderr)
        return 2
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as scratch_name:
        scratch = Path(scratch_name)
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        else:
            start = time.perf_counter()
            tokenizer = train_sentencepiece(open_source(args.corpus).documents(), scratch / "tokenizer", args.vocab_size,
                                            max_chars=args.tokenizer_chars)
            results["tokenizer_train_seconds"] = time.perf_counter() - start
        documents = list(open_source(args.corpus).documents())
        results["corpus_characters"] = sum(map(len, documents))
        model_file = tokenizer.directory / "tokenizer.model"
        # Interleaved repeats, best of each: other jobs on a shared machine only ever slow a pass down.
        # Tokens per CPU-second (summed over all processes) is the per-worker efficiency, and it is far less
        # disturbed by other jobs than wall time.
        raw, one, two = [], [], []
        for _ in range(args.repeats):
            if model_file.is_file():
                raw.append(raw_encode_tokens_per_second(model_file, documents))
            one.append(preprocess_tokens_per_second(args.corpus, tokenizer.directory, 1, scratch))
            two.append(preprocess_tokens_per_second(args.corpus, tokenizer.directory, 2, scratch))
        tokens = json.loads((next(scratch.glob("shards_w1_*")) / "train" / "manifest.json").read_text())["num_tokens"]
        best = lambda runs, index: max(run[index] for run in runs)  # noqa: E731
        results.update(corpus_tokens=tokens,
                       preprocess_tokens_per_s_1_worker=best(one, 0), preprocess_tokens_per_s_2_workers=best(two, 0),
                       preprocess_tokens_per_cpu_s_1_worker=best(one, 1), preprocess_tokens_per_cpu_s_2_workers=best(two, 1))
        if raw:
            results.update(raw_encode_tokens_per_s=best(raw, 0), raw_encode_tokens_per_cpu_s=best(raw, 1),
                           wall_ratio_1_worker_to_raw=best(one, 0) / best(raw, 0),
                           wall_ratio_2_workers_to_2x_raw=best(two, 0) / (2 * best(raw, 0)),
                           cpu_ratio_1_worker_to_raw=best(one, 1) / best(raw, 1),
                           cpu_ratio_2_workers_to_raw=best(two, 1) / best(raw, 1))

        from polycom_lm.data import PackedDataset

        shard = next(scratch.glob("shards_w1_*")) / "train"
        dataset = PackedDataset([(shard, 1.0)], seq_len=args.seq_len, seed=0)
        def seconds_per_batch(positions) -> float:
            start = time.perf_counter()
            for consumed in positions:
                dataset.global_batch(int(consumed), args.batch, 0, 1)
            return (time.perf_counter() - start) / len(positions)

        dataset.global_batch(0, args.batch, 0, 1)
        # As training reads: consecutive global batches. And the worst case: every batch at a random
        # position many epochs deep, so no mixture block or epoch permutation is cached.
        read_seconds = seconds_per_batch([i * args.batch for i in range(args.read_batches)])
        random_seconds = seconds_per_batch(np.random.default_rng(0).integers(0, 10**9, size=args.read_batches // 4))
        step_seconds = training_step_seconds(Path(args.model_config), tokenizer.vocab_size, args.seq_len, args.batch,
                                             args.train_steps)
        batch_tokens = args.batch * args.seq_len
        results.update(read_tokens_per_s=batch_tokens / read_seconds,
                       random_position_read_tokens_per_s=batch_tokens / random_seconds,
                       train_step_tokens_per_s=batch_tokens / step_seconds,
                       read_speed_over_train_step=step_seconds / read_seconds,
                       random_position_read_speed_over_train_step=step_seconds / random_seconds)
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:,.3f}" if isinstance(value, float) else f"{name:<{width}}  {value:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
