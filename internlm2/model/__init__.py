"""InternLM2-family models: configuration and presets, the modules, HF checkpoint I/O, generation."""

from internlm2.model.config import PRESETS, ConfigError, ModelConfig, preset_config
from internlm2.model.generation import GenerationResult, SamplingParams, generate
from internlm2.model.kv_cache import KVCache
from internlm2.model.loss import causal_lm_loss
from internlm2.model.heads import BackboneOutput, LMHead, ScalarHead
from internlm2.model.model import CausalLMOutput, InternLM2ForCausalLM, InternLM2ForScore, InternLM2Model
from internlm2.model.pretrained import convert_checkpoint, load_into, load_pretrained, save_pretrained

__all__ = [
    "PRESETS", "BackboneOutput", "CausalLMOutput", "ConfigError", "GenerationResult", "InternLM2ForCausalLM",
    "InternLM2ForScore", "InternLM2Model", "KVCache", "LMHead", "ModelConfig", "SamplingParams", "ScalarHead",
    "causal_lm_loss", "convert_checkpoint", "generate", "load_into", "load_pretrained", "preset_config",
    "save_pretrained",
]
