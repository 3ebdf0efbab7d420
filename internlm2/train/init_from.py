"""Where a run's first weights come from (`init_from`): an HF checkpoint directory, or a training
checkpoint of another run (`run_dir/checkpoints/step_N`, saved under any layout).

The source also gives the model: with `init_from`, the run's model configuration is the source's (an HF
config.json, or the unit's live config in a checkpoint: its vocabulary, its last stage's RoPE base), and
the keys of the config's `model` section change fields of it (a `preset` there is ignored: the source gives
every field). And it gives the tokenizer when the run names none: the HF directory's `tokenizer.model`,
or the tokenizer the checkpoint's run trained with. From a checkpoint only the unit's weights are taken,
never its optimizer state or its loop position: the new run starts at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from internlm2.errors import ConfigError
from internlm2.model import ModelConfig
from internlm2.model.hf_config import read_hf_config
from internlm2.train import checkpoint as ckpt

@dataclass(frozen=True)
class InitSource:
    path: Path
    is_checkpoint: bool  # a training checkpoint (else an HF directory)
    model: ModelConfig
    tokenizer: Path | None  # the tokenizer that goes with the weights, when the source says

    def model_config(self, changes: dict) -> ModelConfig:
        """The source's model with the fields of `changes` (a config's `model` section) changed."""
        try:
            return ModelConfig.from_dict({**self.model.to_dict(), **{k: v for k, v in changes.items()
                                                                      if k != "preset"}})
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None


def init_source(path: str | Path) -> InitSource:
    """What `init_from` names, read without loading any weights; `ConfigError` if it is neither kind."""
    path = Path(path)
    if (path / "config.json").is_file():
        config, _, _ = read_hf_config(path)
        return InitSource(path, False, config, path if (path / "tokenizer.model").is_file() else None)
    if (path / ckpt.STATE_FILE).is_file():
        kind, config = ckpt.unit_config(path, ckpt.MODEL_UNIT)
        if kind != "causal_lm":
            raise ConfigError(f"init_from: {path} holds a {kind} model; this stage starts from a causal LM")
        return InitSource(path, True, config, _checkpoint_tokenizer(path))
    raise ConfigError(f"init_from: {path} is neither an HF checkpoint directory (config.json) nor a training "
                      f"checkpoint ({ckpt.STATE_FILE}, e.g. run_dir/checkpoints/step_N)")


def _checkpoint_tokenizer(checkpoint: Path) -> Path | None:
    """The tokenizer of the run that wrote `checkpoint`, from the run config saved in it."""
    try:
        run = yaml.safe_load((checkpoint / "config.yaml").read_text())
        data = run.get("data") or {}
        path = Path(data["tokenizer"]) if data.get("tokenizer") else Path(run["run_dir"]) / "data" / "tokenizer"
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return None
    return path if (path / "tokenizer.model").is_file() or path.is_file() else None
