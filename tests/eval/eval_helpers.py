"""Helpers of the evaluation, export and generation tests: synthetic task files in the layout of
shared/data/eval, a tiny trained run, and the real shared data when the machine has it."""

from __future__ import annotations

import json
import random
from pathlib import Path

from trainer_test_helpers import REPO

SHARED_EVAL = REPO.parent / "shared" / "data" / "eval"
ALL_TASKS = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "openbookqa", "lambada", "copa"]
# The words of the session corpus (tests/conftest.py), so that the test tokenizer covers them.
WORDS = (
    "the a one two three red green blue cat dog bird tree river stone small large quick slow runs jumps sees "
    "finds under over near far and but then because model token train loss step layer norm poly relu gelu"
).split()


def _sentence(generator: random.Random, low: int = 4, high: int = 9) -> str:
    return " ".join(generator.choice(WORDS) for _ in range(generator.randint(low, high)))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_eval_data(root: Path, count: int = 6, seed: int = 0) -> Path:
    """Synthetic files for every task, in the schemas of shared/data/eval (see its README)."""
    generator = random.Random(seed)
    say = lambda low=4, high=9: _sentence(generator, low, high)  # noqa: E731
    _write_jsonl(root / "hellaswag" / "hellaswag_val_sample1000.jsonl", [
        {"ind": index, "activity_label": say(1, 2).capitalize(), "ctx_a": say().capitalize() + ".", "ctx_b": say(1, 3),
         "ctx": "", "split": "val", "split_type": "indomain", "label": generator.randrange(4),
         "endings": [say() + "." for _ in range(4)], "source_id": f"synthetic~{index}"}
        for index in range(count)])
    for name in ("ARC-Easy", "ARC-Challenge"):
        _write_jsonl(root / "arc" / f"{name}-test.jsonl", [
            {"id": f"q{index}", "question": say().capitalize() + "?",
             "choices": {"text": [say(1, 4) for _ in range(4)], "label": list("ABCD")}, "answerKey": "ABCD"[index % 4]}
            for index in range(count)])
    _write_jsonl(root / "piqa" / "valid.jsonl", [{"goal": say(), "sol1": say(), "sol2": say()} for _ in range(count)])
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{index % 2}\n" for index in range(count)))
    icl = root / "llmfoundry_icl"
    _write_jsonl(icl / "boolq.jsonl", [
        {"query": f"Passage: {say(10, 20).capitalize()}.\nQuestion: {say()}?", "choices": ["no", "yes"], "gold": index % 2}
        for index in range(count)])
    rows = []
    for index in range(count):
        prefix, options = say().capitalize(), [generator.choice(WORDS), generator.choice(WORDS) + " " + generator.choice(WORDS)]
        rows.append({"context_options": [f"{prefix} {option}" for option in options], "continuation": say() + ".",
                     "gold": index % 2})
    _write_jsonl(icl / "winogrande.jsonl", rows)
    _write_jsonl(icl / "openbook_qa.jsonl", [
        {"query": say().capitalize(), "choices": [say(1, 4) for _ in range(4)], "gold": index % 4} for index in range(count)])
    _write_jsonl(icl / "lambada_openai.jsonl", [{"context": say(8, 16).capitalize(), "continuation": generator.choice(WORDS)}
                                                for _ in range(count)])
    _write_jsonl(icl / "copa.jsonl", [
        {"query": f"{say().capitalize()}, {'therefore' if index % 2 else 'because'}",
         "choices": [say() + ".", say() + "."], "gold": index % 2} for index in range(count)])
    return root


def train_tiny_run(prepared_data: dict, output_dir: Path, activation: str = "polynorm", **training) -> Path:
    """A tiny model trained for two steps on the session corpus (a run folder with a DCP checkpoint)."""
    from polycom_lm.train import run_training
    from trainer_test_helpers import load, run_config

    settings = {"max_steps": 2, "save_every_steps": 2, "eval_every_steps": 0, **training}
    raw = run_config(prepared_data, output_dir, **settings)
    raw["model"].update(activation=activation, max_seq_len=256)
    run_training(load(raw))
    return output_dir


class CountingModel:
    """Wraps a model's `__call__` to count forwards (what a sharding engine's collectives would see)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, input_ids):
        self.calls += 1
        return self.model(input_ids)

    def parameters(self):
        return self.model.parameters()

    @property
    def training(self):
        return self.model.training

    def eval(self):
        self.model.eval()

    def train(self, mode=True):
        self.model.train(mode)


def sharded_evaluation_worker(rank: int, world_size: int, init_file: str, run_dir: str, data_dir: str, out: str) -> None:
    """One rank of `test_sharding`: score the tasks with the replicated (cached) and the lockstep (wrapped)
    paths and save the metrics and the number of forwards."""
    import torch
    import torch.distributed as dist

    from polycom_lm.eval import get_task
    from polycom_lm.eval.runner import evaluate
    from polycom_lm.pretrained.loading import load_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        loaded = load_model(run_dir)
        tasks = {get_task(name): get_task(name).examples(Path(data_dir), 5) for name in ALL_TASKS}
        tasks = {task: examples[: 3 + ALL_TASKS.index(task.name) % 3] for task, examples in tasks.items()}

        def all_reduce_sum(tensor):
            dist.all_reduce(tensor)
            return tensor

        replicated = evaluate(loaded.model, loaded.tokenizer, tasks, max_length=256, batch_size=3, rank=rank,
                              world_size=world_size, all_reduce_sum=all_reduce_sum)
        counting = CountingModel(loaded.model)
        lockstep = evaluate(counting, loaded.tokenizer, tasks, max_length=256, batch_size=2, wrapped=True, rank=rank,
                            world_size=world_size, all_reduce_sum=all_reduce_sum)
        torch.save({"replicated": [(r.task, r.examples, r.metrics) for r in replicated.results],
                    "lockstep": [(r.task, r.examples, r.metrics) for r in lockstep.results],
                    "forwards": counting.calls}, out.format(rank=rank))
    finally:
        dist.destroy_process_group()
