"""Session fixtures of the evaluation tests: synthetic task files, a tiny trained run and its export."""

from __future__ import annotations

import pytest

from eval_helpers import train_tiny_run, write_eval_data


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory):
    return write_eval_data(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="session")
def tiny_run(prepared_data, tmp_path_factory):
    return train_tiny_run(prepared_data, tmp_path_factory.mktemp("runs") / "polynorm")


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory):
    from polycom_lm.pretrained.export import export_model
    from polycom_lm.pretrained.loading import load_model

    out = tmp_path_factory.mktemp("exports") / "polynorm"
    export_model(load_model(tiny_run), out)
    return out
