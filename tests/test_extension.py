"""The compiled extension: how it loads, how it fails, and what `internlm2 env` reports."""

import importlib
import json
import subprocess
import sys
import types

import pytest
import torch

import internlm2
from internlm2 import _extension
from internlm2.cli import main as cli_main


def test_env_reports_every_op_and_its_backends():
    out = subprocess.run([sys.executable, "-m", "internlm2.env", "--json"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__
    assert info["extension"]["built_for_torch"] == torch.__version__.split("+")[0]
    assert "CPU" in info["ops"]["internlm2::rms_norm_forward"]
    if internlm2._C.with_cuda:
        assert "CUDA" in info["ops"]["internlm2::rms_norm_forward"]


def test_cli_env_prints_the_report(capsys):
    assert cli_main(["env"]) == 0
    out = capsys.readouterr().out
    assert "internlm2::rms_norm_forward" in out and f"torch          {torch.__version__}" in out


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit):
        cli_main(["no-such-command"])


def _failing_import(message):
    def fake_import(name, *args, **kwargs):
        if name == "internlm2._C":
            raise ImportError(message)
        return importlib.import_module(name, *args, **kwargs)

    return fake_import


def test_extension_built_for_another_torch_says_which_and_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(_extension, "read_build_meta", lambda: {"torch": "2.9.0+cu128"})
    monkeypatch.setattr(_extension.importlib, "import_module", _failing_import("undefined symbol: _ZN3c105Error"))
    with pytest.raises(ImportError) as err:
        _extension.load_extension()
    msg = str(err.value)
    assert "built for torch 2.9.0+cu128" in msg and torch.__version__ in msg
    assert _extension.REBUILD_COMMAND in msg


def test_missing_extension_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", tmp_path)  # no _C*.so, no build metadata here
    monkeypatch.setattr(_extension.importlib, "import_module", _failing_import("No module named 'internlm2._C'"))
    with pytest.raises(ImportError, match="is not built") as err:
        _extension.load_extension()
    assert _extension.REBUILD_COMMAND in str(err.value)


def test_extension_that_loads_but_reports_another_torch_is_refused(monkeypatch):
    fake = types.SimpleNamespace(torch_version="2.9.0")
    monkeypatch.setattr(_extension.importlib, "import_module", lambda name: fake)
    with pytest.raises(ImportError, match="built for torch 2.9.0"):
        _extension.load_extension()
