"""`polycom-lm eval` and `polycom-lm export` on a trained run: the run folder, its checkpoint folder and its
export give the same results; bad input is one line, exit 2, and nothing half-written."""

from __future__ import annotations

import json
import shutil

import pytest

from eval_helpers import ALL_TASKS
from polycom_lm.cli import main


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_cli(capsys):
    """`polycom-lm ARGS` in this process (seconds faster than a subprocess)."""

    def run(*arguments, check=True):
        code = main(["--log-level", "WARNING", *arguments])
        captured = capsys.readouterr()
        if check:
            assert code == 0, captured.err
        return Result(code, captured.out, captured.err)

    return run


def evaluate_cli(run_cli, model, eval_data, out, *extra):
    process = run_cli("eval", str(model), "--tasks", ",".join(ALL_TASKS), "--data-dir", str(eval_data),
                      "--limit", "5", "--batch-size", "7", "--device", "cpu", "--out", str(out), *extra)
    return process, json.loads(out.read_text())


def test_run_checkpoint_and_export_give_the_same_results(run_cli, tiny_run, tiny_export, eval_data, tmp_path):
    process, from_run = evaluate_cli(run_cli, tiny_run, eval_data, tmp_path / "run.json")
    assert "hellaswag" in process.stdout and "acc_norm" in process.stdout and "perplexity" in process.stdout
    _, from_checkpoint = evaluate_cli(run_cli, tiny_run / "checkpoints" / "step_2", eval_data, tmp_path / "checkpoint.json")
    _, from_export = evaluate_cli(run_cli, tiny_export, eval_data, tmp_path / "export.json", "--no-context-sharing")
    assert from_run["step"] == from_checkpoint["step"] == from_export["step"] == 2
    assert from_run["tokens"] == from_export["tokens"] == 2 * 8 * 32
    assert set(from_run["results"]) == set(ALL_TASKS)
    for task, metrics in from_run["results"].items():
        assert metrics["examples"] == 5
        for other in (from_checkpoint, from_export):
            assert other["results"][task].keys() == metrics.keys()
            for key, value in metrics.items():
                assert other["results"][task][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, key)


def test_export_command_writes_a_folder_and_refuses_to_overwrite(run_cli, tiny_run, tmp_path):
    out = tmp_path / "exported"
    process = run_cli("export", str(tiny_run), "--out", str(out), "--dtype", "bf16")
    assert "PolycomForCausalLM" in process.stdout and (out / "modeling_polycom.py").is_file()
    before = sorted(path.name for path in out.iterdir())
    refused = run_cli("export", str(tiny_run), "--out", str(out), check=False)
    assert refused.returncode == 2 and refused.stderr.strip() == f"error: --out {out} exists and is not empty; pass --force to replace it"
    assert sorted(path.name for path in out.iterdir()) == before
    run_cli("export", str(tiny_run), "--out", str(out), "--force")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def one_line_error(process) -> str:
    assert process.returncode == 2, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), process.stderr
    return lines[0]


def test_bad_inputs_are_one_line_errors_and_write_nothing(run_cli, tiny_run, eval_data, tmp_path):
    out = tmp_path / "results.json"
    common = ["--data-dir", str(eval_data), "--out", str(out), "--device", "cpu"]
    message = one_line_error(run_cli("eval", str(tiny_run), "--tasks", "piqa", "--limit", "0", *common, check=False))
    assert "--limit must be at least 1" in message
    message = one_line_error(run_cli("eval", str(tiny_run), "--tasks", "piqa,hellaswog", *common, check=False))
    assert "unknown task 'hellaswog'" in message and "registered: arc_challenge, arc_easy, boolq" in message
    message = one_line_error(run_cli("eval", str(tmp_path), "--tasks", "piqa", *common, check=False))
    assert f"{tmp_path} is not a model" in message
    empty_data = tmp_path / "no_data"
    empty_data.mkdir()
    message = one_line_error(run_cli("eval", str(tiny_run), "--tasks", "piqa", "--data-dir", str(empty_data),
                                     "--out", str(out), check=False))
    assert str(empty_data / "piqa" / "valid.jsonl") in message
    # A checkpoint that does not match its run's config.
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_run, mismatched, ignore=shutil.ignore_patterns("wandb", "metrics.jsonl"))
    config = (mismatched / "config.yaml").read_text().replace("d_model: 64", "d_model: 96")
    (mismatched / "config.yaml").write_text(config)
    message = one_line_error(run_cli("eval", str(mismatched), "--tasks", "piqa", *common, check=False))
    assert "does not match the model of" in message and "wrong shape" in message
    message = one_line_error(run_cli("export", str(mismatched), "--out", str(tmp_path / "export"), check=False))
    assert "does not match the model of" in message
    assert not out.exists() and not (tmp_path / "export").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]
    message = one_line_error(run_cli("eval", str(tiny_run), "--tasks", "piqa", "--step", "7", *common, check=False))
    assert "no checkpoint for step 7; available steps: 2" in message
    # A run whose tokenizer was trained into a cache this folder does not have, and that holds no copy of it
    # (runs keep one in tokenizer/ since it was added; older runs do not).
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_run, elsewhere, ignore=shutil.ignore_patterns("wandb", "metrics.jsonl", "tokenizer"))
    import yaml
    config = yaml.safe_load((elsewhere / "config.yaml").read_text())
    (tmp_path / "corpus.txt").write_text("some text\n")
    config["data"]["train"] = [{"source": str(tmp_path / "corpus.txt"), "weight": 1.0}]
    config["data"]["validation"] = []
    config["data"]["tokenizer"]["path"] = None
    config["data"]["cache_dir"] = str(tmp_path / "no_cache")
    (elsewhere / "config.yaml").write_text(yaml.safe_dump(config))
    message = one_line_error(run_cli("eval", str(elsewhere), "--tasks", "piqa", *common, check=False))
    assert f"cannot find the tokenizer of {elsewhere}" in message and "pass --tokenizer DIR" in message


def test_harness_tasks_are_written_for_the_same_rows(run_cli, tiny_export, eval_data, tmp_path):
    pytest.importorskip("lm_eval")
    process = run_cli("eval", str(tiny_export), "--tasks", "piqa,copa", "--data-dir", str(eval_data), "--limit", "3",
                      "--device", "cpu", "--harness-tasks", str(tmp_path / "harness"))
    assert f"--include_path {tmp_path / 'harness'} --tasks polycom_piqa,polycom_copa" in process.stdout
    import yaml
    config = yaml.safe_load((tmp_path / "harness" / "copa.yaml").read_text())
    assert config["include"].endswith("lm_eval/tasks/super_glue/copa/default.yaml") and config["task"] == "polycom_copa"
    assert len((tmp_path / "harness" / "piqa.jsonl").read_text().splitlines()) == 3
