import pytest
import torch
import torch.nn.functional as F

from internlm2 import ops
from tests.numerics import (
    assert_within_reference_error,
    fresh_seed,
    randn_with_outliers,
    run_with_cpu_isa,
    to_double_leaf,
)


def make_inputs(tokens, hidden, vocab, dtype, ignored_every=5, outliers=False):
    g = torch.Generator().manual_seed(fresh_seed())
    make = (lambda s: randn_with_outliers(s, dtype, generator=g)) if outliers else (
        lambda s: torch.randn(s, generator=g).to(dtype))
    h = make((tokens, hidden)).requires_grad_()
    w = (make((vocab, hidden)).float() / hidden**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    if ignored_every:
        labels[::ignored_every] = -100
    return h, w, labels


def forward_backward(fn, h, w, labels, grad_loss, **kw):
    h.grad = w.grad = None
    loss = fn(h, w, labels, **kw)
    loss.backward(grad_loss)
    return loss.detach(), h.grad, w.grad


def torch_cross_entropy(h, w, labels, reduction="mean", **_):
    """The unfused oracle: full logits, then F.cross_entropy."""
    return F.cross_entropy(h @ w.t(), labels, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 7, None], ids=lambda c: f"chunk{c}")
def test_equals_torch_cross_entropy_on_full_logits(reduction, chunk_size):
    h, w, labels = make_inputs(40, 24, 300, torch.float32)
    grad_loss = torch.randn(40).double() if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    got = forward_backward(ops.linear_cross_entropy, h, w, labels, grad_loss.float(), reduction=reduction,
                           chunk_size=chunk_size)
    want = forward_backward(torch_cross_entropy, to_double_leaf(h), to_double_leaf(w), labels, grad_loss,
                            reduction=reduction)
    for name, a, e in zip(("loss", "grad hidden", "grad weight"), got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_within_reference_error(dtype, reduction):
    h, w, labels = make_inputs(64, 32, 500, dtype, outliers=True)
    grad_loss = torch.randn(64) if reduction == "none" else torch.tensor(1.0)
    kw = {"reduction": reduction}
    got = forward_backward(ops.linear_cross_entropy, h, w, labels, grad_loss, chunk_size=24, **kw)
    ref_lowp = forward_backward(ops.linear_cross_entropy_reference, h, w, labels, grad_loss, **kw)
    ref64 = forward_backward(ops.linear_cross_entropy_reference, to_double_leaf(h), to_double_leaf(w), labels,
                             grad_loss.double(), **kw)
    # The loss is float32 in both: only the logits' rounding (the matmul in the input dtype) separates them.
    assert_within_reference_error(got[0], ref_lowp[0], ref64[0], 2.0, "loss")
    assert_within_reference_error(got[1], ref_lowp[1], ref64[1], 3.0, "grad hidden")
    assert_within_reference_error(got[2], ref_lowp[2], ref64[2], 3.0, "grad weight")


def test_z_loss_matches_reference():
    h, w, labels = make_inputs(30, 16, 200, torch.float32)
    got = forward_backward(ops.linear_cross_entropy, h, w, labels, None, z_loss_weight=1e-2, chunk_size=8)
    want = forward_backward(ops.linear_cross_entropy_reference, to_double_leaf(h), to_double_leaf(w), labels, None,
                            z_loss_weight=1e-2)
    for name, a, e in zip(("loss", "grad hidden", "grad weight"), got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6, msg=name)
    plain = ops.linear_cross_entropy(h, w, labels)
    assert got[0] > plain  # the z-loss term is positive


def test_three_dimensional_hidden_and_single_input_gradients():
    h, w, labels = make_inputs(24, 16, 100, torch.float32)
    h3, labels3 = h.detach().view(2, 12, 16), labels.view(2, 12)
    for h_grad, w_grad in ((True, False), (False, True)):
        hh = h3.clone().requires_grad_(h_grad)
        ww = w.detach().clone().requires_grad_(w_grad)
        ops.linear_cross_entropy(hh, ww, labels3, chunk_size=5).backward()
        h64, w64 = hh.detach().double().requires_grad_(), ww.detach().double().requires_grad_()
        torch_cross_entropy(h64.view(-1, 16), w64, labels).backward()
        if h_grad:
            torch.testing.assert_close(hh.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
            assert ww.grad is None
        else:
            torch.testing.assert_close(ww.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)
            assert hh.grad is None
    losses = ops.linear_cross_entropy(h3, w, labels3, reduction="none")
    assert losses.shape == (2, 12) and torch.all(losses.flatten()[labels == -100] == 0)


def test_every_token_ignored_gives_zero_loss_and_gradients():
    h, w, labels = make_inputs(6, 8, 20, torch.float32)
    labels[:] = -1
    loss = ops.linear_cross_entropy(h, w, labels, ignore_index=-1)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_without_grad_matches_and_backward_twice_is_refused():
    h, w, labels = make_inputs(10, 8, 50, torch.float32)
    with torch.no_grad():
        no_grad_loss = ops.linear_cross_entropy(h, w, labels)
    loss = ops.linear_cross_entropy(h, w, labels)
    torch.testing.assert_close(no_grad_loss, loss.detach())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_chunk_kernel_opcheck_and_gradient():
    g = torch.Generator().manual_seed(fresh_seed())
    logits = torch.randn(5, 33, generator=g)
    labels = torch.tensor([3, -100, 0, 32, 7])
    for grad_scale in (None, torch.tensor(0.5), torch.rand(5, generator=g)):
        torch.library.opcheck(torch.ops.internlm2.cross_entropy_chunk_.default, (logits.clone(), labels, -100, 0.0, grad_scale))
    x = logits.double().requires_grad_()
    ref = F.cross_entropy(x, labels, reduction="none")
    scale = torch.rand(5, generator=g)
    ref.backward(scale.double())
    in_place = logits.clone()
    loss, lse = torch.ops.internlm2.cross_entropy_chunk_(in_place, labels, -100, 0.0, scale)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(in_place.double(), x.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_every_instruction_set_matches_reference(isa):
    run_with_cpu_isa(
        isa,
        "import torch\n"
        "import torch.nn.functional as F\n"
        "from internlm2 import ops\n"
        "labels = torch.randint(0, 301, (21,)); labels[::4] = -100\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "  h = torch.randn(21, 16).to(dt).requires_grad_(); w = (torch.randn(301, 16) / 4).to(dt).requires_grad_()\n"
        "  loss = ops.linear_cross_entropy(h, w, labels, chunk_size=6); loss.backward()\n"
        "  h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))\n"
        "  ref = F.cross_entropy(h64 @ w64.t(), labels); ref.backward()\n"
        "  tol = 1e-5 if dt == torch.float32 else 2e-2\n"
        "  torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)\n"
        "  torch.testing.assert_close(h.grad.double(), h64.grad, rtol=tol, atol=tol)\n"
        "  torch.testing.assert_close(w.grad.double(), w64.grad, rtol=tol, atol=tol)\n",
    )


def test_labels_out_of_range_name_the_label():
    h, w, labels = make_inputs(6, 8, 20, torch.float32)
    labels[4] = 20
    with pytest.raises(RuntimeError, match=r"labels\[4\] = 20 is out of range: labels must be in \[0, 20\)"):
        ops.linear_cross_entropy(h, w, labels)
    labels[4] = -5
    with pytest.raises(RuntimeError, match=r"labels\[4\] = -5 is out of range"):
        ops.linear_cross_entropy(h, w, labels)


@pytest.mark.parametrize(
    "h, w, labels, kw, error, message",
    [
        (torch.ones(4, 8), torch.ones(10, 7), torch.zeros(4, dtype=torch.long), {}, ValueError, r"weight must have shape \[V, 8\]"),
        (torch.ones(4, 8), torch.ones(10, 8), torch.zeros(5, dtype=torch.long), {}, ValueError, r"labels must have shape \(4,\)"),
        (torch.ones(4, 8), torch.ones(10, 8, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.long), {}, ValueError, "weight has dtype torch.bfloat16 but hidden has torch.float32"),
        (torch.ones(4, 8), torch.ones(10, 8), torch.zeros(4, dtype=torch.long), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        (torch.ones(4, 8), torch.ones(10, 8), torch.zeros(4, dtype=torch.long), {"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
        (torch.ones(4, 8), torch.ones(10, 8), torch.zeros(4, dtype=torch.long), {"z_loss_weight": -1.0}, ValueError, "z_loss_weight must be finite and >= 0"),
        (torch.ones(4, 8), torch.ones(10, 8), torch.zeros(4, dtype=torch.int32), {}, RuntimeError, "labels must be Long"),
        (torch.ones(4, 8, dtype=torch.float64), torch.ones(10, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long), {}, RuntimeError, "logits must be float32, bfloat16 or float16"),
    ],
)
def test_bad_input_names_the_argument(h, w, labels, kw, error, message):
    with pytest.raises(error, match=message):
        ops.linear_cross_entropy(h, w, labels, **kw)
