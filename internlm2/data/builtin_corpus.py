"""The built-in corpus: the Python standard library's own sources on this machine.

Every Python install has them, so demos and tests need no download. The file list is fixed (sorted by
path relative to the library root), so a run is reproducible on a given Python version; another
version's library is other text. Left out: installed packages, test suites (some distributions do not
ship them, and some test files are deliberately broken), codec tables (`encodings/`, mostly hex
literals), and files describing this particular build (`_sysconfigdata_*`, `config-*`).
"""

import os
import sysconfig
from pathlib import Path

NAME = "builtin:stdlib"

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The corpus's files, in its fixed order."""
    root = stdlib_root()
    found = []
    for directory, dirs, files in os.walk(root):
        # prune while walking: installed packages alone can be gigabytes
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS and not d.startswith("config-")]
        found += [Path(directory, f).relative_to(root) for f in files
                  if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    return [root / rel for rel in sorted(found, key=lambda p: p.as_posix())]
