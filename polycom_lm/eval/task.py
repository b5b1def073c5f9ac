"""Zero-shot tasks: what a task is, where its examples come from, and the task registry.

A task turns data rows into `Example`s, each a list of `Request`s (context, continuation) scored by the
sum of the continuation's token log-likelihoods, exactly as lm-evaluation-harness builds them:
- multiple choice: one request per choice, `(prompt, target_delimiter + choice)`; `acc` takes the
  highest log-likelihood, `acc_norm` the highest log-likelihood per character of the choice (the
  harness's `len(choice)`; characters are bytes for ASCII text), both against the gold index;
- multiple inputs (Winogrande's partial scoring): one request per *context*, all with the same
  continuation;
- cloze (LAMBADA): one request; `acc` is whether greedy decoding reproduces the continuation, and the
  log-likelihoods also give the perplexity.

Rows come from local files (`data_dir`, the layout of shared/data/eval, see `local_files`) or from the
Hugging Face hub (`hub`, read with `datasets`, imported only then). Local rows are first converted into
the hub's schema (`local_rows`), so that one `build(row)` — the harness's prompt code, cited in each
class — serves both.

Adding a task is one class: subclass `Task`, set the fields, implement `build` (and `local_rows` if it has
local files), and register it with `@TASKS.register(name)`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from polycom_lm.errors import DataError
from polycom_lm.registry import Registry

logger = logging.getLogger(__name__)

TASKS = Registry("task")

MULTIPLE_CHOICE = "multiple_choice"
LOGLIKELIHOOD = "loglikelihood"


@dataclass(frozen=True)
class Request:
    """Score log P(continuation | context); the context is never empty."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Example:
    """One question: its requests (one per choice, or one per context for multiple inputs), the index of
    the right one, and the choice strings whose lengths normalise `acc_norm`."""

    requests: tuple[Request, ...]
    gold: int
    choices: tuple[str, ...] = ()


class Task:
    """Base class of the registered tasks; see the module docstring."""

    name: str
    output_type: str = MULTIPLE_CHOICE
    metrics: tuple[str, ...] = ("acc",)  # what the harness reports for the task
    # Accuracy of a uniform guess (1 / choices; ARC's few 3- and 5-choice questions are ignored), what a
    # report compares `acc` / `acc_norm` with to say that a model is at chance; None: not meaningful.
    chance: Optional[float] = None
    harness_file: str = ""  # the task's definition in lm-evaluation-harness (lm_eval/tasks/...)
    hub: tuple[str, Optional[str], str] = ("", None, "")  # (dataset path, config name, split) on the hub
    local_files: tuple[str, ...] = ()  # paths under --data-dir, the first being the examples
    local_note: str = ""  # where the local files come from, for error messages

    def build(self, row: dict[str, Any]) -> Example:
        """The harness's requests for one row in the hub's schema."""
        raise NotImplementedError

    def local_rows(self, data_dir: Path) -> list[dict[str, Any]]:
        """The local examples converted into the hub's schema."""
        raise NotImplementedError

    def hub_rows(self) -> list[dict[str, Any]]:
        import datasets

        path, config_name, split = self.hub
        return [dict(row) for row in datasets.load_dataset(path, config_name, split=split)]

    def rows(self, data_dir: Optional[Path]) -> list[dict[str, Any]]:
        """Rows in the hub's schema: from `data_dir` when given (DataError naming any missing file),
        else from the hub (DataError saying where to put local files when it cannot be reached)."""
        if data_dir is not None:
            for relative in self.local_files:
                if not (Path(data_dir) / relative).is_file():
                    raise DataError(
                        f"task {self.name}: {Path(data_dir) / relative} not found; --data-dir must hold "
                        f"{' and '.join(self.local_files)} ({self.local_note}), or omit --data-dir to read "
                        f"{self.hub[0]} from the Hugging Face hub"
                    )
            try:
                return self.local_rows(Path(data_dir))
            except (KeyError, ValueError, TypeError, IndexError) as error:
                raise DataError(f"task {self.name}: {Path(data_dir) / self.local_files[0]} is malformed "
                                f"({type(error).__name__}: {error})") from None
        try:
            return self.hub_rows()
        except ImportError:
            reason = "the datasets package is not installed"
        except Exception as error:  # offline, missing dataset, network errors: many types
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"task {self.name}: cannot read {self.hub[0]} from the Hugging Face hub ({reason}); put "
            f"{' and '.join(self.local_files)} ({self.local_note}) in a folder and pass --data-dir FOLDER"
        )

    def examples(self, data_dir: Optional[Path], limit: Optional[int] = None) -> list[Example]:
        """The first `limit` (all if None) examples, in file order, as the harness's --limit takes them."""
        rows = self.rows(data_dir)
        if limit is not None:
            rows = rows[:limit]
        examples = []
        for index, row in enumerate(rows):
            try:
                examples.append(self.build(row))
            except (KeyError, ValueError, TypeError, IndexError) as error:
                raise DataError(
                    f"task {self.name}: example {index} is malformed ({type(error).__name__}: {error})"
                ) from None
        return examples


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error})") from None
    return rows


def multiple_choice(context: str, choices: Iterable[str], gold: int, target_delimiter: str = " ") -> Example:
    """The harness's multiple-choice requests: (context, target_delimiter + choice) for each choice."""
    choices = tuple(choices)
    return Example(tuple(Request(context, target_delimiter + choice) for choice in choices), int(gold), choices)


def get_task(name: str) -> Task:
    """An instance of the task registered as `name` (ConfigError listing the known tasks otherwise)."""
    return TASKS.get(name)()


def parse_task_list(text: str) -> list[str]:
    """'a,b, c' → ['a', 'b', 'c'], each checked against the registry."""
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    for name in names:
        TASKS.get(name)
    return names
