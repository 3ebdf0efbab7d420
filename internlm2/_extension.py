"""Loads `internlm2._C` and turns every way it can fail into an ImportError that says how to fix it."""

import importlib
import json
from pathlib import Path

import torch  # noqa: F401  (libtorch must be loaded before the extension that links against it)

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
