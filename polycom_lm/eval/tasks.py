"""The zero-shot tasks of the PolyCom paper, each built exactly as lm-evaluation-harness builds it (the
harness file is cited in every class; `polycom_lm.eval.harness` runs those very files on the same rows to
check us). Local files are those of shared/data/eval (see its README); where their schema differs from the
hub's, `local_rows` converts them and says what can differ.
"""

from __future__ import annotations

import re

from polycom_lm.eval.task import (
    LOGLIKELIHOOD,
    TASKS,
    Example,
    Request,
    Task,
    multiple_choice,
    read_jsonl,
)


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


@TASKS.register("hellaswag")
class HellaSwag(Task):
    """lm_eval/tasks/hellaswag/hellaswag.yaml + utils.py: query = preprocess(activity_label + ": " + ctx_a +
    " " + ctx_b.capitalize()), choices = preprocessed endings. Local: the 1,000-example validation subset in
    the original schema (the full .bz2 in shared/data lost ctx_b's capitalisation, so it is not used)."""

    name = "hellaswag"
    chance = 0.25
    metrics = ("acc", "acc_norm")
    harness_file = "hellaswag/hellaswag.yaml"
    hub = ("Rowan/hellaswag", None, "validation")
    local_files = ("hellaswag/hellaswag_val_sample1000.jsonl",)
    local_note = "1,000 rows of the HellaSwag validation set in its original jsonl schema"

    def build(self, row):
        query = _hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        return multiple_choice(query, [_hellaswag_preprocess(ending) for ending in row["endings"]], int(row["label"]))

    def local_rows(self, data_dir):
        return read_jsonl(data_dir / self.local_files[0])


class _ARC(Task):
    """lm_eval/tasks/arc/arc_easy.yaml and arc/arc_challenge.yaml (which includes it): "Question: {{question}}\\nAnswer:",
    choices = choices.text, gold = choices.label.index(answerKey); the test split, as the harness uses."""

    metrics = ("acc", "acc_norm")
    chance = 0.25
    local_note = "the ARC test split in the schema of allenai/ai2_arc"

    def build(self, row):
        choices = row["choices"]
        return multiple_choice(f"Question: {row['question']}\nAnswer:", choices["text"],
                               list(choices["label"]).index(row["answerKey"]))

    def local_rows(self, data_dir):
        return read_jsonl(data_dir / self.local_files[0])


@TASKS.register("arc_easy")
class ARCEasy(_ARC):
    __doc__ = _ARC.__doc__
    name = "arc_easy"
    harness_file = "arc/arc_easy.yaml"
    hub = ("allenai/ai2_arc", "ARC-Easy", "test")
    local_files = ("arc/ARC-Easy-test.jsonl",)


@TASKS.register("arc_challenge")
class ARCChallenge(_ARC):
    __doc__ = _ARC.__doc__
    name = "arc_challenge"
    harness_file = "arc/arc_challenge.yaml"
    hub = ("allenai/ai2_arc", "ARC-Challenge", "test")
    local_files = ("arc/ARC-Challenge-test.jsonl",)


@TASKS.register("piqa")
class PIQA(Task):
    """lm_eval/tasks/piqa/piqa.yaml: "Question: {{goal}}\\nAnswer:", choices [sol1, sol2], gold = label.
    Local: the official dev set, the labels in a separate file, one per line."""

    name = "piqa"
    chance = 0.5
    metrics = ("acc", "acc_norm")
    harness_file = "piqa/piqa.yaml"
    hub = ("baber/piqa", None, "validation")
    local_files = ("piqa/valid.jsonl", "piqa/valid-labels.lst")
    local_note = "the official PIQA dev set and its labels"

    def build(self, row):
        return multiple_choice(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))

    def local_rows(self, data_dir):
        rows = read_jsonl(data_dir / self.local_files[0])
        labels = (data_dir / self.local_files[1]).read_text(encoding="utf-8").split()
        if len(labels) != len(rows):
            raise ValueError(f"{data_dir / self.local_files[1]} has {len(labels)} labels for {len(rows)} rows")
        return [{**row, "label": int(label)} for row, label in zip(rows, labels)]


@TASKS.register("boolq")
class BoolQ(Task):
    """lm_eval/tasks/super_glue/boolq/default.yaml: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:",
    choices ["no", "yes"], acc only. Local: llm-foundry's dev set, `query` = "Passage: {passage}\\nQuestion:
    {question}?" (the harness's text without "Passage: " and "\\nAnswer:"), split back at the last
    "\\nQuestion: "."""

    name = "boolq"
    chance = 0.5
    harness_file = "super_glue/boolq/default.yaml"
    hub = ("aps/super_glue", "boolq", "validation")
    local_files = ("llmfoundry_icl/boolq.jsonl",)
    local_note = "llm-foundry's BoolQ dev set (scripts/eval/local_data/reading_comprehension/boolq.jsonl)"

    def build(self, row):
        return multiple_choice(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["label"]))

    def local_rows(self, data_dir):
        rows = []
        for row in read_jsonl(data_dir / self.local_files[0]):
            query = row["query"]
            if not query.startswith("Passage: ") or "\nQuestion: " not in query or not query.endswith("?"):
                raise ValueError(f"BoolQ query not of the form 'Passage: ...\\nQuestion: ...?': {query[:60]!r}")
            passage, question = query[len("Passage: "):].rsplit("\nQuestion: ", 1)
            rows.append({"passage": passage, "question": question[:-1], "label": int(row["gold"])})
        return rows


