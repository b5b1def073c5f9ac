"""Run lm-evaluation-harness itself on the rows our tasks read: the check that our prompts and scoring are
the harness's (tests) and the baseline of `scripts/bench_eval.py`.

For each task a harness task config is written that `include`s the harness's own task file (its prompt
templates, `process_docs` and metrics, resolved inside the installed `lm_eval` package) and overrides only
where the rows come from: a local jsonl file of the rows our task read, in the hub's schema. The model is
the harness's `hf` model on an exported folder (`trust_remote_code` for PolycomForCausalLM).
Everything runs offline. lm_eval is imported only here (the `eval` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from polycom_lm.eval.task import Task


def harness_task_name(task: Task) -> str:
    return f"polycom_{task.name}"


def write_harness_tasks(rows: dict[Task, list[dict[str, Any]]], folder: Path) -> list[str]:
    """Harness task configs (and their data files) for `rows` in `folder`; returns the task names."""
    import lm_eval

    tasks_root = Path(lm_eval.__file__).resolve().parent / "tasks"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task, task_rows in rows.items():
        data_file = folder / f"{task.name}.jsonl"
        data_file.write_text("".join(json.dumps(row) + "\n" for row in task_rows), encoding="utf-8")
        split = task.hub[2]
        config = {
            "include": str(tasks_root / task.harness_file),
            "task": harness_task_name(task),
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data_file)}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
            "fewshot_split": None,
        }
        (folder / f"{task.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        names.append(harness_task_name(task))
    return names


def harness_model(model_dir: Path, *, batch_size: int = 32, device: str = "cpu"):
    """lm-evaluation-harness's `hf` model (HFLM) on an exported folder, float32, remote code trusted."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), trust_remote_code=True, dtype="float32", batch_size=batch_size,
                device=device)


def run_harness(model: Any, tasks: dict[Task, list[dict[str, Any]]], folder: Path, *, batch_size: int = 32,
                device: str = "cpu", limit: Optional[int] = None) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of `model` (an exported folder, or an `harness_model`) on `tasks` (rows
    per task), zero-shot, without bootstrapped standard errors.

    Returns {task name: {"metrics": {metric: value}, "loglikelihoods": [[ll per request] per example]}}
    with examples in row order.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if isinstance(model, (str, Path)):
        model = harness_model(Path(model), batch_size=batch_size, device=device)
    names = write_harness_tasks(tasks, folder)
    output = lm_eval.simple_evaluate(
        model=model, tasks=names, num_fewshot=0, limit=limit,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        log_samples=True, bootstrap_iters=0,
    )
    results = {}
    for task in tasks:
        name = harness_task_name(task)
        metrics = {key.split(",")[0]: value for key, value in output["results"][name].items()
                   if "," in key and "_stderr" not in key}
        samples = sorted(output["samples"][name], key=lambda sample: sample["doc_id"])
        lls = [[float(response[0][0]) for response in sample["resps"]] for sample in samples]
        results[task.name] = {"metrics": metrics, "loglikelihoods": lls}
    return results
