"""When no CUDA kernel was built for an input (a dtype or head dim outside the instantiations), an op runs
its plain-PyTorch reference instead: correct and slower, and said once per case, never silently."""

import warnings


class KernelFallbackWarning(UserWarning):
    """An op ran its reference instead of its CUDA kernel (the message names the op and why)."""


_cases_taken: set[tuple[str, str]] = set()


def note_fallback(op: str, reason: str) -> None:
    """Records that `op` runs its reference for `reason`; warns the first time each (op, reason) occurs."""
    if (op, reason) in _cases_taken:
        return
    _cases_taken.add((op, reason))
    warnings.warn(
        f"internlm2.ops.{op}: {reason}; running its plain-PyTorch reference instead (correct, slower)",
        KernelFallbackWarning,
        stacklevel=3,
    )


def fallbacks_taken() -> list[tuple[str, str]]:
    """Every (op, reason) for which an op has run its reference instead of its kernel in this process."""
    return sorted(_cases_taken)
