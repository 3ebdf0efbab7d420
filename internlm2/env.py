"""`python -m internlm2.env` / `internlm2 env`: what is installed, how the extension was built, which
backends each op has, and which GPU (if any) this process sees."""

import argparse
import json
import platform

import torch

import internlm2
from internlm2._extension import cpu_only_build_reason, read_build_meta

_BACKENDS = ("CPU", "CUDA")


def registered_ops() -> dict[str, list[str]]:
    """`internlm2::op` -> backends with a kernel registered in this process (a GPU is not needed). In a
    build without CUDA kernels the CUDA entry is the guard that says how to rebuild: not listed."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("internlm2::"))
    backends = _BACKENDS if internlm2._C.with_cuda else ("CPU",)
    return {name: [b for b in backends if torch._C._dispatch_has_kernel_for_dispatch_key(name, b)] for name in names}


def collect() -> dict:
    ext = internlm2._C
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "internlm2": internlm2.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": {
            "built_for_torch": ext.torch_version,
            "cuda_kernels": ext.with_cuda,
            "cuda_version": ext.cuda_version,
            "cuda_archs": ext.cuda_archs,
            "sm90_kernels": ext.sm90_kernels,
            "cpu_isa": ext.cpu_isa(),
            "build_meta": read_build_meta(),
        },
        "gpus": gpus,
        "ops": registered_ops(),
    }


def format_report(info: dict) -> str:
    ext = info["extension"]
    lines = [
        f"internlm2      {info['internlm2']}",
        f"python         {info['python']}",
        f"torch          {info['torch']} (CUDA {info['torch_cuda'] or 'none'})",
        f"extension      built for torch {ext['built_for_torch']}; CPU kernels use {ext['cpu_isa']}",
        "CUDA kernels   "
        + (f"CUDA {ext['cuda_version']}, archs {ext['cuda_archs']}" if ext["cuda_kernels"]
           else f"not built ({cpu_only_build_reason()})"),
        f"GPUs seen      {', '.join(info['gpus']) or 'none'}",
        "ops:",
    ]
    width = max((len(n) for n in info["ops"]), default=0)
    lines += [f"  {name:<{width}}  {' '.join(backends) or '(no kernel)'}" for name, backends in info["ops"].items()]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m internlm2.env", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
