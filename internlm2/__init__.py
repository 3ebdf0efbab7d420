"""internlm2: a training system for InternLM2-family language models with its own C++/CUDA kernels.

`import internlm2` loads the compiled extension (`internlm2._C`, which registers `torch.ops.internlm2.*`)
and the Python face of the kernels, `internlm2.ops`.
"""

from internlm2._extension import load_extension

_C = load_extension()

from internlm2 import ops  # noqa: E402  (ops need the extension's op registrations)

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
