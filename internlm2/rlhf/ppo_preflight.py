"""Everything about a PPO run that can be checked before any process group waits: the four models'
directories and kinds, the layout (refusing what the rollouts cannot serve), the batch arithmetic against
it, the prompts and their conditions, the hooks. A problem raises a `ConfigError` naming its key or file,
which the CLI prints as one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from internlm2.data import PromptDataset, Tokenizer
from internlm2.errors import ConfigError, UserError
from internlm2.model import ModelConfig
from internlm2.model.hf_config import read_hf_config, read_head_kind
from internlm2.parallel import ParallelConfig
from internlm2.rlhf.fast_path import load_function
from internlm2.rlhf.ppo_config import PPOConfig
from internlm2.rlhf.scorer import CONDITIONS_FILE, read_conditions
from internlm2.train.preflight import RunPlan, resolve_layout
from internlm2.train.runtime import launched_world_size


@dataclass(frozen=True)
class PPOPlan:
    layout: ParallelConfig
    actor: ModelConfig  # also the reference's
    critic: ModelConfig
    reward: ModelConfig
    conditions: dict[str, str]  # the reward model's domains -> system prompts
    generation_batch_size: int  # prompts per batched generation
    ptx_micro_batches: int  # per DP rank and actor step

    @property
    def model_shape(self) -> dict:
        return RunPlan.shape_of(self.actor)


def _model(directory: str | None, key: str, kind: str | None) -> ModelConfig:
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {directory} is not an HF model directory (no config.json)")
    try:
        config, _, _ = read_hf_config(path)
        found = read_head_kind(path)
    except UserError as err:
        raise ConfigError(f"{key}: {err}") from None
    if kind is not None and found != kind:
        what = {"causal_lm": "a causal language model (the SFT model)", "score": "a reward model"}[kind]
        raise ConfigError(f"{key}: {directory} holds a {found} model, expected {what}")
    return config


def check_layout_serves_rollouts(cfg: PPOConfig) -> None:
    """Rollouts generate with the KV cache on whole models, one new token per sequence per step."""
    p = cfg.parallel
    if p.pp > 1:
        raise ConfigError(f"parallel.pp={p.pp}: PPO's rollouts generate on the whole actor, and a pipeline "
                          "stage cannot generate on its own; use tp and dp")
    if p.cp > 1:
        raise ConfigError(f"parallel.cp={p.cp}: generation's KV cache does not split sequences over context-"
                          "parallel ranks; use tp and dp")
    if p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel: a decode step holds one token per sequence, which sequence "
                          "parallelism cannot split over TP ranks; turn it off")


def plan_ppo(cfg: PPOConfig, world_size: int | None = None) -> PPOPlan:
    world_size = launched_world_size() if world_size is None else world_size
    check_layout_serves_rollouts(cfg)
    actor = _model(cfg.actor, "actor", "causal_lm")
    reward = _model(cfg.reward_model, "reward_model", "score")
    if reward.reward_token_id is None:
        raise ConfigError(f"reward_model: {cfg.reward_model}/config.json has no reward_token_id")
    critic = _model(cfg.critic, "critic", None) if cfg.critic else reward
    layout = None
    for model in (actor, critic, reward):
        layout = resolve_layout(cfg, world_size, RunPlan.shape_of(model))
    tokenizer = Tokenizer.load(cfg.actor)
    if tokenizer.vocab_size > min(actor.vocab_size, reward.vocab_size):
        raise ConfigError(f"actor: the tokenizer's {tokenizer.vocab_size} pieces exceed a model's vocabulary")

    r, dp = cfg.rollout, layout.dp
    if r.prompts_per_iteration % dp:
        raise ConfigError(f"rollout.prompts_per_iteration={r.prompts_per_iteration} is not divisible by dp={dp}")
    per_rank = r.prompts_per_iteration // dp
    if per_rank % r.micro_batch_size:
        raise ConfigError(f"rollout.micro_batch_size={r.micro_batch_size} does not divide the {per_rank} prompts "
                          f"per data-parallel rank")
    micro_batches = per_rank // r.micro_batch_size
    if micro_batches % cfg.ppo.mini_batches:
        raise ConfigError(f"ppo.mini_batches={cfg.ppo.mini_batches} does not divide the {micro_batches} "
                          "micro-batches per rank")
    generation = r.generation_batch_size or per_rank
    if per_rank % generation:
        raise ConfigError(f"rollout.generation_batch_size={generation} does not divide the {per_rank} prompts "
                          "per data-parallel rank")
    ptx_micro_batches = 0
    if cfg.ptx is not None:
        x = cfg.ptx
        if x.rows_per_iteration % (x.micro_batch_size * dp):
            raise ConfigError(f"ptx.rows_per_iteration={x.rows_per_iteration} is not divisible by micro_batch_size "
                              f"* dp = {x.micro_batch_size} * {dp}")
        ptx_micro_batches = x.rows_per_iteration // (x.micro_batch_size * dp)
    if cfg.fast_path.rm_pairs_per_step % dp or cfg.fast_path.rm_pairs_per_step < 2 * dp:
        raise ConfigError(f"fast_path.rm_pairs_per_step={cfg.fast_path.rm_pairs_per_step} must be a multiple of dp "
                          f"of at least 2 * dp = {2 * dp}")
    if cfg.fast_path.rm_data is not None and not Path(cfg.fast_path.rm_data).is_file():
        raise ConfigError(f"fast_path.rm_data: {cfg.fast_path.rm_data} does not exist")

    conditions = read_conditions(Path(cfg.reward_model) / CONDITIONS_FILE)
    prompts = PromptDataset(cfg.prompts.train, tokenizer, cfg.prompts.on_error)
    for i in range(len(prompts)):
        _, condition = prompts.record(i)
        if condition is not None and condition not in conditions:
            raise ConfigError(f"{prompts.where(i)}: condition {condition!r} is not one of the reward model's "
                              f"({sorted(conditions) or f'none: {cfg.reward_model} has no {CONDITIONS_FILE}'})")
    if cfg.checker:
        load_function(cfg.checker, "checker")
    for k, spec in enumerate(cfg.fast_path.detectors.custom):
        load_function(spec, f"fast_path.detectors.custom.{k}")
    return PPOPlan(layout, actor, critic, reward, conditions, generation, ptx_micro_batches)
