"""Numerical oracles shared by the kernel tests.

The rule for low-precision kernels is FlashAttention's: a kernel's error against a float64 reference may
be at most `factor` times the error of the plain-PyTorch reference run in the same low precision, plus a
floor equal to the rounding noise of the dtype at the output's magnitude (FA3's atol).
"""

import os

import pytest
import torch


def fresh_seed() -> int:
    """A new seed per test (printed, so a failure can be replayed with INTERNLM2_TEST_SEED)."""
    seed = int(os.environ.get("INTERNLM2_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed}")
    return seed


def randn_with_outliers(shape, dtype, device="cpu", generator=None, outlier_p=1e-3, outlier_std=10.0):
    """N(0, 1) plus rare N(0, 100) outliers (FA3's stress distribution), made in float32 then cast."""
    x = torch.randn(shape, generator=generator, device=device)
    mask = torch.rand(shape, generator=generator, device=device) < outlier_p
    x = x + mask * torch.randn(shape, generator=generator, device=device) * outlier_std
    return x.to(dtype)


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def rounding_floor(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the rounding noise of `dtype` around the reference's values (FA3's fwd_atol)."""
    if ref64.numel() == 0:
        return 0.0
    r = ref64.to(dtype)
    return 2 * ((r + 0.3 - 0.3) - r).abs().max().item()


def assert_within_reference_error(out, ref_lowp, ref64, factor: float = 2.0, what: str = "output"):
    """|out - ref64| <= factor * |ref_lowp - ref64| + rounding floor (element-wise maxima).

    An oracle that is exactly zero everywhere (grad q when every sequence has one token: dP == delta) gives
    the rule no scale; there the kernel may show float32 noise of sums taken in another order (<= 1e-5)."""
    if ref64.numel() and ref64.abs().max() == 0:
        noise = out.abs().max().item()
        assert noise <= 1e-5, f"{what}: {noise:.3e} where the oracle is exactly 0"
        return
    err = max_abs_err(out, ref64)
    base = max_abs_err(ref_lowp, ref64)
    floor = rounding_floor(ref64, out.dtype)
    assert err <= factor * base + floor, (
        f"{what}: kernel error {err:.3e} exceeds {factor} x reference error {base:.3e} + floor {floor:.3e}"
    )


def to_double_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(t.requires_grad)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)")


def poison_cuda_allocator(nbytes: int = 256 << 20) -> None:
    """Fill freed CUDA cache blocks with NaN so an output element a kernel forgets to write shows up."""
    torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(float("nan"))


CPU_ISAS = ("default", "avx2", "avx512", "avx512_bf16")  # the extension's levels, lowest first


def run_with_cpu_isa(isa: str, code: str) -> None:
    """Runs `code` in a fresh interpreter whose CPU kernels use instruction set `isa` (ATEN_CPU_CAPABILITY;
    unset for avx512_bf16, the level picked when the CPU has it and nothing pins one), after asserting that
    the extension really picked it; skips when this CPU lacks it."""
    import subprocess
    import sys

    import internlm2

    if CPU_ISAS.index(isa) > CPU_ISAS.index(internlm2._C.cpu_isa()):
        pytest.skip(f"this CPU has no {isa}")
    prelude = f"import internlm2\nassert internlm2._C.cpu_isa() == {isa!r}, internlm2._C.cpu_isa()\n"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    if isa == "avx512_bf16":
        del env["ATEN_CPU_CAPABILITY"]
    result = subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
