"""Vocab-parallel cross-entropy (plain and fused with the output matmul) on 2 TP ranks against
F.cross_entropy on the full logits, with ignored tokens, every reduction and sequence parallel."""

import pytest
import torch
import torch.nn.functional as F

from internlm2.parallel import ParallelConfig, ParallelState
from internlm2.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from internlm2.parallel.mappings import scatter_to_sequence
from tests.distributed.spawn import distributed, worker_state

TOKENS, HIDDEN, VOCAB = 10, 8, 12


def _inputs(seed=7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    labels[[2, 7]] = -100
    upstream = torch.randn(TOKENS, generator=g, dtype=torch.float64)
    return hidden, weight, labels, upstream


def _reference(hidden, weight, labels, upstream, reduction, z_loss_weight=0.0):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logits = h @ w.t()
    losses = F.cross_entropy(logits, labels, reduction="none")
    losses = losses + z_loss_weight * torch.logsumexp(logits, -1).square() * (labels != -100)
    loss = {"none": losses, "sum": losses.sum(), "mean": losses.sum() / (labels != -100).sum()}[reduction]
    loss.backward(upstream if reduction == "none" else None)
    return loss.detach(), h.grad, w.grad


def _linear_case(sequence_parallel):
    parallel = worker_state(ParallelConfig(tp=2, sequence_parallel=sequence_parallel))
    hidden, weight, labels, upstream = _inputs()
    for reduction in ("mean", "sum", "none"):
        for z in (0.0, 1e-2):
            ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, upstream, reduction, z)
            h = scatter_to_sequence(hidden, parallel.tp_group) if sequence_parallel else hidden
            h = h.clone().requires_grad_()
            w = weight.chunk(2)[parallel.tp_rank].clone().requires_grad_()
            loss = vocab_parallel_linear_cross_entropy(h, w, labels, parallel, reduction=reduction,
                                                       z_loss_weight=z, chunk_size=3)
            loss.backward(upstream if reduction == "none" else None)
            torch.testing.assert_close(loss, ref_loss)
            ref_gh = scatter_to_sequence(ref_gh, parallel.tp_group) if sequence_parallel else ref_gh
            torch.testing.assert_close(h.grad, ref_gh, msg=lambda m: f"grad hidden, {reduction}, z={z}: {m}")
            torch.testing.assert_close(w.grad, ref_gw.chunk(2)[parallel.tp_rank], msg=f"grad weight, {reduction}")


@distributed(world_size=2)
def test_vocab_parallel_linear_cross_entropy_matches_full_logits():
    _linear_case(sequence_parallel=False)


@distributed(world_size=2)
def test_vocab_parallel_linear_cross_entropy_with_sequence_parallel_hidden():
    _linear_case(sequence_parallel=True)


@distributed(world_size=2)
def test_vocab_parallel_cross_entropy_on_sharded_logits():
    parallel = worker_state(ParallelConfig(tp=2))
    hidden, weight, labels, upstream = _inputs(11)
    full = (hidden @ weight.t()).float()
    for reduction in ("mean", "sum", "none"):
        ref_logits = full.clone().requires_grad_()
        ref = F.cross_entropy(ref_logits, labels, reduction=reduction)
        ref.backward(upstream.float() if reduction == "none" else None)
        local = full.chunk(2, dim=1)[parallel.tp_rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, labels, parallel, reduction=reduction)
        loss.backward(upstream.float() if reduction == "none" else None)
        torch.testing.assert_close(loss, ref.detach())
        torch.testing.assert_close(local.grad, ref_logits.grad.chunk(2, dim=1)[parallel.tp_rank])


def test_all_ignored_tokens_give_zero_loss_and_gradient():
    parallel = ParallelState.single()
    h = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    loss = vocab_parallel_linear_cross_entropy(h, w, torch.full((4,), -100), parallel)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


@pytest.mark.parametrize("hidden_shape,labels_shape,reduction,message", [
    ((4, 3), (4,), "avg", "reduction must be one of"),
    ((4, 3), (5,), "mean", "labels \\[T\\]"),
    ((2, 4, 3), (2, 4), "mean", "hidden must be \\[T, H\\]"),
])
def test_bad_arguments_are_named(hidden_shape, labels_shape, reduction, message):
    with pytest.raises(ValueError, match=message):
        vocab_parallel_linear_cross_entropy(torch.randn(hidden_shape), torch.randn(5, 3),
                                            torch.zeros(labels_shape, dtype=torch.long), ParallelState.single(),
                                            reduction=reduction)
