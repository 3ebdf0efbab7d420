"""The Python face of internlm2's kernels.

Every op has: the public function (dispatching to `torch.ops.internlm2.*`, CPU or CUDA by the tensors'
device), fake (meta) and autograd registrations so it works under torch.compile and opcheck, and a
`*_reference` in plain PyTorch that serves as the oracle in tests and as the `kernels: reference` path.
"""

from internlm2.ops.rms_norm import rms_norm, rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference"]
