"""ModelConfig: the paper's presets (sizes and parameter counts), validation that names fields, YAML and
HF config.json mapping."""

import pytest

from internlm2.model import PRESETS, ConfigError, InternLM2ForCausalLM, ModelConfig, preset_config
from internlm2.model.hf_config import config_from_hf, config_to_hf

# Parameter counts from the shapes with untied embeddings (reference/internlm2_paper.md §1.2).
PAPER_PARAMETERS = {"internlm2-1_8b": 1.889e9, "internlm2-7b": 7.738e9, "internlm2-20b": 19.861e9}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS))
def test_preset_parameter_counts_match_the_paper(name):
    config = preset_config(name)
    model = InternLM2ForCausalLM(config, device="meta")  # no memory
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMETERS[name]) / PAPER_PARAMETERS[name] < 1e-3, count
    assert all(p.device.type == "meta" for p in model.parameters())
    wqkv = model.model.layers["0"].attention.wqkv.weight
    assert wqkv.shape == ((config.num_attention_heads + 2 * 8) * 128, config.hidden_size)


def test_presets_have_the_papers_shapes():
    shapes = {n: (c["num_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
                  c["intermediate_size"]) for n, c in PRESETS.items()}
    assert shapes["internlm2-1_8b"] == (24, 2048, 16, 8, 8192)
    assert shapes["internlm2-7b"] == (32, 4096, 32, 8, 14336)
    assert shapes["internlm2-20b"] == (48, 6144, 48, 8, 16384)
    for name in PAPER_PARAMETERS:
        config = preset_config(name)
        assert (config.head_size, config.vocab_size, config.rope_theta, config.rope_scaling_factor,
                config.rms_norm_eps) == (128, 92544, 1e6, 2.0, 1e-5)


@pytest.mark.parametrize("changes, pattern", [
    (dict(num_key_value_heads=3), r"num_attention_heads \(8\) must be divisible by num_key_value_heads \(3\)"),
    (dict(hidden_size=60), r"hidden_size \(60\) must be divisible by num_attention_heads \(8\)"),
    (dict(head_dim=7), r"head_dim \(7\) must be even"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(rope_scaling_factor=0.5), "rope_scaling_factor"),
    (dict(kernels="triton"), "kernels must be one of"),
    (dict(eos_token_id=600), r"eos_token_id must be null or a token id in \[0, vocab_size=512\)"),
])
def test_invalid_configs_are_rejected_naming_the_fields(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        preset_config("internlm2-tiny", **changes)


def test_from_dict_and_yaml(tmp_path):
    config = ModelConfig.from_dict({"preset": "internlm2-7b", "num_layers": 2, "kernels": "reference"})
    assert (config.num_layers, config.hidden_size) == (2, 4096)
    with pytest.raises(ConfigError, match="unknown model config key\\(s\\): num_layer"):
        ModelConfig.from_dict({"preset": "internlm2-7b", "num_layer": 2})
    with pytest.raises(ConfigError, match="missing required key\\(s\\): intermediate_size"):
        ModelConfig.from_dict({k: v for k, v in PRESETS["internlm2-tiny"].items() if k != "intermediate_size"})
    with pytest.raises(ConfigError, match="unknown model preset 'internlm2-3b'"):
        preset_config("internlm2-3b")
    (tmp_path / "m.yaml").write_text("preset: internlm2-tiny\nhidden_size: 128\n")
    assert ModelConfig.from_yaml(tmp_path / "m.yaml") == preset_config("internlm2-tiny", hidden_size=128)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_hf_config_round_trip_in_both_formats():
    config = preset_config("internlm2-7b")
    for fmt in ("internlm2", "llama"):
        hf = config_to_hf(config, fmt, torch_dtype="bfloat16")
        assert hf["model_type"] == fmt and hf["rope_scaling"]["factor"] == 2.0
        again, found = config_from_hf(hf)
        assert again == config and found == fmt
    assert "head_dim" not in config_to_hf(config, "internlm2", "bfloat16")  # InternLM2 derives it


def test_transformers_5_rope_parameters_are_read():
    hf = config_to_hf(preset_config("internlm2-tiny"), "llama", "float32")
    del hf["rope_theta"], hf["rope_scaling"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    config, _ = config_from_hf(hf)
    assert config.rope_theta == 5e5 and config.rope_scaling_factor is None
