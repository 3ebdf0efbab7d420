import math

import pytest

from internlm2.train.schedule import WarmupCosine


def test_warmup_then_cosine_to_ten_percent():
    s = WarmupCosine(peak_lr=3e-4, warmup_steps=10, total_steps=110)
    assert s(0) == pytest.approx(3e-5) and s(9) == pytest.approx(3e-4)
    assert s(10) == pytest.approx(3e-4)
    assert s(60) == pytest.approx(3e-5 + (3e-4 - 3e-5) * 0.5)  # half-way through the decay
    assert s(110) == pytest.approx(3e-5) and s(500) == pytest.approx(3e-5)
    lrs = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    # the cosine shape itself, against the closed form at a quarter of the decay
    assert s(35) == pytest.approx(3e-5 + 2.7e-4 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_no_warmup_and_no_decay_edges():
    assert WarmupCosine(1.0, 0, 10)(0) == 1.0
    assert WarmupCosine(1.0, 5, 5)(7) == 1.0  # all warmup: stays at the peak


@pytest.mark.parametrize(
    "kwargs, message",
    [({"peak_lr": 0.0}, "peak_lr"), ({"warmup_steps": 20}, "warmup_steps"), ({"min_lr_ratio": 2.0}, "min_lr_ratio")],
)
def test_bad_values_are_named(kwargs, message):
    args = {"peak_lr": 1.0, "warmup_steps": 1, "total_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        WarmupCosine(**args)
