"""internlm2: a training system for InternLM2-family language models with its own C++/CUDA kernels.

`import internlm2` loads the compiled extension (`internlm2._C`, which registers `torch.ops.internlm2.*`)
and the Python face of the kernels, `internlm2.ops`.
"""

from internlm2._extension import cpu_only_build_reason, guard_cuda_calls, load_extension

_C = load_extension()

from internlm2 import ops  # noqa: E402  (ops need the extension's op registrations)

# A CPU-only build on a GPU machine: the first op on a CUDA tensor says how to rebuild.
_cuda_guard = None if _C.with_cuda else guard_cuda_calls("internlm2", cpu_only_build_reason())

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
