"""`ModelConfig`: the shape of an InternLM2-family model, the paper's presets, and validation.

Field names are ours (short, one meaning each); `hf_config.py` maps them to and from the `config.json` field
names of HF InternLM2 and Llama checkpoints. Every check names the fields involved, so a bad YAML or a
bad `--set model.x=...` fails at load, before anything is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from internlm2.errors import ConfigError

KERNELS = ("fused", "reference")




@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    # None: hidden_size // num_attention_heads (InternLM2 checkpoints have no separate head_dim field).
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    # Dynamic NTK: beyond max_position_embeddings the RoPE base grows with the length (None: plain RoPE).
    rope_scaling_factor: float | None = 2.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 2
    # A reward model's score is its scalar head at this token, appended to every scored sequence
    # (InternLM2's released reward models: 92527, [UNUSED_TOKEN_130]); None for other models.
    reward_token_id: int | None = None
    # "fused": internlm2.ops kernels; "reference": their plain-PyTorch references (same results).
    kernels: str = "fused"

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes
    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_size(self) -> int:
        """Output rows of the fused wqkv: per KV group, its query heads then one key and one value head."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_size

    # ---- validation
    def validate(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) when head_dim is not given"
                )
        elif not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim <= 0:
            raise ConfigError(f"head_dim must be a positive integer or null, got {self.head_dim!r}")
        if self.head_size % 2:
            raise ConfigError(f"head_dim ({self.head_size}) must be even: RoPE rotates pairs of dimensions")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        factor = self.rope_scaling_factor
        if factor is not None and (not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1):
            raise ConfigError(f"rope_scaling_factor must be null or a number >= 1, got {factor!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "reward_token_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value < self.vocab_size):
                raise ConfigError(f"{name} must be null or a token id in [0, vocab_size={self.vocab_size}), got {value!r}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")

    # ---- (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """Builds a config from a mapping; `preset: NAME` starts from a preset that the other keys override.
        Unknown keys are rejected by name."""
        values = dict(values)
        preset = values.pop("preset", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if preset is not None:
            return dataclasses.replace(preset_config(preset), **values)
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name in _REQUIRED and f.name not in values)
        if missing:
            raise ConfigError(f"model config is missing required key(s): {', '.join(missing)} (or give `preset`)")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        import yaml

        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text())
        except OSError as err:
            raise ConfigError(f"cannot read model config {path}: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of model config keys, got {type(values).__name__}")
        return cls.from_dict(values)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_REQUIRED = {
    f.name for f in dataclasses.fields(ModelConfig)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
}

# The paper's sizes (Table 3; FFN widths from the released configs). Vocabulary 92544, head_dim 128.
_INTERNLM2 = dict(vocab_size=92544, max_position_embeddings=32768, rope_theta=1_000_000.0, rope_scaling_factor=2.0)
PRESETS: dict[str, dict] = {
    "internlm2-1_8b": dict(_INTERNLM2, hidden_size=2048, intermediate_size=8192, num_layers=24,
                           num_attention_heads=16, num_key_value_heads=8),
    "internlm2-7b": dict(_INTERNLM2, hidden_size=4096, intermediate_size=14336, num_layers=32,
                         num_attention_heads=32, num_key_value_heads=8),
    "internlm2-20b": dict(_INTERNLM2, hidden_size=6144, intermediate_size=16384, num_layers=48,
                          num_attention_heads=48, num_key_value_heads=8),
    # Tiny shapes for tests and CPU demos (GQA kept: 4 query heads per KV head). The demos override
    # vocab_size with their tokenizer's.
    "internlm2-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                           rope_theta=10_000.0),
    # The CPU benchmark shape: big enough that matmuls dominate, small enough for 2 cores.
    "internlm2-small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                            rope_theta=10_000.0),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
