"""Everything `internlm2 pretrain` imports, from training to TensorBoard logging, the HF export, the sample
and the plots at the end, is installed by the package's core dependencies: a user who runs the README's
first command gets no ModuleNotFoundError after half an hour (the test extras once hid a missing
matplotlib). CI also runs that command in a virtual environment without the test extras (.ci/run)."""

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.train.tiny_run import ROOT, make_data, tiny_config, write_config


def _site_with_only(distributions: set[str], directory: Path) -> Path:
    """A site-packages directory holding only `distributions` (links to their installed files, metadata
    included): a Python started with it instead of its own sees the environment a fresh install of just
    those would give."""
    directory.mkdir()
    for dist in importlib.metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in distributions:
            continue
        for file in dist.files or []:
            top = file.parts[0]
            if top != ".." and top != "__pycache__" and not (directory / top).exists():
                (directory / top).symlink_to(dist.locate_file(top))
    return directory


def _installed_with(requirements: list[str]) -> set[str]:
    """The distributions that installing `requirements` brings in (no extras), transitively."""
    seen, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in requires(req.name) or []]
        except PackageNotFoundError:
            pass  # a requirement that is not installed cannot be what an import found
    return seen


def test_everything_pretrain_imports_comes_with_the_core_dependencies(tmp_path):
    data = make_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", **{
        "stages.0.steps": 2, "stages.1.steps": 1, "eval.every": 2, "checkpoint.export_hf": True,
        "logging.tensorboard": True, "sample": {"prompt": "def ", "max_new_tokens": 4}})
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    site = _site_with_only(_installed_with(core), tmp_path / "site-packages")
    # -S: not this Python's own site-packages; the project itself from the checkout, as an editable install.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-S", "-m", "internlm2.cli", "pretrain", "--config",
                          str(write_config(cfg, tmp_path / "c.yaml"))],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "run"
    assert list((run / "tensorboard").glob("events.*")), f"TensorBoard wrote nothing:\n{out.stderr[-2000:]}"
    assert (run / "metrics.png").is_file() and (run / "hf" / "config.json").is_file()
    assert (run / "sample.txt").is_file()
