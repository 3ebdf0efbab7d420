"""The model's own contracts: fused vs reference kernels, padded == packed == one by one, pipeline stages,
the loss, gradients, and bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from internlm2.model import InternLM2ForCausalLM
from tests.test_model_support import KERNEL_CHOICES, fused_kernels_available, random_ids, random_model, tiny_config

needs_fused = pytest.mark.skipif(not fused_kernels_available(), reason="the CPU kernels of internlm2.ops are not all built yet")


def clone_with(model, **config_changes):
    copy = InternLM2ForCausalLM(model.config.replace(**config_changes), dtype=model.output.weight.dtype).eval()
    copy.load_state_dict(model.state_dict())
    return copy


@needs_fused
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)], ids=["fp32", "bf16"])
def test_fused_and_reference_kernels_give_the_same_logits_and_gradients(dtype, atol):
    reference = random_model(tiny_config(), dtype=dtype, std=0.05)
    fused = clone_with(reference, kernels="fused")
    lengths = [7, 1, 24]
    ids = random_ids((sum(lengths),), reference.config.vocab_size)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    labels = torch.roll(ids, -1)
    outs = []
    for model in (reference, fused):
        out = model(ids, cu_seqlens=cu, labels=labels, return_logits=True)
        out.loss.backward()
        outs.append((out.logits.float(), out.loss, {n: p.grad.float() for n, p in model.named_parameters()}))
    (logits_r, loss_r, grads_r), (logits_f, loss_f, grads_f) = outs
    scale = logits_r.abs().max().item()
    assert (logits_f - logits_r).abs().max().item() <= atol * max(1.0, scale)
    assert abs(loss_f.item() - loss_r.item()) <= atol * 10
    for name in grads_r:
        g_scale = grads_r[name].abs().max().item()
        assert (grads_f[name] - grads_r[name]).abs().max().item() <= 10 * atol * max(g_scale, 1e-3), name


@pytest.mark.parametrize("kernels", KERNEL_CHOICES)
def test_padded_packed_and_one_by_one_agree(kernels):
    model = random_model(tiny_config(kernels=kernels))
    seqs = [random_ids((n,), 320) for n in (6, 13, 1)]
    with torch.no_grad():
        alone = [model(s).logits for s in seqs]
        packed = model(torch.cat(seqs), cu_seqlens=torch.tensor([0, 6, 19, 20], dtype=torch.int32)).logits
        right = torch.zeros(3, 13, dtype=torch.long)
        left = torch.zeros(3, 13, dtype=torch.long)
        right_mask, left_mask = torch.zeros_like(right), torch.zeros_like(left)
        for i, s in enumerate(seqs):
            right[i, : len(s)], right_mask[i, : len(s)] = s, 1
            left[i, 13 - len(s):], left_mask[i, 13 - len(s):] = s, 1
        padded_right = model(right, attention_mask=right_mask).logits
        padded_left = model(left, attention_mask=left_mask).logits
    for i, (s, expected) in enumerate(zip(seqs, alone)):
        start = [0, 6, 19][i]
        torch.testing.assert_close(packed[start:start + len(s)], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(padded_right[i, : len(s)], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(padded_left[i, 13 - len(s):], expected, rtol=0, atol=1e-5)


def test_pipeline_stages_compose_to_the_full_model():
    config = tiny_config(num_layers=3)
    full = random_model(config)
    first = InternLM2ForCausalLM(config, layer_ids=[0], with_head=False).eval()
    last = InternLM2ForCausalLM(config, layer_ids=[1, 2], with_embedding=False).eval()
    state = full.state_dict()
    for stage in (first, last):
        names = dict(stage.named_parameters())
        assert set(names) <= set(state)  # global layer indices are kept
        stage.load_state_dict({n: state[n] for n in names})
    assert "model.layers.1.attention.wqkv.weight" in dict(last.named_parameters())
    ids = random_ids((2, 9), 320)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        hidden = first(ids, attention_mask=mask).hidden_states
        assert hidden.shape == (2, 9, 64) and first(ids, attention_mask=mask).logits is None
        staged = last(hidden_states=hidden, attention_mask=mask).logits
        torch.testing.assert_close(staged, full(ids, attention_mask=mask).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_equals_cross_entropy_of_the_logits(reduction):
    model = random_model(tiny_config(), std=0.05)
    ids = random_ids((2, 11), 320)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = torch.where(mask.bool(), torch.roll(ids, -1, dims=1), -100)
    labels[:, -1] = -100
    out = model(ids, attention_mask=mask, labels=labels, loss_reduction=reduction, return_logits=True)
    expected = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert model(ids, attention_mask=mask, labels=labels).logits is None  # loss only: no logits made


def test_backward_reaches_every_parameter():
    model = random_model(tiny_config(), std=0.05)
    ids = random_ids((17,), 320)
    model(ids, labels=torch.roll(ids, -1)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_init_follows_initializer_range():
    model = InternLM2ForCausalLM(tiny_config(vocab_size=4096, initializer_range=0.02))
    emb = model.model.tok_embeddings.weight
    assert abs(emb.std().item() - 0.02) < 0.002 and abs(emb.mean().item()) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones(64))


def test_bad_inputs_name_the_problem():
    model = random_model(tiny_config())
    ids = random_ids((2, 5), 320)
    with pytest.raises(ValueError, match="attention_mask has shape \\(2, 4\\), expected input_ids's \\(2, 5\\)"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        model(ids.flatten(), cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="end at the number of tokens \\(10\\)"):
        model(ids.flatten(), cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens is for packed input_ids"):
        model(ids, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="input_ids must be int32 or int64"):
        model(ids.float())
    with pytest.raises(ValueError, match="labels has shape"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="pass input_ids, not hidden_states"):
        model(hidden_states=torch.zeros(5, 64))
    stage = InternLM2ForCausalLM(tiny_config(), layer_ids=[1], with_embedding=False)
    with pytest.raises(ValueError, match="hidden_states must be \\[T, 64\\]"):
        stage(hidden_states=torch.zeros(5, 63))
    with pytest.raises(ValueError, match="layer_ids must be distinct indices in \\[0, num_layers=2\\)"):
        InternLM2ForCausalLM(tiny_config(), layer_ids=[0, 2])
