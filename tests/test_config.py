import pytest

from polycom_lm.config import Config, load_config, parse_override
from polycom_lm.errors import ConfigError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_base_files_merge_in_order_and_later_wins(tmp_path):
    write(tmp_path, "a.yaml", "model:\n  d_model: 64\n  n_layers: 2\n")
    write(tmp_path, "b.yaml", "model:\n  n_layers: 3\n  activation: gelu\n")
    top = write(tmp_path, "top.yaml", "base: [a.yaml, b.yaml]\nmodel:\n  activation: polynorm\n")
    config = load_config(top)
    assert isinstance(config, Config)
    assert (config.model.d_model, config.model.n_layers, config.model.activation) == (64, 3, "polynorm")


def test_dotted_overrides_are_typed(tmp_path):
    top = write(tmp_path, "top.yaml", "training:\n  max_steps: 5\n")
    config = load_config(top, ["training.max_steps=7", "optimizer.lr=3e-4", "model.activation=polyrelu"])
    assert config.training.max_steps == 7
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.model.activation == "polyrelu"


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    top = write(tmp_path, "top.yaml", "model:\n  actvation: relu\n")
    with pytest.raises(ConfigError) as error:
        load_config(top)
    message = str(error.value)
    assert "model.actvation" in message and str(top) in message and "'activation'" in message
    assert "\n" not in message


def test_wrong_type_names_key_expected_type_and_value(tmp_path):
    top = write(tmp_path, "top.yaml", "training:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=r"training.max_steps.*expected int.*'many'"):
        load_config(top)


def test_literal_values_are_checked(tmp_path):
    top = write(tmp_path, "top.yaml", "training:\n  precision: fp8\n")
    with pytest.raises(ConfigError, match="'fp32' \\| 'bf16'"):
        load_config(top)


def test_missing_file_and_base_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path, "x.yaml", "base: y.yaml\n")
    write(tmp_path, "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "x.yaml")


def test_override_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("model.activation")
    with pytest.raises(ConfigError, match="unknown key 'model.nope'.*command-line override"):
        from polycom_lm.config import config_from_dict

        config_from_dict({}, ["model.nope=1"])


def test_yaml_is_loaded_safely(tmp_path):
    top = write(tmp_path, "top.yaml", "experiment: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(top)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(write(tmp_path, "t.yaml", "model:\n  activation: polynorm\n"))
    again = load_config(write(tmp_path, "resolved.yaml", config.to_yaml()))
    assert again == config
