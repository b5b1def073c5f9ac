"""`polycom-lm eval MODEL --tasks hellaswag,arc_easy [--limit N] [--data-dir DIR] [--out results.json]`:
zero-shot accuracy, scored as lm-evaluation-harness scores it.

Task data comes from --data-dir (the layout of shared/data/eval) or, without it, from the Hugging Face hub.
Under torchrun the examples are split over the ranks and the metrics summed: the result is one process's.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from polycom_lm.commands.model_source import add_model_arguments, load_from_arguments, resolve_device
from polycom_lm.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from polycom_lm.eval import TASKS

    parser = subparsers.add_parser("eval", help="zero-shot downstream accuracy (lm-evaluation-harness scoring)",
                                   description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--tasks", required=True, help=f"comma-separated tasks: {', '.join(sorted(TASKS))}")
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each task (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="requests (continuations) per forward")
    parser.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                        help="local task files (e.g. ../shared/data/eval); default: the Hugging Face hub")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="model dtype (default fp32)")
    parser.add_argument("--no-context-sharing", action="store_true",
                        help="run every request's whole input (no shared-prefix KV cache); slower, for comparison")
    parser.add_argument("--harness-tasks", type=Path, default=None, metavar="DIR",
                        help="also write lm-evaluation-harness task configs for the same examples into DIR "
                             "(its own task files, local data), and print the lm_eval command that runs them")
    parser.set_defaults(func=run)


def _check_arguments(args: argparse.Namespace) -> list[str]:
    from polycom_lm.eval import parse_task_list

    tasks = parse_task_list(args.tasks)
    if not tasks:
        raise ConfigError("--tasks is empty; give a comma-separated list of tasks")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1 (or left out for every example), got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.out is not None and args.out.exists() and not args.force:
        raise ConfigError(f"--out {args.out} exists; pass --force to replace it")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise ConfigError(f"--data-dir {args.data_dir} is not a folder")
    return tasks


def _write_json_atomically(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _write_harness_tasks(args: argparse.Namespace, tasks: list) -> None:
    from polycom_lm.eval.harness import write_harness_tasks

    try:
        names = write_harness_tasks({task: task.rows(args.data_dir)[: args.limit] for task in tasks}, args.harness_tasks)
    except ImportError:
        raise ConfigError("--harness-tasks needs lm-evaluation-harness: pip install -e .[eval]") from None
    print(f"wrote lm-evaluation-harness tasks to {args.harness_tasks}; run them on an exported folder with:\n"
          f"  lm_eval --model hf --model_args pretrained=EXPORTED_DIR,trust_remote_code=True,dtype=float32 "
          f"--include_path {args.harness_tasks} --tasks {','.join(names)} --device cpu --batch_size {args.batch_size}")


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from polycom_lm.eval import get_task
    from polycom_lm.eval.results import format_table, results_document
    from polycom_lm.eval.runner import evaluate

    names = _check_arguments(args)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(args.device)
    initialised_here = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        initialised_here = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        tasks = {get_task(name): None for name in names}
        for task in tasks:  # data problems surface before the model is loaded
            tasks[task] = task.examples(args.data_dir, args.limit)
        if args.harness_tasks is not None and rank == 0:
            _write_harness_tasks(args, list(tasks))
        loaded = load_from_arguments(args, device, DTYPES[args.dtype])

        def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(tensor)
            return tensor

        run_result = evaluate(
            loaded.model, loaded.tokenizer, tasks, max_length=loaded.model_config.max_seq_len,
            batch_size=args.batch_size, share_context=not args.no_context_sharing, rank=rank,
            world_size=world_size, all_reduce_sum=all_reduce_sum if world_size > 1 else None,
        )
        if rank == 0:
            header = {
                "model": str(loaded.source), "kind": loaded.kind, "step": loaded.step, "tokens": loaded.tokens,
                "activation": loaded.model_config.activation, "family": loaded.model_config.family,
                "data": str(args.data_dir) if args.data_dir else "huggingface-hub", "limit": args.limit,
                "batch_size": args.batch_size, "context_sharing": not args.no_context_sharing,
                "world_size": world_size, "seconds": round(run_result.seconds, 3),
                "examples_per_second": round(run_result.examples_per_second, 3),
            }
            print(f"model {loaded.source} ({loaded.kind}, step {loaded.step}, {loaded.tokens} tokens): "
                  f"{run_result.examples} examples in {run_result.seconds:.1f} s "
                  f"({run_result.examples_per_second:.2f} examples/s, {world_size} process(es))")
            print(format_table(run_result.results))
            if args.out is not None:
                _write_json_atomically(args.out, results_document(run_result.results, **header))
                print(f"wrote {args.out}")
    finally:
        if initialised_here:
            dist.destroy_process_group()
    return 0
