"""Downstream (zero-shot) evaluation, scored as lm-evaluation-harness scores it.

    task.py     what a task is, where its rows come from (local files or the hub), the `TASKS` registry
    tasks.py    the tasks (hellaswag, arc_easy, arc_challenge, piqa, boolq, winogrande, openbookqa, lambada,
                copa), one class each
    scoring.py  continuation log-likelihoods in batches, a shared prefix run once through a KV cache
    runner.py   tasks × examples → per-task sums, sharded over ranks and summed
    results.py  metrics with standard errors, the console table and the JSON file
    harness.py  running lm-evaluation-harness itself on the same rows (tests and scripts/bench_eval.py)
"""

from polycom_lm.eval import tasks  # noqa: F401  registers the tasks
from polycom_lm.eval.task import TASKS, Example, Request, Task, get_task, parse_task_list

__all__ = ["TASKS", "Example", "Request", "Task", "get_task", "parse_task_list"]