@TASKS.register("winogrande")
class Winogrande(Task):
    """lm_eval/tasks/winogrande/default.yaml + preprocess_winogrande.py, partial scoring: one context per
    option, sentence[:blank] + option, each scored on the same continuation " " + sentence[blank+1:].strip();
    acc only. Local: llm-foundry's dev set ({context_options, continuation, gold}), turned back into a
    sentence with a blank after the options' common prefix: the requests are identical to the harness's."""

    name = "winogrande"
    chance = 0.5
    harness_file = "winogrande/default.yaml"
    hub = ("allenai/winogrande", "winogrande_xl", "validation")
    local_files = ("llmfoundry_icl/winogrande.jsonl",)
    local_note = "llm-foundry's WinoGrande dev set (scripts/eval/local_data/language_understanding/winogrande.jsonl)"

    def build(self, row):
        sentence = row["sentence"]
        blank = sentence.index("_")
        target = " " + sentence[blank + 1:].strip()
        contexts = [sentence[:blank] + option for option in (row["option1"], row["option2"])]
        return Example(tuple(Request(context, target) for context in contexts), {"1": 0, "2": 1}[str(row["answer"])])

    def local_rows(self, data_dir):
        rows = []
        for row in read_jsonl(data_dir / self.local_files[0]):
            first, second = row["context_options"]
            shared = 0
            while shared < min(len(first), len(second)) and first[shared] == second[shared]:
                shared += 1
            rows.append({
                "sentence": first[:shared] + "_ " + row["continuation"],
                "option1": first[shared:], "option2": second[shared:], "answer": str(int(row["gold"]) + 1),
            })
        return rows


@TASKS.register("openbookqa")
class OpenBookQA(Task):
    """lm_eval/tasks/openbookqa/openbookqa.yaml: the bare question stem as context, choices = choices.text,
    gold = choices.label.index(answerKey); the test split. Local: llm-foundry's test set ({query, choices,
    gold}), the same 500 questions as AI2's test.tsv."""

    name = "openbookqa"
    chance = 0.25
    metrics = ("acc", "acc_norm")
    harness_file = "openbookqa/openbookqa.yaml"
    hub = ("allenai/openbookqa", "main", "test")
    local_files = ("llmfoundry_icl/openbook_qa.jsonl",)
    local_note = "llm-foundry's OpenBookQA test set (scripts/eval/local_data/commonsense_reasoning/openbook_qa.jsonl)"

    def build(self, row):
        choices = row["choices"]
        gold = list(choices["label"]).index(row["answerKey"].lstrip())
        return multiple_choice(row["question_stem"], choices["text"], gold)

    def local_rows(self, data_dir):
        labels = "ABCDEFGH"
        return [
            {"question_stem": row["query"], "answerKey": labels[int(row["gold"])],
             "choices": {"text": row["choices"], "label": list(labels[: len(row["choices"])])}}
            for row in read_jsonl(data_dir / self.local_files[0])
        ]


@TASKS.register("lambada")
class Lambada(Task):
    """lm_eval/tasks/lambada/lambada_openai.yaml (the harness's `lambada_openai`): context = the text
    without its last space-separated word, continuation = " " + that word; acc = greedy decoding gives the
    word, perplexity = exp(-mean log-likelihood of the word). Local: llm-foundry's {context, continuation},
    joined back with one space (no continuation holds a space, so the split is the same)."""

    name = "lambada"
    chance = 0.0
    output_type = LOGLIKELIHOOD
    metrics = ("perplexity", "acc")
    harness_file = "lambada/lambada_openai.yaml"
    hub = ("EleutherAI/lambada_openai", "default", "test")
    local_files = ("llmfoundry_icl/lambada_openai.jsonl",)
    local_note = ("llm-foundry's LAMBADA (OpenAI) test set "
                  "(scripts/eval/local_data/language_understanding/lambada_openai.jsonl)")

    def build(self, row):
        words = row["text"].split(" ")
        return Example((Request(" ".join(words[:-1]), " " + words[-1]),), 0)

    def local_rows(self, data_dir):
        return [{"text": row["context"] + " " + row["continuation"]} for row in read_jsonl(data_dir / self.local_files[0])]


def _copa_choice(choice: str) -> str:
    return choice[0].lower() + choice[1:]


@TASKS.register("copa")
class COPA(Task):
    """lm_eval/tasks/super_glue/copa/default.yaml + utils.py: context = premise without its last character
    + " because" / " therefore", choices " " + choice with a lower-case first letter; with the default
    target delimiter " " the continuation starts with two spaces, as in the harness. acc only. Local:
    llm-foundry's set ({query: "<premise>, therefore", choices, gold}); its comma is dropped to restore the
    harness's context."""

    name = "copa"
    chance = 0.5
    harness_file = "super_glue/copa/default.yaml"
    hub = ("aps/super_glue", "copa", "validation")
    local_files = ("llmfoundry_icl/copa.jsonl",)
    local_note = "llm-foundry's COPA set (scripts/eval/local_data/commonsense_reasoning/copa.jsonl)"

    def build(self, row):
        connector = {"cause": "because", "effect": "therefore"}[row["question"]]
        context = row["premise"].strip()[:-1] + f" {connector}"
        choices = [" " + _copa_choice(row["choice1"]), " " + _copa_choice(row["choice2"])]
        return multiple_choice(context, choices, int(row["label"]))

    def local_rows(self, data_dir):
        rows = []
        for row in read_jsonl(data_dir / self.local_files[0]):
            stem, connector = row["query"].rsplit(", ", 1)
            question = {"because": "cause", "therefore": "effect"}[connector]
            first, second = row["choices"]
            rows.append({"premise": stem + ".", "question": question, "choice1": first, "choice2": second,
                         "label": int(row["gold"])})
        return rows


__all__ = ["ARCChallenge", "ARCEasy", "BoolQ", "COPA", "HellaSwag", "Lambada", "OpenBookQA", "PIQA", "Winogrande"]
