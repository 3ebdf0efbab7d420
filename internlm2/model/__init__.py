"""InternLM2-family models: configuration and presets, the modules, HF checkpoint I/O, generation."""

from internlm2.model.config import PRESETS, ConfigError, ModelConfig, preset_config
from internlm2.model.model import CausalLMOutput, InternLM2ForCausalLM

__all__ = ["PRESETS", "CausalLMOutput", "ConfigError", "InternLM2ForCausalLM", "ModelConfig", "preset_config"]
