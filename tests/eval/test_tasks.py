"""The tasks: the harness's prompts from local files (synthetic and, when present, shared/data/eval), the
registry, and one-line errors for unknown tasks, missing files and an unreachable hub."""

from __future__ import annotations

import pytest

from eval_helpers import ALL_TASKS, SHARED_EVAL
from polycom_lm.errors import ConfigError, DataError
from polycom_lm.eval import TASKS, get_task, parse_task_list
from polycom_lm.eval.task import Request

needs_shared_data = pytest.mark.skipif(not SHARED_EVAL.is_dir(), reason="shared/data/eval is not on this machine")


def test_every_task_is_registered_and_cites_its_harness_file():
    assert sorted(TASKS) == sorted(ALL_TASKS)
    for name in ALL_TASKS:
        task = get_task(name)
        assert task.harness_file and task.harness_file in task.__doc__.replace("lm_eval/tasks/", "")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown task 'hellaswog' \\(did you mean 'hellaswag'\\?\\); registered: arc_challenge, arc_easy"):
        parse_task_list("piqa,hellaswog")


@pytest.mark.parametrize("name", ALL_TASKS)
def test_synthetic_local_files_build_examples(eval_data, name):
    examples = get_task(name).examples(eval_data, limit=4)
    assert len(examples) == 4
    for example in examples:
        assert example.requests and 0 <= example.gold < len(example.requests)
        assert all(request.context and request.continuation for request in example.requests)


def test_winogrande_partial_scoring_shares_the_continuation_across_option_contexts(eval_data):
    task = get_task("winogrande")
    example = task.build({"sentence": "Sarah was a better surgeon than Maria so _ always got the harder cases.",
                          "option1": "Sarah", "option2": "Maria", "answer": "2"})
    assert example.requests == (
        Request("Sarah was a better surgeon than Maria so Sarah", " always got the harder cases."),
        Request("Sarah was a better surgeon than Maria so Maria", " always got the harder cases."),
    )
    assert example.gold == 1 and example.choices == ()
    # llm-foundry's form turns back into the same requests, also when the options share a prefix.
    (row,) = [{"context_options": ["It broke the bed", "It broke the blanket"], "continuation": "was ruined.", "gold": 0}]
    import json
    folder = eval_data.parent / "winogrande_case"
    (folder / "llmfoundry_icl").mkdir(parents=True)
    (folder / "llmfoundry_icl" / "winogrande.jsonl").write_text(json.dumps(row) + "\n")
    (example,) = task.examples(folder)
    assert example.requests == (Request("It broke the bed", " was ruined."), Request("It broke the blanket", " was ruined."))


def test_copa_and_boolq_are_turned_into_the_harness_prompts(eval_data):
    copa = get_task("copa").build({"premise": "The man turned on the faucet.", "choice1": "The toilet filled.",
                                    "choice2": "Water flowed.", "question": "effect", "label": 1})
    # The harness drops the premise's last character, and its " " delimiter precedes " " + choice.
    assert copa.requests[1] == Request("The man turned on the faucet therefore", "  water flowed.")
    boolq = get_task("boolq").build({"passage": "P.", "question": "is it", "label": 1})
    assert boolq.requests == (Request("P.\nQuestion: is it?\nAnswer:", " no"), Request("P.\nQuestion: is it?\nAnswer:", " yes"))
    assert get_task("lambada").build({"text": "a b c"}).requests == (Request("a b", " c"),)


def test_a_missing_data_file_names_the_path_and_how_to_get_it(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("{}\n")
    with pytest.raises(DataError) as error:
        get_task("piqa").examples(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "piqa" / "valid-labels.lst") in message and "official PIQA dev set" in message
    assert "omit --data-dir to read baber/piqa from the Hugging Face hub" in message


def test_without_local_files_or_hub_eval_says_where_to_put_the_files(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variables once, at import: set where they keep them too (another test may
    # have imported them first), else they try the network and wait for its timeouts (20 s here).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(DataError) as error:
        get_task("copa").examples(None)
    message = str(error.value)
    assert "\n" not in message and "cannot read aps/super_glue from the Hugging Face hub" in message
    assert "put llmfoundry_icl/copa.jsonl" in message and "pass --data-dir FOLDER" in message


@needs_shared_data
def test_shared_eval_files_load_with_the_documented_sizes_and_harness_prompts():
    sizes = {"hellaswag": 1000, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "boolq": 3270,
             "winogrande": 1267, "openbookqa": 500, "lambada": 5153, "copa": 100}
    examples = {name: get_task(name).examples(SHARED_EVAL) for name in ALL_TASKS}
    assert {name: len(value) for name, value in examples.items()} == sizes
    first = examples["copa"][0].requests
    assert first[0] == Request("The man turned on the faucet therefore", "  the toilet filled with water.")
    assert examples["boolq"][0].requests[0].context.startswith("All biomass goes through")
    assert examples["boolq"][0].requests[0].context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert examples["winogrande"][0].requests[0] == Request(
        "Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases.")
    assert examples["hellaswag"][0].requests[0].context == (
        "Pole vault: Pole vault is a sport where you run with a pole and stop and swing your body. A few women")
    assert examples["arc_easy"][0].requests[0].context.startswith("Question: Which statement best explains")
    assert examples["lambada"][0].requests[0].continuation == " signs"
