"""InternLM2-family models: configuration and presets, the modules, HF checkpoint I/O, generation."""

from internlm2.model.config import PRESETS, ConfigError, ModelConfig, preset_config
from internlm2.model.generation import GenerationResult, SamplingParams, generate
from internlm2.model.kv_cache import KVCache
from internlm2.model.loss import causal_lm_loss
from internlm2.model.model import CausalLMOutput, InternLM2ForCausalLM
from internlm2.model.pretrained import convert_checkpoint, load_into, load_pretrained, save_pretrained

__all__ = [
    "PRESETS", "CausalLMOutput", "ConfigError", "GenerationResult", "InternLM2ForCausalLM", "KVCache", "ModelConfig",
    "SamplingParams", "causal_lm_loss", "convert_checkpoint", "generate", "load_into", "load_pretrained", "preset_config",
    "save_pretrained",
]
