"""`config.json` of HF checkpoints, InternLM2 and Llama flavours, to and from `ModelConfig`.

Reading is strict where it matters: a field that would change the model's math (biases, tied embeddings,
another activation or RoPE scaling type) is either mapped or rejected by name, so a checkpoint never loads
into a model that silently computes something else. Fields that only concern HF's runtime (attention
backend, output flags, label maps) are ignored; anything else unknown is named in the error.
"""

from __future__ import annotations

import json
from pathlib import Path

from internlm2.model.config import ConfigError, ModelConfig

FORMATS = ("internlm2", "llama")

# ours -> HF, shared by both formats
_COMMON_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "initializer_range": "initializer_range",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "reward_token_id": "reward_token_id",
}

_REQUIRED_HF = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# HF runtime and bookkeeping fields with no effect on the model's math.
_IGNORED = {
    "architectures", "model_type", "auto_map", "transformers_version", "use_cache", "torch_dtype", "dtype",
    "attn_implementation", "_attn_implementation", "_name_or_path", "name_or_path", "return_dict",
    "output_attentions", "output_hidden_states", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "pretraining_tp", "tokenizer_class", "torchscript", "use_return_dict", "num_labels",
    "tf_legacy_loss", "use_bfloat16", "pruned_heads", "cross_attention_hidden_size",
    "add_cross_attention", "is_decoder", "tie_encoder_decoder", "finetuning_task", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params",
}

# HF fields whose only supported value is the one InternLM2 uses (anything else changes the math).
_REQUIRED_VALUES = {
    "hidden_act": ("silu",),
    "bias": (False,),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "tie_word_embeddings": (False,),
    "attention_dropout": (0, 0.0),
}


def _rope_from_hf(hf: dict, where: str) -> tuple[float, float | None]:
    """(rope_theta, dynamic NTK factor or None) from legacy `rope_theta` + `rope_scaling` or from
    transformers 5's `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10_000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), None
    if kind != "dynamic":
        raise ConfigError(f"{where}: rope scaling type {kind!r} is not supported (only 'dynamic' NTK or none)")
    if "factor" not in scaling:
        raise ConfigError(f"{where}: dynamic rope scaling needs a 'factor'")
    return float(theta), float(scaling["factor"])


def config_from_hf(hf: dict, where: str = "config.json", **overrides) -> tuple[ModelConfig, str]:
    """(ModelConfig, format) from a parsed HF config.json; `where` names the file in errors."""
    model_type = hf.get("model_type")
    if model_type not in FORMATS:
        raise ConfigError(f"{where}: model_type {model_type!r} is not one of {FORMATS}")
    for key, allowed in _REQUIRED_VALUES.items():
        if key in hf and hf[key] not in allowed:
            raise ConfigError(f"{where}: {key}={hf[key]!r} is not supported (InternLM2 models use {allowed[0]!r})")
    known = set(_COMMON_FIELDS.values()) | _IGNORED | set(_REQUIRED_VALUES) | {
        "rope_theta", "rope_scaling", "rope_parameters", "head_dim",
    }
    unknown = sorted(set(hf) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown config key(s): {', '.join(unknown)}")
    missing = [key for key in _REQUIRED_HF if key not in hf]
    if missing:
        raise ConfigError(f"{where}: missing key(s): {', '.join(missing)}")
    values = {ours: hf[theirs] for ours, theirs in _COMMON_FIELDS.items() if theirs in hf}
    values.setdefault("num_key_value_heads", hf["num_attention_heads"])  # HF: absent means multi-head attention
    # InternLM2 configs have no head_dim; its modeling code derives hidden_size // num_attention_heads.
    head_dim = hf.get("head_dim")
    if model_type == "llama" and head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        values["head_dim"] = head_dim  # kept only where it is not the derived hidden_size // heads
    elif model_type == "internlm2" and "head_dim" in hf:
        raise ConfigError(f"{where}: InternLM2 configs have no head_dim field (it is hidden_size // num_attention_heads)")
    values["rope_theta"], values["rope_scaling_factor"] = _rope_from_hf(hf, where)
    values.update(overrides)
    try:
        return ModelConfig(**values), model_type
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err


# The heads a checkpoint can carry, by the `architectures` entry of its config.json: a language-model head
# (`output` / Llama's `lm_head`) or InternLM2's reward-model head (`v_head`, scored at reward_token_id).
HEAD_KINDS = {"InternLM2ForCausalLM": "causal_lm", "LlamaForCausalLM": "causal_lm",
              "InternLM2ForRewardModel": "score"}
_ARCHITECTURES = {("internlm2", "causal_lm"): "InternLM2ForCausalLM", ("llama", "causal_lm"): "LlamaForCausalLM",
                  ("internlm2", "score"): "InternLM2ForRewardModel"}

# InternLM2's released checkpoints name their remote code (configuration_internlm2.py and
# modeling_internlm2.py, loaded with `trust_remote_code=True`) in `auto_map`; so do our exports. The
# reward models map AutoModel to their reward class.
INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}


def head_kind(hf: dict, where: str = "config.json") -> str:
    """"causal_lm" or "score", from a parsed config.json's `architectures` (absent: a causal LM)."""
    architectures = hf.get("architectures") or ["InternLM2ForCausalLM"]
    kind = HEAD_KINDS.get(architectures[0])
    if kind is None:
        raise ConfigError(f"{where}: architecture {architectures[0]!r} is not one of {sorted(HEAD_KINDS)}")
    return kind


