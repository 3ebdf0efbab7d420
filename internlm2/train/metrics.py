"""Throughput, MFU and memory: what training achieved against what the device can do.

MFU (model FLOPs utilisation, PaLM's definition) = model FLOP/s achieved per device / the device's peak
dense bf16 FLOP/s. Model FLOPs come from `flops.training_flops` (causal attention counted as a causal
kernel computes it, no recomputation), so MFU cannot exceed 100% unless the count or the peak is wrong;
`mfu()` raises if it would.

Peaks. GPUs: NVIDIA's published figures for dense bf16 tensor-core math. A GPU missing from the table
has an unknown peak: MFU is not reported, never guessed, unless the user gives the peak. A CPU has no
datasheet figure that training can reach, so its peak is a measured large-matmul rate in the training
dtype, and the result goes under its own key, `mfu_of_measured_peak`, rather than `mfu`.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass

import torch

# (pattern on the lowercased CUDA device name, dense bf16 FLOP/s, which part). NVIDIA's datasheets quote
# bf16 "with sparsity", twice the dense rate: the dense figure is half of it (A100 624 -> 312, H100 PCIe
# 1513 -> 756.5, NVL 1671 -> 835.5); for H100/H200 SXM the H100 whitepaper gives the dense figure itself,
# 989.4 (132 SMs x 1830 MHz x 4096 FLOP/clock). A800/H800 are the export versions of A100/H100 with the same
# tensor-core rates. First match wins, so the PCIe/NVL variants come before the SXM parts whose names they
# contain; `\b` keeps "gh200" from matching "h200" and "a10" from matching "a100".
_GPU_PEAKS: tuple[tuple[str, float, str], ...] = (
    (r"\bh[18]00\b.*\bpcie\b", 1513e12 / 2, "H100/H800 PCIe"),
    (r"\bh100\b.*\bnvl\b", 1671e12 / 2, "H100 NVL"),
    (r"\bh200\b.*\bnvl\b", 1671e12 / 2, "H200 NVL"),
    (r"\bh[18]00\b", 989.4e12, "H100/H800 SXM"),
    (r"\bh200\b", 989.4e12, "H200 SXM"),
    (r"\ba[18]00\b", 624e12 / 2, "A100/A800"),
)

MFU_KEY = "mfu"
MEASURED_KEY = "mfu_of_measured_peak"


class MFUError(ValueError):
    """Utilisation above 100%: the FLOPs count or the peak is wrong."""


@dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s and where the number comes from."""

    flops_per_s: float | None  # None: unknown
    basis: str  # "datasheet", "given", "measured" or "unknown"
    description: str

    @property
    def key(self) -> str | None:
        """The metrics key utilisation against this peak is logged under (None: not reported)."""
        if self.flops_per_s is None:
            return None
        return MEASURED_KEY if self.basis == "measured" else MFU_KEY


def gpu_peak(device_name: str) -> Peak:
    """Datasheet peak dense bf16 FLOP/s for a CUDA device name as `torch.cuda.get_device_name` reports it."""
    name = device_name.lower()
    for pattern, flops, part in _GPU_PEAKS:
        if re.search(pattern, name):
            return Peak(flops, "datasheet", f"{part} dense bf16 datasheet peak ({flops / 1e12:.1f} TFLOP/s)")
    return Peak(None, "unknown", f"unknown peak for GPU {device_name!r}")


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024,
                         min_time_s: float = 0.25) -> float:
    """FLOP/s of the fastest of repeated [size, size] x [size, size] matmuls (at least 3, for `min_time_s`)."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, allocator, kernel selection
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 3 or spent < min_time_s:
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        took = time.perf_counter() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
    return 2 * size**3 / best


def device_peak(device: torch.device | str, *, dtype: torch.dtype = torch.float32,
                given_flops_per_s: float | None = None) -> Peak:
    """The peak to measure utilisation against: `given_flops_per_s` if set (e.g. a GPU missing from the
    table), a CUDA device's datasheet figure, or on CPU a measured matmul rate in the training `dtype`."""
    device = torch.device(device)
    if given_flops_per_s is not None:
        if not given_flops_per_s > 0:
            raise ValueError(f"a given peak must be a positive FLOP/s figure, got {given_flops_per_s!r}")
        return Peak(float(given_flops_per_s), "given", f"given peak ({given_flops_per_s / 1e12:.1f} TFLOP/s)")
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        flops = measure_matmul_flops(device, dtype)
        return Peak(flops, "measured", f"measured {str(dtype).removeprefix('torch.')} matmul peak on CPU "
                                       f"({flops / 1e9:.1f} GFLOP/s)")
    return Peak(None, "unknown", f"unknown peak for device type {device.type!r}")


def mfu(flops_per_s_per_device: float, peak: Peak) -> float | None:
    """Achieved / peak FLOP/s (a fraction), or None when the peak is unknown. Raises MFUError above 1."""
    if peak.flops_per_s is None:
        return None
    ratio = flops_per_s_per_device / peak.flops_per_s
    if ratio > 1.0:
        hint = (" (a measured peak can be too low when the machine was busier while measuring than while "
                "training)" if peak.basis == "measured" else "")
        raise MFUError(
            f"achieved {flops_per_s_per_device / 1e12:.3f} TFLOP/s per device is {ratio:.1%} of the "
            f"{peak.description}: utilisation above 100% means the FLOPs are over-counted or the peak is "
            f"wrong{hint}"
        )
    return ratio


def throughput(*, tokens: int, flops: int, seconds: float, num_devices: int, peak: Peak) -> dict[str, float]:
    """Step metrics from the whole job's tokens and model FLOPs over `seconds` of wall time: tokens/s (job
    and per device), TFLOP/s per device and utilisation under `peak.key` (left out if the peak is unknown)."""
    if seconds <= 0 or num_devices <= 0:
        raise ValueError(f"seconds and num_devices must be positive, got {seconds!r} and {num_devices!r}")
    per_device = flops / seconds / num_devices
    out = {
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_device": tokens / seconds / num_devices,
        "tflops_per_device": per_device / 1e12,
    }
    utilisation = mfu(per_device, peak)
    if utilisation is not None:
        out[peak.key] = utilisation
    return out


def peak_memory_bytes(device: torch.device | str) -> int:
    """High-water mark of memory: on CUDA the tensors allocated since the last `reset_peak_memory`; on CPU
    the process's peak resident set size (the OS keeps it for the process's lifetime; it cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def reset_peak_memory(device: torch.device | str) -> None:
    """Starts a new CUDA high-water mark (so each logging interval reports its own); CPU has none to reset."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
