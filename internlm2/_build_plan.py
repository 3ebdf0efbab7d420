"""What a build of `internlm2._C` compiles, decided in one place for setup.py, scripts/install.sh (which
prints the plan before pip hides the build) and the error a CPU-only build gives on a GPU.

CUDA kernels are compiled when nvcc and a CUDA build of torch are present and either a GPU is visible here
or INTERNLM2_CUDA_ARCHS names the architectures (CI and GPU-less build hosts set it). Without that rule a
2-core laptop spent most of half an hour compiling sm_80/sm_90a kernels it could never run.

Standard library only: setup.py loads this file by path, before the package (whose `__init__` loads the
extension) can be imported.

    python internlm2/_build_plan.py     # prints the plan for this machine and environment
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ARCHS = "80;90a"
# Compile work in CPU-minutes (user + sys of cold builds without ccache, torch 2.14.1, CUDA 13.0, GCC 12, on
# the 2-core dev machine): the CPU kernels for every ISA 2.9, CPU + CUDA kernels for sm_90a 11.1. Only for
# the estimate printed before a build.
CPU_KERNELS_CPU_MIN = 3.0
CUDA_KERNELS_CPU_MIN_PER_ARCH = 8.0


def arch_for_capability(major: int, minor: int) -> str | None:
    """The architecture to build for a GPU of compute capability major.minor, or None if no kernel of ours
    runs there. sm_80 code runs on every 8.x card; Hopper (9.0) gets its own wgmma/TMA code as 90a."""
    if major == 8:
        return "80"
    if (major, minor) == (9, 0):
        return "90a"
    return None


@dataclass(frozen=True)
class VisibleGpu:
    evidence: str  # how it was seen, for the message
    archs: str | None  # the architectures of the cards seen, when nvidia-smi could tell


def find_visible_gpu(path: str | None = None, device_node: str = "/dev/nvidia0") -> VisibleGpu | None:
    """A GPU of this machine: one that nvidia-smi (on `path`, default $PATH) lists, else `device_node`."""
    smi = shutil.which("nvidia-smi", path=path)
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        cards = [line.rsplit(",", 1) for line in out.splitlines() if "," in line]
        if cards:
            archs = []
            for _, cap in cards:
                major, _, minor = cap.strip().partition(".")
                arch = arch_for_capability(int(major), int(minor or 0)) if major.isdigit() else None
                if arch is None:
                    archs = None
                    break
                archs.append(arch)
            names = sorted({name.strip() for name, _ in cards})
            return VisibleGpu(f"nvidia-smi lists {', '.join(names)}",
                              ";".join(sorted(set(archs))) if archs else None)
    if Path(device_node).exists():
        return VisibleGpu(f"{device_node} exists", None)
    return None


def find_cuda_home(environ=os.environ) -> Path | None:
    """The toolkit to build with: CUDA_HOME, CUDA_PATH, /usr/local/cuda, then the nvcc on PATH. Decided by
    nvcc on disk, never by torch.cuda.is_available() (false on a build host without a GPU)."""
    candidates = [environ.get("CUDA_HOME"), environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists():
            return Path(c)
    return None


@dataclass(frozen=True)
class BuildPlan:
    cuda_archs: str  # "" when only the CPU kernels are built
    reason: str

    @property
    def with_cuda(self) -> bool:
        return bool(self.cuda_archs)

    def estimate_minutes(self, jobs: int, cores: int) -> float:
        archs = len(self.cuda_archs.split(";")) if self.with_cuda else 0
        work = CPU_KERNELS_CPU_MIN + archs * CUDA_KERNELS_CPU_MIN_PER_ARCH
        return work / max(1, min(jobs, cores))

    def describe(self, jobs: int, cores: int) -> str:
        what = (f"CPU kernels and CUDA kernels for {', '.join('sm_' + a for a in self.cuda_archs.split(';'))}"
                if self.with_cuda else "CPU kernels only")
        minutes = max(1, round(self.estimate_minutes(jobs, cores)))
        hint = "" if self.with_cuda else f"; set INTERNLM2_CUDA_ARCHS (e.g. {DEFAULT_ARCHS}) to build CUDA kernels"
        return (f"internlm2: building {what}: about {minutes} min with {jobs} compile job(s) on {cores} core(s), "
                f"less when ccache has seen the sources\ninternlm2: because {self.reason}{hint}")


def decide(environ, torch_cuda: str | None, cuda_home: Path | None, gpu: VisibleGpu | None) -> BuildPlan:
    """The build for this environment (`environ`: INTERNLM2_SKIP_CUDA, INTERNLM2_CUDA_ARCHS), torch's CUDA
    version (None for a CPU-only torch), the toolkit found and the GPU seen (None: no GPU visible)."""
    if environ.get("INTERNLM2_SKIP_CUDA", "0").lower() in ("1", "true", "yes", "on"):
        return BuildPlan("", "INTERNLM2_SKIP_CUDA is set")
    if torch_cuda is None:
        return BuildPlan("", "torch is a CPU-only build")
    if cuda_home is None:
        return BuildPlan("", "nvcc was not found (set CUDA_HOME to a CUDA toolkit)")
    archs = environ.get("INTERNLM2_CUDA_ARCHS", "").strip()
    if archs:
        return BuildPlan(archs, f"INTERNLM2_CUDA_ARCHS={archs}")
    if gpu is not None:
        if gpu.archs:
            return BuildPlan(gpu.archs, f"{gpu.evidence} (INTERNLM2_CUDA_ARCHS overrides)")
        return BuildPlan(DEFAULT_ARCHS, f"{gpu.evidence}, of an architecture not told apart here "
                                        "(INTERNLM2_CUDA_ARCHS overrides)")
    return BuildPlan("", "no GPU is visible (nvidia-smi lists none, no /dev/nvidia0) and INTERNLM2_CUDA_ARCHS is unset")


def compile_jobs(environ=os.environ) -> int:
    """Parallel compile jobs: MAX_JOBS, else one per core."""
    return int(environ.get("MAX_JOBS") or os.cpu_count() or 1)


def current_plan() -> BuildPlan:
    import torch

    return decide(os.environ, torch.version.cuda, find_cuda_home(), find_visible_gpu())


if __name__ == "__main__":
    print(current_plan().describe(compile_jobs(), os.cpu_count() or 1), flush=True)
