"""The shipped configs load, validate and say what they claim."""

from pathlib import Path

import pytest
import torch

from internlm2.config import ConfigError, load_config
from internlm2.model.config import ModelConfig
from internlm2.ops.flash_attention import cuda_kernel_gap
from internlm2.train.config import TrainConfig
from internlm2.train.sft import SFTConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_internlm2_7b_pretrain_has_the_papers_curriculum():
    cfg = load_config(TrainConfig, CONFIGS / "internlm2-7b-pretrain.yaml")
    short, long, enhance = cfg.stages
    assert (short.seq_len, short.rope_theta) == (4096, 50_000)
    assert (long.seq_len, long.rope_theta) == (32768, 1_000_000)
    total = cfg.total_steps
    assert 0.89 < short.steps / total < 0.91 and 0.08 < long.steps / total < 0.10
    for stage in (short, long):  # 4M-token batches
        assert stage.seq_len * stage.global_batch_size == 4 * 2**20
    assert enhance.lr.peak_lr < cfg.optim.lr
    tokens = sum(s.steps * s.seq_len * s.global_batch_size for s in cfg.stages)
    assert 2.0e12 < tokens < 2.6e12
    o = cfg.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.min_lr_ratio) == (3e-4, (0.9, 0.95), 1e-8, 0.1, 0.1)


def test_tiny_default_loads():
    cfg = load_config(TrainConfig, CONFIGS / "tiny.yaml")
    assert cfg.data.builtin is not None and len(cfg.stages) == 2


def test_sft_tiny_fine_tunes_the_tiny_default_with_pretraining_text_mixed_in():
    cfg = load_config(SFTConfig, CONFIGS / "sft-tiny.yaml")
    tiny = load_config(TrainConfig, CONFIGS / "tiny.yaml")
    assert cfg.init_from == f"{tiny.run_dir}/hf" and cfg.data.train[0].path == f"{tiny.run_dir}/data/train"
    assert cfg.data.tasks is not None and cfg.task_eval is not None
    assert cfg.stages[0].seq_len <= tiny.model["max_position_embeddings"]
    with pytest.raises(ConfigError, match="init_from: SFT starts from a model"):
        load_config(SFTConfig, CONFIGS / "sft-tiny.yaml", ["init_from=null"])
    assert load_config(SFTConfig, None, ["run_dir=r", "init_from=x", "stages=[{name: s, steps: 1, seq_len: 8, "
                                         "global_batch_size: 1}]", "data.tasks={}"]).optim.lr == 4e-5


def test_internlm2_7b_sft_has_the_reports_recipe():
    cfg = load_config(SFTConfig, CONFIGS / "internlm2-7b-sft.yaml")
    pretrain = load_config(TrainConfig, CONFIGS / "internlm2-7b-pretrain.yaml")
    assert cfg.init_from == f"{pretrain.run_dir}/hf" and cfg.optim.lr == 4e-5 and len(cfg.stages) == 1
    (stage,) = cfg.stages
    assert (stage.seq_len, stage.rope_theta) == (pretrain.stages[-1].seq_len, pretrain.stages[-1].rope_theta)
    assert stage.seq_len * stage.global_batch_size == 4 * 2**20
    assert 0.5 * 10e9 < stage.steps * 4 * 2**20 < 2 * 10e9  # one epoch of ~10M conversations of ~1k tokens
    assert len(cfg.data.train) == 2 and cfg.sft.train_on == "all"


@pytest.mark.parametrize("override, message", [
    ("stages.0.seq_len=0", r"stages\.0\.seq_len: must be >= 1"),
    ("model.hidden_sise=8", r"model: unknown model config key"),
    ("optim.warmup_steps=10000000", r"optim\.warmup_steps"),
    ("parallel.tpp=2", r"parallel\.tpp: unknown key \(did you mean tp"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, CONFIGS / "tiny.yaml", [override])


def test_gpu_check_config_takes_every_cuda_kernel():
    """scripts/gpu_check.sh's end-to-end run must exercise the fused CUDA kernels, not the reference fallback."""
    cfg = load_config(TrainConfig, CONFIGS / "gpu_check.yaml")
    model = ModelConfig.from_dict(cfg.model)
    assert model.kernels == "fused"
    assert cuda_kernel_gap(getattr(torch, cfg.dtype), model.head_size) is None
