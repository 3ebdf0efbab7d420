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


# PyTorch's caching allocator serves requests up to 1 MiB from a pool of 2 MiB segments (the small pool)
# and larger ones from the large pool; a freed block goes back to its pool and is handed out again as is.
SMALL_POOL_MAX_BYTES = 1 << 20


def free_block_sizes(snapshot: list[dict], stream: int) -> list[int]:
    """Sizes of the free blocks (both pools) that allocations on `stream` would be handed next, from
    torch.cuda.memory_snapshot(); blocks of CUDA-graph private pools are left out."""
    return sorted(
        block["size"]
        for segment in snapshot
        if segment["stream"] == stream and tuple(segment.get("segment_pool_id", (0, 0))) == (0, 0)
        for block in segment["blocks"]
        if block["state"] == "inactive"
    )


def poison_cuda_allocator(fresh_large_bytes: int = 256 << 20, fresh_small_segments: int = 32) -> None:
    """Fill with NaN every free block of the CUDA caching allocator on the current stream, and fresh
    segments of both pools, so an output element a kernel forgets to write reads NaN. Bytes 0xFF are NaN in
    float32, bfloat16 and float16 alike."""
    stream = torch.cuda.current_stream().cuda_stream
    # Requesting each free block's exact size takes that block (best fit, no split); ascending order keeps
    # a smaller request from splitting a larger block that is still to be filled.
    held = [torch.empty(n, dtype=torch.uint8, device="cuda")
            for n in free_block_sizes(torch.cuda.memory_snapshot(), stream)]
    held += [torch.empty(SMALL_POOL_MAX_BYTES, dtype=torch.uint8, device="cuda")
             for _ in range(2 * fresh_small_segments)]
    held.append(torch.empty(fresh_large_bytes, dtype=torch.uint8, device="cuda"))
    for t in held:
        t.fill_(0xFF)


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
