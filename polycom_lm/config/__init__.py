"""Experiment configuration: the typed schema (`schema.py`), reading YAML files with `base:` chains and
dotted overrides (`loading.py`), and key / type checking on conversion (`conversion.py`)."""

from polycom_lm.config.conversion import from_dict
from polycom_lm.config.loading import OVERRIDE_ORIGIN, config_from_dict, load_config, parse_override
from polycom_lm.config.schema import (
    Config,
    DataConfig,
    DataSourceConfig,
    DistributedConfig,
    DownstreamEvaluationConfig,
    EvaluationConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    ScheduleConfig,
    TokenizerConfig,
    TrainingConfig,
    ValidationSetConfig,
)

__all__ = [
    "Config", "DataConfig", "DataSourceConfig", "DistributedConfig", "DownstreamEvaluationConfig", "EvaluationConfig", "LoggingConfig",
    "ModelConfig", "MoEConfig", "OptimizerConfig", "ScheduleConfig", "TokenizerConfig", "TrainingConfig",
    "ValidationSetConfig", "OVERRIDE_ORIGIN", "config_from_dict", "from_dict", "load_config", "parse_override",
]