def config_to_hf(config: ModelConfig, fmt: str, torch_dtype: str, kind: str = "causal_lm") -> dict:
    """The config.json of `config` in format `fmt`: "internlm2" as InternLM2's released checkpoints write
    it (what their remote code reads), or "llama" for transformers' LlamaForCausalLM. `kind` "score" is
    InternLM2's reward-model layout (InternLM2ForRewardModel, with reward_token_id)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {fmt!r}")
    if (fmt, kind) not in _ARCHITECTURES:
        raise ConfigError(f"a {kind} model has no {fmt} layout (reward models are written in the internlm2 layout)")
    if kind == "score" and config.reward_token_id is None:
        raise ConfigError("a reward model's config needs reward_token_id (the token whose hidden state is scored)")
    factor = config.rope_scaling_factor
    hf: dict = {
        "architectures": [_ARCHITECTURES[fmt, kind]],
        "model_type": fmt,
        **{theirs: getattr(config, ours) for ours, theirs in _COMMON_FIELDS.items()
           if ours != "reward_token_id" or kind == "score"},
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rope_theta": config.rope_theta,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if fmt == "internlm2":
        if config.head_size * config.num_attention_heads != config.hidden_size:
            raise ConfigError(
                f"the InternLM2 format needs head_dim ({config.head_size}) x num_attention_heads "
                f"({config.num_attention_heads}) == hidden_size ({config.hidden_size}); save as 'llama' instead"
            )
        # InternLM2Config accepts rope_scaling only as exactly {type, factor} with a float factor, and its
        # attention reads pretraining_tp (1: plain matmuls) and attn_implementation.
        auto_map = dict(INTERNLM2_AUTO_MAP)
        if kind == "score":
            auto_map["AutoModel"] = "modeling_internlm2.InternLM2ForRewardModel"
        hf.update(auto_map=auto_map, bias=False, pretraining_tp=1, attn_implementation="eager",
                  rope_scaling=None if factor is None else {"type": "dynamic", "factor": float(factor)})
    else:
        # Both spellings of the scaling type: older transformers read "type", newer ones "rope_type".
        hf.update(head_dim=config.head_size, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                  rope_scaling=None if factor is None else {"type": "dynamic", "rope_type": "dynamic", "factor": factor})
    return hf


def read_hf_json(directory: Path) -> dict:
    """The parsed config.json of the checkpoint directory `directory`."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an HF checkpoint directory")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return hf


def read_hf_config(directory: Path, **overrides) -> tuple[ModelConfig, str, str | None]:
    """(config, format, torch_dtype string or None) of the checkpoint directory `directory`."""
    hf = read_hf_json(directory)
    config, fmt = config_from_hf(hf, where=str(Path(directory) / "config.json"), **overrides)
    return config, fmt, hf.get("torch_dtype", hf.get("dtype"))


def read_head_kind(directory: Path) -> str:
    """"causal_lm" or "score" for the checkpoint directory `directory`."""
    return head_kind(read_hf_json(directory), str(Path(directory) / "config.json"))
