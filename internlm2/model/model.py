"""InternLM2: the backbone (embeddings, pre-norm decoder layers, final norm) and a head on top.

`InternLM2Model` is the backbone (HF prefix `model.`): it packs the inputs, applies RoPE, runs the layers
(with context/sequence parallelism and the KV cache) and returns a `BackboneOutput`, the last hidden
states of the tokens this rank computed. Heads (heads.py) turn those into what a stage needs:
`InternLM2ForCausalLM` carries the language-model head (`output`), `InternLM2ForScore` the scalar head
(`v_head`, a reward model or a critic).

Parameter names are InternLM2's HF names (`model.tok_embeddings.weight`, `model.layers.{i}.attention.wqkv
.weight`, ..., `output.weight` / `v_head.weight`), so checkpoints map by name. Built from the
tensor-parallel layers (plain linears at TP=1), so the same classes run one process or any TP layout, and
a pipeline stage is the same class holding some layers: `layer_ids` (global indices, which the parameter
names keep), `with_embedding` (else the stage takes `hidden_states`) and `with_head` (else it returns
hidden states; the final norm lives with the head).

Inputs are padded `[B, S]` (with `attention_mask`) or packed `[T]` (with `cu_seqlens`); the model computes
on packed tokens and returns outputs in the caller's layout (see packing.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from internlm2.constants import IGNORE_INDEX
from internlm2.model.config import ModelConfig
from internlm2.model.decoder import DecoderLayer
from internlm2.model.heads import BackboneOutput, LMHead, ScalarHead
from internlm2.model.kernels import Kernels, select_kernels
from internlm2.model.kv_cache import KVCache
from internlm2.model.norm import RMSNorm
from internlm2.model.packing import Packing, context_parallel_packing, packing_for
from internlm2.ops import DynamicNTKScaling
from internlm2.parallel import ParallelState, VocabParallelEmbedding


@dataclass
class CausalLMOutput:
    """`logits` ([B, S, V] or [T, V]) unless the call asked for the loss only; `loss` when labels were
    given; `hidden_states`: the last hidden states ([B, S, H] or [T, H]; after the final norm on a stage
    with the head, the stage's output otherwise; under sequence parallelism this rank's token shard of
    the packed tokens, [T/tp, H])."""

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class InternLM2Model(nn.Module):
    """The backbone (HF prefix `model.`): token embeddings (first stage), layers, final norm (last stage)."""

    def __init__(self, config: ModelConfig, parallel: ParallelState, layer_ids: Iterable[int], *, with_embedding: bool,
                 with_norm: bool, dtype=None, device=None):
        super().__init__()
        self.config, self.parallel = config, parallel
        self.kernels: Kernels = select_kernels(config.kernels)
        self.tok_embeddings = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel=parallel, dtype=dtype, device=device)
            if with_embedding else None
        )
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(config, parallel, i, dtype=dtype, device=device) for i in layer_ids}
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device) if with_norm else None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> BackboneOutput:
        """Runs this stage's part of the backbone on padded `[B, S]` or packed `[T]` inputs (`input_ids` on
        the stage with the embedding, else `hidden_states`) and returns the hidden states of the computed
        tokens (after the final norm on the last stage). kv_cache: generation (see generation.py): the
        first call is the prefill of one packed prompt per cache row, each later call passes one token per
        row `[B]`.

        Context parallelism (cp > 1): pass the whole packed row (`input_ids [T]`, `cu_seqlens`); each CP
        rank computes its zigzag share of every sequence (`internlm2.parallel.context_parallel`). Under
        sequence and/or context parallelism, hidden states passed between pipeline stages are this rank's
        tokens `[T_local, H]`."""
        inputs = self._check_inputs(input_ids, hidden_states)
        packing, shape = self._packing(inputs, attention_mask, cu_seqlens, position_ids, max_seqlen, kv_cache)
        if kv_cache is not None:
            kv_cache.check_step(packing)
        h = packing.pack(inputs) if self.tok_embeddings is not None or not self.local_hidden else inputs
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(h)
        rope = self._rope_tables(packing, kv_cache)
        for layer in self.layers.values():
            h = layer(h, rope, packing, self.kernels, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(packing)
        if self.norm is not None:
            h = self.norm(h, self.kernels)
        return BackboneOutput(h, packing, shape, self.parallel)

    @property
    def local_hidden(self) -> bool:
        """Whether hidden states in and out of this stage hold only this rank's tokens (SP and/or CP)."""
        return self.parallel.sequence_parallel or self.parallel.cp_size > 1

    def _packing(self, inputs, attention_mask, cu_seqlens, position_ids, max_seqlen, kv_cache) -> tuple[Packing, tuple]:
        """The packing of this call and the shape of its (whole-row) token inputs."""
        cp = self.parallel.cp_size
        if self.tok_embeddings is not None:
            shape = tuple(inputs.shape)
        elif not self.local_hidden:
            shape = tuple(inputs.shape[:-1])
        elif cu_seqlens is not None:
            shape = (int(cu_seqlens[-1]),)
        elif attention_mask is not None:
            shape = tuple(attention_mask.shape)
        else:
            shape = (inputs.shape[0] * self.parallel.tp_size,)  # sequence parallel shard of one sequence
        if kv_cache is not None and not kv_cache.is_empty:
            return self._decode_packing(shape, inputs.device, kv_cache, attention_mask, cu_seqlens, position_ids), shape
        if cp > 1:
            if kv_cache is not None or len(shape) != 1 or cu_seqlens is None or position_ids is not None:
                raise ValueError(
                    f"context parallelism (cp={cp}) takes whole packed rows: input_ids [T] with cu_seqlens "
                    "(positions follow from the split; no attention_mask, position_ids or KV cache)"
                )
            packing_for(shape, inputs.device, cu_seqlens=cu_seqlens, what="input_ids")  # validates cu_seqlens
            return context_parallel_packing(cu_seqlens, self.parallel), shape
        what = "input_ids" if self.tok_embeddings is not None else "hidden_states"
        return packing_for(shape, inputs.device, attention_mask, cu_seqlens, position_ids, max_seqlen, what), shape

    def _check_inputs(self, input_ids, hidden_states) -> torch.Tensor:
        if self.tok_embeddings is not None:
            if input_ids is None or hidden_states is not None:
                raise ValueError("this model (stage) has the embedding: pass input_ids, not hidden_states")
            if input_ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"input_ids must be int32 or int64 token ids, got {input_ids.dtype}")
            return input_ids
        if hidden_states is None or input_ids is not None:
            raise ValueError("this pipeline stage has no embedding: pass hidden_states, not input_ids")
        if self.parallel.sequence_parallel and hidden_states.dim() != 2:
            raise ValueError(
                f"under sequence parallelism hidden_states are this rank's token shard [T/tp, H], got "
                f"{tuple(hidden_states.shape)}"
            )
        if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden_states must be [T, {self.config.hidden_size}] or [B, S, {self.config.hidden_size}], "
                f"got {tuple(hidden_states.shape)}"
            )
        return hidden_states

    @staticmethod
    def _decode_packing(shape, device, cache: KVCache, attention_mask, cu_seqlens, position_ids) -> Packing:
        if len(shape) != 1 or attention_mask is not None or cu_seqlens is not None or position_ids is not None:
            raise ValueError(
                "after the prefill, a KV-cache call takes one new token per sequence as input_ids [B] "
                "(positions come from the cache)"
            )
        cu = torch.arange(shape[0] + 1, dtype=torch.int32, device=device)
        return Packing(cu, cache.lengths.clone(), 1)

    def _rope_tables(self, packing: Packing, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        scaling = None
        if config.rope_scaling_factor is not None:
            # The NTK base follows the longest sequence in the call (HF's rule: max position + 1); in a
            # decode step that is known on the host from the cache, and under context parallelism every
            # rank must use the whole sequences' length, not the largest position of its own share.
            seq_len = None
            if cache is not None and not cache.is_empty:
                seq_len = cache.max_length + 1
            elif packing.context is not None:
                seq_len = 2 * self.parallel.cp_size * packing.context.max_chunk
            scaling = DynamicNTKScaling(config.rope_scaling_factor, config.max_position_embeddings, seq_len)
        return self.kernels.rope_cos_sin(packing.position_ids, config.head_size, config.rope_theta, scaling)


class _WithHead(nn.Module):
    """A backbone stage plus, on the last stage, a head registered under the HF name `head_name`."""

    head_name: str

    def __init__(self, config: ModelConfig, parallel: ParallelState | None, layer_ids: Iterable[int] | None,
                 with_embedding: bool, with_head: bool, dtype, device):
        super().__init__()
        parallel = parallel or ParallelState.single()
        parallel.config.validate(num_attention_heads=config.num_attention_heads,
                                 num_kv_heads=config.num_key_value_heads, vocab_size=config.vocab_size)
        layer_ids = list(range(config.num_layers) if layer_ids is None else layer_ids)
        bad = [i for i in layer_ids if not 0 <= i < config.num_layers]
        if bad or len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"layer_ids must be distinct indices in [0, num_layers={config.num_layers}), got {layer_ids}")
        self.layer_ids = layer_ids
        self.model = InternLM2Model(config, parallel, layer_ids, with_embedding=with_embedding, with_norm=with_head,
                                    dtype=dtype, device=device)
        setattr(self, self.head_name, self._make_head(dtype, device) if with_head else None)
        self.reset_parameters()

    def _make_head(self, dtype, device) -> nn.Module:
        raise NotImplementedError

    # The backbone owns the configuration (RoPE reads it), the layout and the kernels.
    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @config.setter
    def config(self, value: ModelConfig) -> None:
        self.model.config = value

    @property
    def parallel(self) -> ParallelState:
        return self.model.parallel

    @property
    def kernels(self) -> Kernels:
        return self.model.kernels

    @property
    def head(self) -> nn.Module | None:
        return getattr(self, self.head_name)

    @property
    def with_embedding(self) -> bool:
        return self.model.tok_embeddings is not None

    @property
    def with_head(self) -> bool:
        return self.head is not None

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """InternLM2's init: every matrix (linear, embedding, head) N(0, initializer_range), norm weights 1."""
        for param in self.parameters():
            if param.device.type == "meta":
                continue
            if param.dim() >= 2:
                param.normal_(0.0, self.config.initializer_range, generator=generator)
            else:
                param.fill_(1.0)

    def backbone(self, *args, **kwargs) -> BackboneOutput:
        """The backbone's output with this stage's head attached (see `InternLM2Model.forward`)."""
        out = self.model(*args, **kwargs)
        out.head = self.head
        return out


