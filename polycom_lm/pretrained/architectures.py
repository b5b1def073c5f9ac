"""The transformers architectures a model exports to, in one registry keyed by the architecture name that
`config.json` records (`architectures[0]`).

Export picks the first of Llama (dense SwiGLU) and OLMoE (MoE SwiGLU) that can express the model exactly
and falls back to `PolycomForCausalLM`, our own architecture shipped as remote code, which expresses every
model we train. Loading an exported folder looks the architecture up by name. Each architecture is one
class over the converters in `polycom_lm.models.hf_*`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from polycom_lm.config import ModelConfig
from polycom_lm.errors import CheckpointError, ConfigError
from polycom_lm.models.hf_interop import (
    hf_llama_config,
    hf_llama_state_dict_to_ours,
    model_config_from_hf_llama,
    our_state_dict_to_hf_llama,
)
from polycom_lm.models.hf_olmoe import (
    hf_olmoe_config,
    hf_olmoe_state_dict_to_ours,
    model_config_from_hf_olmoe,
    our_state_dict_to_hf_olmoe,
)
from polycom_lm.models.hf_polycom import (
    model_config_from_polycom,
    our_state_dict_to_polycom,
    polycom_config_fields,
    polycom_state_dict_to_ours,
)
from polycom_lm.registry import Registry

HF_ARCHITECTURES = Registry("transformers architecture")
REMOTE_CODE_DIR = Path(__file__).resolve().parent / "remote"


class HFArchitecture:
    """How one transformers architecture maps to our models."""

    name: str
    remote_files: tuple[str, ...] = ()  # files copied next to the weights (trust_remote_code)

    def accepts(self, model_config: ModelConfig) -> bool:
        try:
            self.config_dict(model_config)
        except ConfigError:
            return False
        return True

    def config_dict(self, model_config: ModelConfig) -> dict[str, Any]:
        """config.json content (without token ids and dtype); ConfigError if the model does not fit."""
        raise NotImplementedError

    def model_config(self, config_json: dict[str, Any]) -> ModelConfig:
        raise NotImplementedError

    def to_hf(self, state: dict[str, torch.Tensor], model_config: ModelConfig) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def from_hf(self, hf_state: dict[str, torch.Tensor], model_config: ModelConfig) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _transformers_dict(hf_config: Any, name: str) -> dict[str, Any]:
    fields = hf_config.to_dict()
    fields["architectures"] = [name]
    return fields


def _transformers_config(config_json: dict[str, Any], config_class: Any) -> Any:
    fields = {key: value for key, value in config_json.items() if key not in ("architectures", "auto_map")}
    return config_class(**fields)


@HF_ARCHITECTURES.register("LlamaForCausalLM")
class Llama(HFArchitecture):
    name = "LlamaForCausalLM"

    def config_dict(self, model_config):
        return _transformers_dict(hf_llama_config(model_config), self.name)

    def model_config(self, config_json):
        from transformers import LlamaConfig

        return model_config_from_hf_llama(_transformers_config(config_json, LlamaConfig))

    def to_hf(self, state, model_config):
        return our_state_dict_to_hf_llama(state, model_config.n_layers, model_config.tie_embeddings)

    def from_hf(self, hf_state, model_config):
        return hf_llama_state_dict_to_ours(hf_state, model_config.n_layers, model_config.tie_embeddings)


@HF_ARCHITECTURES.register("OlmoeForCausalLM")
class Olmoe(HFArchitecture):
    name = "OlmoeForCausalLM"

    def config_dict(self, model_config):
        return _transformers_dict(hf_olmoe_config(model_config), self.name)

    def model_config(self, config_json):
        from transformers import OlmoeConfig

        return model_config_from_hf_olmoe(_transformers_config(config_json, OlmoeConfig))

    def to_hf(self, state, model_config):
        return our_state_dict_to_hf_olmoe(state, model_config.n_layers, model_config.tie_embeddings)

    def from_hf(self, hf_state, model_config):
        return hf_olmoe_state_dict_to_ours(hf_state, model_config.n_layers, model_config.tie_embeddings)


@HF_ARCHITECTURES.register("PolycomForCausalLM")
class Polycom(HFArchitecture):
    name = "PolycomForCausalLM"
    remote_files = ("configuration_polycom.py", "modeling_polycom.py")

    def config_dict(self, model_config):
        return {
            "architectures": [self.name],
            "model_type": "polycom",
            "auto_map": {
                "AutoConfig": "configuration_polycom.PolycomConfig",
                "AutoModelForCausalLM": "modeling_polycom.PolycomForCausalLM",
            },
            **polycom_config_fields(model_config),
        }

    def model_config(self, config_json):
        return model_config_from_polycom(config_json)

    def to_hf(self, state, model_config):
        return our_state_dict_to_polycom(state, model_config)

    def from_hf(self, hf_state, model_config):
        return polycom_state_dict_to_ours(hf_state, model_config)


# Tried in this order on export; Polycom takes everything the others refuse.
EXPORT_ORDER = ("LlamaForCausalLM", "OlmoeForCausalLM", "PolycomForCausalLM")


def architecture_for(model_config: ModelConfig) -> HFArchitecture:
    """The architecture `model_config` exports to (see the module docstring)."""
    for name in EXPORT_ORDER:
        architecture = HF_ARCHITECTURES.get(name)()
        if architecture.accepts(model_config):
            return architecture
    # Nothing accepts it: let Polycom's own check say why.
    HF_ARCHITECTURES.get("PolycomForCausalLM")().config_dict(model_config)
    raise AssertionError("unreachable")


def architecture_named(name: Any, culprit: Path) -> HFArchitecture:
    if name not in HF_ARCHITECTURES:
        raise CheckpointError(
            f"{culprit}: architecture {name!r} is not one polycom_lm reads; readable: {', '.join(sorted(HF_ARCHITECTURES))}"
        )
    return HF_ARCHITECTURES[name]()
