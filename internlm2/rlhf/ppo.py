"""Online PPO with a conditional reward model (InternLM2 report §4.2.2-4.2.3), on the shared engine.

Four models of one size: the actor and the frozen reference start from the SFT model, the critic from the
reward model's backbone with a new (zero) value head, and the reward model is frozen (no gradients, no
optimizer state). One iteration:

1. rollouts: `prompts_per_iteration` prompts (each DP rank its share, in the order of a resumable
   (seed, position) permutation), one response each, sampled with the KV cache from the actor's live
   module at temperature 1 and top-p 0.9 by default; a generation batch's random draws are keyed by
   (seed, iteration, its first prompt position), so rollouts do not depend on the layout or on a resume;
2. experience, without gradients: the log-probabilities of the actions under the actor ("old") and the
   reference, the critic's values, the reward model's score of each response with its prompt's domain
   prompt (report Fig. 10: only the reward model sees it), clipped to [-5, 5] and normalised by running
   statistics over all rollouts so far; per-token rewards (KL penalty on every action, the score on the
   last) and GAE;
3. the update: the critic's value loss; after the critic warm-up, the actor's clipped surrogate plus the
   pretraining loss (PTX) in the same optimizer step.

Which distribution the log-probabilities come from: old, new and reference log-probabilities are all
those of the policy itself, the softmax of the raw logits at temperature 1, computed by the training
forward (`LMHead.token_logprobs`) over the packed rollouts. Not the sampler's: top-p truncates and
renormalises the distribution that tokens are drawn from, and a ratio of the untruncated new policy to
the truncated old one would not be 1 at the first step, nor would logp - logp_ref estimate a KL between
two policies. One forward path for all three also keeps the ratio free of numerical differences between
the KV-cache decode and the packed forward (in bf16 these are far larger than fp32's 1e-6). The sampler
reports its own log-probabilities (GenerationResult.logprobs): at temperature 1 and top-p 1 they are the
same distribution, and tests hold them to the training forward's within 1e-5 in fp32.

Rounds (`rounds: N`, `ppo.iterations` each) end, but for the last, with the fast path (fast_path.py):
detectors find reward-hacking patterns in the round's responses, each becomes preference pairs of early
(pattern-free, chosen) and late (with the pattern, rejected) responses to the same prompts, the reward
model is trained further on them with its data (reward_update.py), and the next round starts from the
current actor and critic with the patched reward model, whose scores are normalised by fresh running
statistics. The round's responses are kept in
`rounds/round_K/responses.jsonl`, its pairs in `patch_pairs.jsonl`, its findings in `rounds.jsonl`.

Checkpoints hold the actor, the critic and the (possibly patched) reward model with both optimizers, the
running score statistics, the prompt and PTX positions and every rank's RNG; a resumed run continues
with the same rollouts and losses. A stop signal saves and exits as the trainer does (preemption.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from internlm2.constants import DTYPES
from internlm2.data import PromptDataset, Tokenizer
from internlm2.data.chat import Message
from internlm2.data.sampler import sample_indices
from internlm2.model import InternLM2ForCausalLM, InternLM2ForScore, load_into
from internlm2.model.generation import SamplingParams
from internlm2.model.heads import BackboneOutput
from internlm2.rlhf import fast_path
from internlm2.rlhf.advantages import gae
from internlm2.rlhf.ppo_config import PPOConfig
from internlm2.rlhf.ppo_losses import RunningMoments, policy_loss, token_rewards, value_loss
from internlm2.rlhf.ppo_preflight import PPOPlan, plan_ppo
from internlm2.rlhf.reward_data import RewardPairs
from internlm2.rlhf.reward_update import accuracy, train_reward_model
from internlm2.rlhf.rollout import Rollout, collate_rollouts, packed, sample_responses, sequence_rows, stop_tokens
from internlm2.rlhf.scorer import Scorer
from internlm2.train import checkpoint as ckpt
from internlm2.train.checkpoint_dir import CheckpointDirectory, ready_run_directory
from internlm2.train.config import StageConfig
from internlm2.train.data_setup import micro_batches, stage_dataset, to_device
from internlm2.train.engine import Engine, checkpoint_bytes
from internlm2.train.metrics_log import MetricsLogger
from internlm2.train.preemption import StopSignals
from internlm2.train.runtime import Runtime
from internlm2.train.schedule import WarmupCosine
from internlm2.train.timers import Timers

UNITS = ("actor", "critic", "reward_model")  # what a checkpoint holds (the reference never changes)
ROUNDS_FILE, RESPONSES_FILE, PAIRS_FILE = "rounds.jsonl", "responses.jsonl", "patch_pairs.jsonl"


@dataclass
class PPOState:
    iteration: int = 0  # iterations completed in the whole run (all rounds)
    consumed_prompts: int = 0
    ptx_rows: int = 0  # pretraining rows consumed
    patched_rounds: int = 0  # rounds whose fast path has run
    moments: dict = field(default_factory=lambda: RunningMoments().state_dict())


def _logprobs(out: BackboneOutput, mb: dict) -> torch.Tensor:
    return out.unpack(out.head.token_logprobs(out, mb["targets"]))


class PPOTrainer:
    def __init__(self, cfg: PPOConfig, plan: PPOPlan | None = None):
        self.cfg = cfg
        plan = plan or plan_ppo(cfg)  # every check that needs no process group, first
        self.plan = plan
        self.run_dir = Path(cfg.run_dir)
        self.runtime = Runtime.start(plan.layout, deterministic=cfg.deterministic, seed=cfg.seed,
                                     **plan.model_shape)
        self.rank, self.device, self.parallel = self.runtime.rank, self.runtime.device, self.runtime.parallel
        self.stop_signals = StopSignals.from_environment(self.device, self.rank)
        self.tokenizer = Tokenizer.load(cfg.actor)
        self.prompts = PromptDataset(cfg.prompts.train, self.tokenizer, cfg.prompts.on_error)
        self.checker = fast_path.load_function(cfg.checker, "checker") if cfg.checker else None
        self.timers = Timers(cuda_sync=self.device.type == "cuda")
        dtype = DTYPES[cfg.dtype]
        build = dict(dtype=dtype, device=self.device, seed=cfg.seed, timers=self.timers)

        def optim(o):
            return dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, mode=o.mode)

        def weights(directory, model_config, fresh_head=False):
            def load(chunks):
                load_into(chunks, directory, self.parallel, config=model_config,
                          fresh=["v_head.weight"] if fresh_head else ())
                if fresh_head:  # the critic keeps the backbone only: its values start at 0
                    for chunk in chunks:
                        if chunk.with_head:
                            chunk.v_head.weight.data.zero_()
            return load

        self.actor = Engine.build(InternLM2ForCausalLM, plan.actor, self.parallel, optim=optim(cfg.actor_optim),
                                  weights=weights(cfg.actor, plan.actor), **build)
        self.reference = Engine.build(InternLM2ForCausalLM, plan.actor, self.parallel,
                                      weights=weights(cfg.actor, plan.actor), **build)
        critic_dir = cfg.critic or cfg.reward_model
        self.critic = Engine.build(InternLM2ForScore, plan.critic, self.parallel, optim=optim(cfg.critic_optim),
                                   weights=weights(critic_dir, plan.critic, fresh_head=True), **build)
        self.reward = Engine.build(InternLM2ForScore, plan.reward, self.parallel,
                                   weights=weights(cfg.reward_model, plan.reward), **build)
        self.scorer = Scorer(self.reward.chunks[0], self.tokenizer, plan.conditions)
        self.engines = {"actor": self.actor, "critic": self.critic, "reward_model": self.reward}
        self.stops = stop_tokens(self.tokenizer, plan.actor.eos_token_id)
        r = cfg.rollout
        self.sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                       top_k=r.top_k, stop_token_ids=self.stops)
        self.state = PPOState()
        self.moments = RunningMoments()
        self.checkpoints = CheckpointDirectory(self.run_dir / "checkpoints", cfg.checkpoint.keep, self.rank,
                                               self.runtime.barrier)
        self.dtype = dtype

    # ---- memory ---------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, dict]:
        """Bytes per model on this rank: weights, and gradients + optimizer state (0 for frozen models)."""
        report = {}
        for name, engine in (("actor", self.actor), ("critic", self.critic), ("reference", self.reference),
                             ("reward_model", self.reward)):
            params = sum(p.numel() * p.element_size() for p in engine.named_parameters().values())
            state = engine.optimizer.state_bytes() if engine.optimizer is not None else 0
            report[name] = {"weights_mib": params / 2**20, "grads_and_optimizer_mib": state / 2**20,
                            "trained": engine.optimizer is not None}
        return report

    # ---- the run --------------------------------------------------------------------------------
    def run(self) -> PPOState:
        cfg = self.cfg
        self.checkpoints.remove_incomplete()
        resumed = self._resume()
        ready_run_directory(self.run_dir, cfg, sum(checkpoint_bytes(e) for e in self.engines.values()), self.rank, self.runtime.from_rank0)
        self._truncate_round_logs()
        if self.rank == 0:
            if resumed:
                print(f"resumed from {resumed} at iteration {self.state.iteration}", flush=True)
            for name, m in self.memory_report().items():
                kind = "trained" if m["trained"] else "frozen: no gradients, no optimizer state"
                print(f"{name}: {m['weights_mib']:.1f} MiB weights + {m['grads_and_optimizer_mib']:.1f} MiB "
                      f"gradients and optimizer state per rank ({kind})", flush=True)
        self.ptx = self._ptx_stream()
        logger = MetricsLogger(self.run_dir, rank=self.rank, total_steps=cfg.total_iterations,
                               start_step=self.state.iteration, tensorboard=cfg.logging.tensorboard,
                               progress=cfg.logging.progress)
        try:
            with self.stop_signals.catching():
                while self.state.iteration < cfg.total_iterations:
                    if self._fast_path_due():
                        self.fast_path(self.state.patched_rounds)
                        self.state.patched_rounds += 1
                        self.save_checkpoint()
                    metrics = self.train_iteration()
                    self.state.iteration += 1
                    if self.state.iteration % cfg.logging.every == 0:
                        logger.log(self.state.iteration, metrics)
                    stop = self.stop_signals.stop_requested()
                    round_end = self.state.iteration % cfg.ppo.iterations == 0
                    if stop or round_end or self.state.iteration % cfg.checkpoint.every == 0:
                        self.save_checkpoint()
                    if stop:
                        raise self.stop_signals.stopped(self.state.iteration)
        finally:
            logger.close()
        return self.state

    def _fast_path_due(self) -> bool:
        done_rounds = self.state.iteration // self.cfg.ppo.iterations
        return self.state.iteration % self.cfg.ppo.iterations == 0 and 0 < done_rounds and \
            self.state.patched_rounds < done_rounds

    # ---- one iteration --------------------------------------------------------------------------
    def _my_prompts(self) -> list[tuple[int, dict]]:
        """(global position, item) of this DP rank's prompts for the next iteration."""
        p, per = self.parallel, self.cfg.rollout.prompts_per_iteration // self.parallel.dp_size
        positions = np.arange(per) + self.state.consumed_prompts + p.dp_rank * per
        indices = sample_indices(positions, len(self.prompts), self.cfg.seed)
        out = []
        for position, index in zip(positions.tolist(), indices.tolist()):
            item = self.prompts[index]
            out.append((position, {**item, "index": index, "record": self.prompts.raw(index)}))
        return out

    def _generator(self, *key: int) -> torch.Generator:
        """A generator seeded by (run seed, *key): 0 for rollouts, 1 for the fast path's, then where."""
        seed = int.from_bytes(np.random.SeedSequence([self.cfg.seed, *key]).generate_state(2, np.uint32).tobytes(),
                              "little") & ((1 << 63) - 1)
        return torch.Generator(device=self.device).manual_seed(seed)

    def rollouts(self) -> list[Rollout]:
        """This DP rank's rollouts of the next iteration, generated in batches of `generation_batch_size`
        prompts, each batch's draws keyed by (seed, iteration, its first prompt position)."""
        prompts = self._my_prompts()
        size = self.plan.generation_batch_size
        out = []
        for start in range(0, len(prompts), size):
            batch = prompts[start:start + size]
            out += sample_responses(self.actor.chunks[0], self.tokenizer, [item for _, item in batch], self.sampling,
                                    self._generator(0, self.state.iteration, batch[0][0]))
        return out

    def _dp_gather(self, values: torch.Tensor) -> torch.Tensor:
        """The DP ranks' equal-length tensors, concatenated in rank order (the global prompt order)."""
        if self.parallel.dp_size == 1:
            return values
        parts = [torch.empty_like(values) for _ in range(self.parallel.dp_size)]
        dist.all_gather(parts, values.contiguous(), group=self.parallel.dp_group)
        return torch.cat(parts)

    def _dp_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.parallel.dp_size > 1:
            dist.all_reduce(t, group=self.parallel.dp_group)
        return t.tolist()

    def experience(self, rollouts: Sequence[Rollout]) -> tuple[list[dict], dict, list[float], list]:
        """The rollouts' micro-batches with everything the update needs, the experience's metrics, and
        each rollout's raw reward-model score and true reward (None without a checker)."""
        cfg, size = self.cfg.ppo, self.cfg.rollout.micro_batch_size
        mbs = [to_device(collate_rollouts(rollouts[i:i + size]), self.device) for i in range(0, len(rollouts), size)]
        old = self.actor.forward(mbs, lambda out, mb: (_logprobs(out, mb), out.unpack(out.head.entropy(out))))
        ref = self.reference.forward(mbs, _logprobs)
        values = self.critic.forward(mbs, lambda out, mb: out.unpack(out.head.token_scores(out)))
        raw = self.scorer.score([[*r.messages, Message("assistant", r.text)] for r in rollouts],
                                [r.condition for r in rollouts])
        clipped = self._dp_gather(raw.to(self.device)).clamp(-cfg.score_clip, cfg.score_clip)
        self.moments.update(clipped)  # every rank the same statistics, of the global batch in order
        per = len(rollouts)
        mine = clipped[self.parallel.dp_rank * per:(self.parallel.dp_rank + 1) * per]
        scores = self.moments.normalize(mine) if cfg.normalize_scores else mine
        kl_sum = entropy_sum = 0.0
        start = 0
        for mb, (logp, entropy), logp_ref, value in zip(mbs, old, ref, values):
            n, mask = len(mb["last_action"]), mb["action_mask"]
            mb["old_logprobs"], mb["ref_logprobs"], mb["old_values"] = logp, logp_ref, value
            rewards = token_rewards(scores[start:start + n], logp, logp_ref, mask.float(), mb["last_action"],
                                    cfg.kl_coef)
            mb["rewards"] = rewards
            cu = mb["cu_seqlens"]
            advantages, returns = gae(sequence_rows(rewards, cu), sequence_rows(value, cu), sequence_rows(mask, cu),
                                      gamma=cfg.gamma, lam=cfg.lam)
            mb["advantages"], mb["returns"] = packed(advantages, cu), packed(returns, cu)
            kl_sum += float(((logp - logp_ref) * mask).sum())
            entropy_sum += float((entropy * mask).sum())
            start += n
        if cfg.normalize_advantages:
            self._normalize_advantages(mbs)
        actions = sum(int(mb["action_mask"].sum()) for mb in mbs)
        true = [self.checker(r.record, r.text) for r in rollouts] if self.checker else []
        sums = self._dp_sum([len(rollouts), actions, float(raw.sum()), kl_sum, entropy_sum, sum(true),
                             sum(r.finish_reason == "length" for r in rollouts)])
        n, actions = sums[0], sums[1]
        metrics = {"rm_score": sums[2] / n, "kl": sums[3] / n, "kl_per_token": sums[3] / actions,
                   "entropy": sums[4] / actions, "response_length": actions / n, "truncated_fraction": sums[6] / n,
                   "score_mean": self.moments.mean, "score_std": self.moments.std}
        if self.checker:
            metrics["true_reward"] = sums[5] / n
        return mbs, metrics, raw.tolist(), true or [None] * len(rollouts)

    def _normalize_advantages(self, mbs: list[dict]) -> None:
        total = sum(float((mb["advantages"] * mb["action_mask"]).sum()) for mb in mbs)
        squares = sum(float((mb["advantages"] ** 2 * mb["action_mask"]).sum()) for mb in mbs)
        count = sum(int(mb["action_mask"].sum()) for mb in mbs)
        total, squares, count = self._dp_sum([total, squares, count])
        mean = total / count
        std = max(squares / count - mean * mean, 0.0) ** 0.5
        for mb in mbs:
            mb["advantages"] = (mb["advantages"] - mean) / (std + 1e-8) * mb["action_mask"]

    # The objectives, as local sums for the engine (normalised by the global number of actions, or of
    # target tokens for PTX).
    def _policy_loss(self, out: BackboneOutput, mb: dict):
        logp = out.head.token_logprobs(out, mb["targets"])
        mask = out.tokens(mb["action_mask"], "action_mask").float()
        old = out.tokens(mb["old_logprobs"], "old_logprobs")
        loss, clipped = policy_loss(logp, old, out.tokens(mb["advantages"], "advantages"), mask, self.cfg.ppo.clip)
        return loss, {"clip_fraction": clipped, "approx_kl": ((old - logp.detach()) * mask).sum()}

    def _value_loss(self, out: BackboneOutput, mb: dict):
        values = out.head.token_scores(out)
        mask = out.tokens(mb["action_mask"], "action_mask").float()
        loss = value_loss(values, out.tokens(mb["returns"], "returns"), mask,
                          out.tokens(mb["old_values"], "old_values"), self.cfg.ppo.value_clip)
        return loss, {"value_mean": (values.detach() * mask).sum()}

    def _ptx_loss(self, out: BackboneOutput, mb: dict):
        nll = out.head.loss(out, mb["labels"], reduction="sum")
        return self.cfg.ptx.coef * nll, {"ptx_loss": nll.detach()}

    def train_iteration(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        rollouts = self.rollouts()
        generated = sum(len(r.response_ids) for r in rollouts)
        generation_s = time.perf_counter() - start
        mbs, metrics, scores, true = self.experience(rollouts)
        self._record_responses(rollouts, scores, true)
        experience_s = time.perf_counter() - start - generation_s
        train_start = time.perf_counter()
        actor_trains = self.state.iteration >= cfg.ppo.critic_warmup
        for engine, o in ((self.actor, cfg.actor_optim), (self.critic, cfg.critic_optim)):
            total = cfg.total_iterations
            engine.set_lr(WarmupCosine(o.lr, o.warmup_steps, total, o.min_lr_ratio)(self.state.iteration))
        ptx = [to_device(next(self.ptx), self.device) for _ in range(self.plan.ptx_micro_batches)] if actor_trains else []
        if actor_trains and cfg.ptx:
            self.state.ptx_rows += cfg.ptx.rows_per_iteration
        per_step = len(mbs) // cfg.ppo.mini_batches
        update: dict[str, list[float]] = {}
        for _ in range(cfg.ppo.epochs):
            for k in range(cfg.ppo.mini_batches):
                part = mbs[k * per_step:(k + 1) * per_step]
                actions = sum(int(mb["action_mask"].sum()) for mb in part)
                critic = self.critic.forward_backward(part, self._value_loss, actions)
                step = self.critic.step(cfg.critic_optim.grad_clip)
                found = {"value_loss": critic["loss"], "value_mean": critic["value_mean"],
                         "critic_grad_norm": step.grad_norm}
                if actor_trains:
                    actor = self.actor.forward_backward(part, self._policy_loss, actions, final=not ptx)
                    found.update(policy_loss=actor["loss"], clip_fraction=actor["clip_fraction"],
                                 approx_kl=actor["approx_kl"])
                    if ptx:
                        targets = sum(int((mb["labels"] >= 0).sum()) for mb in ptx)
                        found["ptx_loss"] = self.actor.forward_backward(ptx, self._ptx_loss, targets,
                                                                        accumulate=True)["ptx_loss"]
                    found["actor_grad_norm"] = self.actor.step(cfg.actor_optim.grad_clip).grad_norm
                for key, value in found.items():
                    update.setdefault(key, []).append(value)
        self.state.consumed_prompts += cfg.rollout.prompts_per_iteration
        self.state.moments = self.moments.state_dict()
        training_s = time.perf_counter() - train_start
        tokens = self._dp_sum([generated])[0]
        metrics.update({key: sum(v) / len(v) for key, v in update.items()})
        metrics.update(round=self.state.iteration // cfg.ppo.iterations + 1, actor_trains=actor_trains,
                       time_generation_s=generation_s, time_experience_s=experience_s, time_training_s=training_s,
                       generated_tokens_per_s=tokens / max(generation_s, 1e-9))  # over all DP ranks
        return metrics

    # ---- the round's responses and the fast path ------------------------------------------------
    def _round_dir(self, round_index: int) -> Path:
        return self.run_dir / "rounds" / f"round_{round_index + 1}"

    def _record_responses(self, rollouts: Sequence[Rollout], scores: list[float], true: list) -> None:
        """Appends the iteration's responses (all DP ranks', in global order) to the round's file."""
        iteration = self.state.iteration + 1
        mine = [fast_path.RoundResponse(iteration, r.index, r.text, len(r.response_ids), s, t).to_json()
                for r, s, t in zip(rollouts, scores, true)]
        if self.parallel.dp_size > 1:
            gathered = [None] * self.parallel.dp_size
            dist.all_gather_object(gathered, mine, group=self.parallel.dp_group)
            mine = [x for part in gathered for x in part]
        if self.rank == 0:
            path = self._round_dir(self.state.iteration // self.cfg.ppo.iterations) / RESPONSES_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.writelines(json.dumps(x) + "\n" for x in mine)

    def _truncate_round_logs(self) -> None:
        """After a resume: drops what was logged past the checkpoint (it will be logged again)."""
        if self.rank == 0:
            for path in (self.run_dir / "rounds").glob(f"round_*/{RESPONSES_FILE}"):
                lines = [x for x in path.read_text().splitlines() if json.loads(x)["iteration"] <= self.state.iteration]
                path.write_text("".join(x + "\n" for x in lines))
            rounds = self.run_dir / ROUNDS_FILE
            if rounds.is_file():
                lines = [x for x in rounds.read_text().splitlines() if json.loads(x)["round"] <= self.state.patched_rounds]
                rounds.write_text("".join(x + "\n" for x in lines))
        self.runtime.barrier()

    def _pairs(self, path: Path) -> RewardPairs:
        return RewardPairs(path, self.tokenizer, self.plan.reward.reward_token_id,
                           condition_prompts=self.plan.conditions, max_length=self.cfg.fast_path.rm_max_length)

    def fast_path(self, round_index: int) -> dict:
        """Detects the round's patterns, builds their pairs, patches the reward model; returns the log entry."""
        fp, k = self.cfg.fast_path, self.cfg.ppo.iterations
        round_dir = self._round_dir(round_index)
        responses = [fast_path.RoundResponse(**json.loads(x)) for x in (round_dir / RESPONSES_FILE).read_text().splitlines()]
        iterations = list(range(round_index * k + 1, (round_index + 1) * k + 1))
        patterns = fast_path.detect(responses, iterations, fp.detectors)
        early = fast_path.early_responses(responses, iterations, fp.detectors)
        late = self._late_responses([r.prompt_index for r in early], round_index) if patterns else {}
        entry = {"round": round_index + 1, "patterns": [], "pairs": 0}
        records = []
        for pattern in patterns:
            pairs = fast_path.patch_pairs(pattern, early, late, fp.max_pairs)
            patched = len(pairs) >= fp.min_pairs
            entry["patterns"].append({"name": pattern.name, **pattern.detail, "pairs": len(pairs), "patched": patched})
            if patched:
                for index, chosen, rejected in pairs:
                    messages, condition = self.prompts.record(index)
                    records.append({"prompt": [asdict(m) for m in messages], "chosen": chosen,
                                    "rejected": rejected, "pattern": pattern.name,
                                    **({"condition": condition} if condition else {})})
        entry["pairs"] = len(records)
        if records:
            if self.rank == 0:
                (round_dir / PAIRS_FILE).write_text("".join(json.dumps(_plain(r)) + "\n" for r in records))
            self.runtime.barrier()
            entry["reward_model"] = self._patch_reward_model(round_index)
            # The patched model scores on its own scale: normalising its scores by the old model's
            # statistics would shift every reward (and advantage, against a critic fitted to the old scale)
            # the same way, drowning the difference the patch made between responses.
            self.moments = RunningMoments()
            self.state.moments = self.moments.state_dict()
        if self.rank == 0:
            with open(self.run_dir / ROUNDS_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")
            print(f"round {round_index + 1} fast path: " + json.dumps(entry), flush=True)
        return entry

    def _late_responses(self, indices: list[int], round_index: int) -> dict[int, tuple[str, int]]:
        """The current actor's responses to `indices`' prompts (every rank the same ones)."""
        items = [{**self.prompts[i], "index": i, "record": {}} for i in indices]
        size = self.plan.generation_batch_size
        out = {}
        for start in range(0, len(items), size):
            batch = items[start:start + size]
            for r in sample_responses(self.actor.chunks[0], self.tokenizer, batch, self.sampling,
                                      self._generator(1, round_index, start)):
                out[r.index] = (r.text, len(r.response_ids))
        return out

    def _patch_reward_model(self, round_index: int) -> dict:
        """Trains the reward model on every round's patch pairs so far with its own data."""
        fp = self.cfg.fast_path
        new = self._pairs(self._round_dir(round_index) / PAIRS_FILE).pairs
        patches = [p for r in range(round_index + 1) if (self._round_dir(r) / PAIRS_FILE).is_file()
                   for p in self._pairs(self._round_dir(r) / PAIRS_FILE).pairs]
        data = self._pairs(Path(fp.rm_data)).pairs if fp.rm_data else []
        conditions = sorted(self.plan.conditions)
        measure = {"patch_pairs": new, **({"rm_data": data} if data else {})}
        before = {name: accuracy(self.reward, pairs, conditions) for name, pairs in measure.items()}
        log = train_reward_model(self.reward, patches, data, conditions, steps=fp.rm_steps,
                                 pairs_per_step=fp.rm_pairs_per_step, lr=fp.rm_lr, seed=self.cfg.seed + round_index,
                                 dtype=self.dtype)
        after = {name: accuracy(self.reward, pairs, conditions) for name, pairs in measure.items()}
        return {"accuracy_before": before, "accuracy_after": after, "train_loss_first": log[0]["loss"],
                "train_loss_last": log[-1]["loss"], "patch_pairs_total": len(patches)}

    # ---- data -----------------------------------------------------------------------------------
    def _ptx_stream(self):
        if self.cfg.ptx is None:
            return iter(())
        x = self.cfg.ptx
        dataset = stage_dataset(x.data, self.tokenizer, x.seq_len)
        stage = StageConfig("ptx", 1, x.seq_len, x.rows_per_iteration, x.micro_batch_size)
        return micro_batches(dataset, stage, seed=self.cfg.seed, dp_rank=self.parallel.dp_rank,
                             dp_size=self.parallel.dp_size, consumed_samples=self.state.ptx_rows, num_workers=0)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        loop = {"ppo": asdict(self.state)}
        return self.checkpoints.save(self.state.iteration,
                                     lambda d: ckpt.save(d, self.engines, loop, self.cfg, self.parallel))

    def _resume(self) -> Path | None:
        source = ckpt.choose_resume(self.checkpoints, self.cfg.checkpoint.load, self.parallel)
        if source is None:
            return None
        loop = ckpt.load(source, self.engines, self.parallel)
        self.state = PPOState(**loop["ppo"])
        self.moments.load_state_dict(self.state.moments)
        return source


def _plain(record: dict) -> dict:
    """A patch-pair record with its prompt messages in their JSON form (no None names)."""
    record = dict(record)
    record["prompt"] = [{k: v for k, v in m.items() if v is not None} for m in record["prompt"]]
    return record


def export(trainer: PPOTrainer) -> None:
    """Rank 0, after the process group is gone: the final actor (and a patched reward model) as HF
    directories, and the run's plots."""
    from internlm2.rlhf.ppo_plot import draw_ppo
    from internlm2.rlhf.scorer import CONDITIONS_FILE
    from internlm2.train.export import export_hf
    from internlm2.train.metrics_log import read_metrics

    cfg, run_dir = trainer.cfg, trainer.run_dir
    final = trainer.checkpoints.latest()
    if cfg.checkpoint.export_hf and final is not None:
        export_hf(final, run_dir / "hf", unit="actor", tokenizer_directory=cfg.actor, dtype=None, overwrite=True)
        print(f"exported the actor of {final.name} to {run_dir / 'hf'}")
        if trainer.state.patched_rounds:
            out = export_hf(final, run_dir / "reward_model_hf", unit="reward_model", tokenizer_directory=cfg.actor,
                            dtype=None, overwrite=True)
            (Path(out) / CONDITIONS_FILE).write_text(json.dumps(trainer.plan.conditions, indent=1) + "\n")
            print(f"exported the patched reward model to {out}")
    records = read_metrics(run_dir / "metrics.jsonl")
    if records:
        draw_ppo(records, run_dir / "ppo.png", title=run_dir.resolve().name, rounds_every=cfg.ppo.iterations)
        print(f"plots: {run_dir / 'ppo.png'}")