class InternLM2ForCausalLM(_WithHead):
    """Backbone + language-model head (`output`, untied from the embeddings)."""

    head_name = "output"

    def __init__(self, config: ModelConfig, parallel: ParallelState | None = None, *,
                 layer_ids: Iterable[int] | None = None, with_embedding: bool = True, with_head: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__(config, parallel, layer_ids, with_embedding, with_head, dtype, device)

    def _make_head(self, dtype, device) -> LMHead:
        return LMHead(self.config.hidden_size, self.config.vocab_size, self.parallel, self.kernels, dtype=dtype,
                      device=device)

    def forward(self, input_ids: torch.Tensor | None = None, *, labels: torch.Tensor | None = None,
                loss_reduction: str = "mean", ignore_index: int = IGNORE_INDEX, return_logits: bool | None = None,
                **backbone_inputs) -> CausalLMOutput:
        """The backbone on `input_ids` (or `hidden_states`; see `InternLM2Model.forward` for the inputs),
        then, on the stage with the head, the loss and/or logits.

        labels: targets aligned with the inputs (already shifted: `labels[t]` is the token that follows
        position t; `ignore_index` where there is none); the loss is computed from the hidden states and
        the output weight without materialising the logits. return_logits: default True without labels,
        False with them. Under context parallelism outputs (logits, hidden states, per-token losses) are
        this rank's share of the tokens, in `split.index` order, and the loss is this rank's part: use
        reduction "sum" and divide by the row's token count."""
        out = self.backbone(input_ids, **backbone_inputs)
        result = CausalLMOutput(hidden_states=out.stage_output())
        if not self.with_head:
            return result
        if labels is not None:
            result.loss = self.output.loss(out, labels, reduction=loss_reduction, ignore_index=ignore_index)
        if return_logits if return_logits is not None else labels is None:
            result.logits = self.output.logits(out)
        return result


class InternLM2ForScore(_WithHead):
    """Backbone + scalar head (`v_head`): InternLM2's reward-model layout, also a PPO critic."""

    head_name = "v_head"

    def __init__(self, config: ModelConfig, parallel: ParallelState | None = None, *,
                 layer_ids: Iterable[int] | None = None, with_embedding: bool = True, with_head: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__(config, parallel, layer_ids, with_embedding, with_head, dtype, device)

    def _make_head(self, dtype, device) -> ScalarHead:
        return ScalarHead(self.config.hidden_size, self.parallel, dtype=dtype, device=device)

    def forward(self, input_ids: torch.Tensor | None = None, *, positions: torch.Tensor | None = None,
                **backbone_inputs) -> torch.Tensor:
        """Scores at `positions` (flat indices into the inputs' tokens), or of every token in the
        inputs' layout when `positions` is None. On a stage without the head: its hidden states."""
        out = self.backbone(input_ids, **backbone_inputs)
        if not self.with_head:
            return out.stage_output()
        if positions is not None:
            return self.v_head.scores_at(out, positions)
        return out.unpack(self.v_head.token_scores(out))
