"""Loads `internlm2._C` and turns every way it can fail into an ImportError that says how to fix it; an
extension built without CUDA kernels says how to rebuild at the first op on a CUDA tensor."""

import importlib
import json
from pathlib import Path

import torch  # libtorch must be loaded before the extension that links against it

from internlm2._build_plan import DEFAULT_ARCHS, arch_for_capability

_PACKAGE_DIR = Path(__file__).resolve().parent
REBUILD_COMMAND = "pip install --no-build-isolation -e ."


def _release(version: str) -> str:
    return version.split("+")[0]


def read_build_meta() -> dict | None:
    """What setup.py recorded about the build (torch version, CUDA archs), or None if never built."""
    path = _PACKAGE_DIR / "_build_meta.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_extension():
    meta = read_build_meta()
    try:
        ext = importlib.import_module("internlm2._C")
    except ImportError as err:
        if not any(_PACKAGE_DIR.glob("_C*.so")) and meta is None:
            raise ImportError(
                "internlm2._C (the compiled kernels) is not built. From the source checkout run:\n"
                f"    {REBUILD_COMMAND}"
            ) from err
        if meta and _release(meta.get("torch", "")) != _release(torch.__version__):
            raise ImportError(
                f"internlm2._C was built for torch {meta['torch']} but torch {torch.__version__} is "
                f"installed, so it cannot load ({err}). Rebuild it against the installed torch:\n"
                f"    {REBUILD_COMMAND}"
            ) from err
        raise ImportError(
            f"internlm2._C failed to load: {err}\nRebuild it against the installed torch:\n    {REBUILD_COMMAND}"
        ) from err
    if _release(ext.torch_version) != _release(torch.__version__):
        # It loaded, but C++ ABI differences between torch releases crash later in obscure ways.
        raise ImportError(
            f"internlm2._C was built for torch {ext.torch_version} but torch {torch.__version__} is "
            f"installed. Rebuild it against the installed torch:\n    {REBUILD_COMMAND}"
        )
    return ext


def missing_cuda_kernels_message(op: str, reason: str, capability: tuple[int, int] | None) -> str:
    """What to do when `op` meets a CUDA tensor (of a GPU with `capability`) in a CPU-only build."""
    start = f"{op} was called on a CUDA tensor, but internlm2._C was built without CUDA kernels ({reason})."
    reference = "`--set model.kernels=reference` runs the model in plain PyTorch instead"
    arch = arch_for_capability(*capability) if capability else DEFAULT_ARCHS
    if arch is None:
        return f"{start} This GPU (sm_{capability[0]}{capability[1]}) has none of our kernels; {reference}."
    return (f"{start} Rebuild with them from the source checkout:\n"
            f"    INTERNLM2_CUDA_ARCHS={arch} ./scripts/install.sh\n({reference}.)")


def guard_cuda_calls(namespace: str, reason: str) -> torch.library.Library:
    """Gives every op of `namespace` without a CUDA kernel one that raises `missing_cuda_kernels_message`,
    instead of torch's "Could not run ... with arguments from the 'CUDA' backend". The registrations last
    as long as the returned library is alive."""
    lib = torch.library.Library(namespace, "IMPL")
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith(f"{namespace}::") and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
            lib.impl(name.split("::", 1)[1], _raise_missing_cuda_kernel(name, reason), "CUDA")
    return lib


def _raise_missing_cuda_kernel(op: str, reason: str):
    def kernel(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
        capability = torch.cuda.get_device_capability(device) if device is not None else None
        raise RuntimeError(missing_cuda_kernels_message(op, reason, capability))

    return kernel


def cpu_only_build_reason() -> str:
    """Why this build has no CUDA kernels, as setup.py recorded it."""
    meta = read_build_meta() or {}
    return meta.get("cuda_plan") or "INTERNLM2_SKIP_CUDA, no nvcc or no GPU at build time"
