"""What a build compiles (CUDA kernels only for a visible GPU or named architectures), the plan printed
before building, and the message a build without CUDA kernels gives at the first op on a CUDA tensor."""

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import internlm2
from internlm2 import _build_plan as bp
from internlm2._extension import guard_cuda_calls, missing_cuda_kernels_message

ROOT = Path(__file__).resolve().parents[1]
TOOLKIT = Path("/opt/cuda-13")
H100 = bp.VisibleGpu("nvidia-smi lists NVIDIA H100", "90a")


@pytest.mark.parametrize(
    "environ, torch_cuda, cuda_home, gpu, archs, reason",
    [
        ({}, "13.0", TOOLKIT, None, "", "no GPU is visible"),  # the 2-core laptop: no 30-minute CUDA build
        ({"INTERNLM2_CUDA_ARCHS": "80;90a"}, "13.0", TOOLKIT, None, "80;90a", "INTERNLM2_CUDA_ARCHS=80;90a"),
        ({}, "13.0", TOOLKIT, H100, "90a", "nvidia-smi lists NVIDIA H100"),  # only the card at hand
        ({"INTERNLM2_CUDA_ARCHS": "80"}, "13.0", TOOLKIT, H100, "80", "INTERNLM2_CUDA_ARCHS=80"),
        ({}, "13.0", TOOLKIT, bp.VisibleGpu("/dev/nvidia0 exists", None), bp.DEFAULT_ARCHS, "/dev/nvidia0"),
        ({"INTERNLM2_SKIP_CUDA": "1", "INTERNLM2_CUDA_ARCHS": "90a"}, "13.0", TOOLKIT, H100, "",
         "INTERNLM2_SKIP_CUDA is set"),
        ({"INTERNLM2_CUDA_ARCHS": "90a"}, None, TOOLKIT, H100, "", "torch is a CPU-only build"),
        ({"INTERNLM2_CUDA_ARCHS": "90a"}, "13.0", None, H100, "", "nvcc was not found"),
    ],
)
def test_cuda_kernels_are_built_for_a_visible_gpu_or_named_architectures(environ, torch_cuda, cuda_home, gpu,
                                                                          archs, reason):
    plan = bp.decide(environ, torch_cuda, cuda_home, gpu)
    assert plan.cuda_archs == archs and plan.with_cuda == bool(archs)
    assert reason in plan.reason


def _fake_nvidia_smi(tmp_path, output: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")
    smi.chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize(
    "listing, archs",
    [
        ("NVIDIA H200, 9.0", "90a"),
        ("NVIDIA A100-SXM4-80GB, 8.0\nNVIDIA H100 80GB HBM3, 9.0", "80;90a"),
        ("NVIDIA GeForce RTX 3090, 8.6", "80"),  # sm_80 code runs on every 8.x card
        ("NVIDIA B200, 10.0", None),  # not told apart: the default archs are built
    ],
)
def test_nvidia_smi_listing_gives_the_architectures_of_the_cards(tmp_path, listing, archs):
    gpu = bp.find_visible_gpu(path=_fake_nvidia_smi(tmp_path, listing), device_node=str(tmp_path / "none"))
    assert gpu is not None and gpu.archs == archs
    assert listing.split(",")[0] in gpu.evidence


def test_no_gpu_when_nvidia_smi_lists_none_and_there_is_no_device_node(tmp_path):
    path = _fake_nvidia_smi(tmp_path, "No devices were found")
    assert bp.find_visible_gpu(path=path, device_node=str(tmp_path / "none")) is None
    assert bp.find_visible_gpu(path=str(tmp_path / "empty"), device_node=str(tmp_path / "none")) is None
    node = tmp_path / "nvidia0"
    node.touch()
    assert bp.find_visible_gpu(path=path, device_node=str(node)) == bp.VisibleGpu(f"{node} exists", None)


def test_the_plan_says_what_is_built_why_and_about_how_long():
    cpu = bp.BuildPlan("", "no GPU is visible").describe(jobs=2, cores=2)
    assert cpu.startswith("internlm2: building CPU kernels only: about")
    assert "because no GPU is visible; set INTERNLM2_CUDA_ARCHS" in cpu
    both = bp.BuildPlan("80;90a", "INTERNLM2_CUDA_ARCHS=80;90a").describe(jobs=2, cores=2)
    assert "CUDA kernels for sm_80, sm_90a" in both
    minutes = (bp.CPU_KERNELS_CPU_MIN + 2 * bp.CUDA_KERNELS_CPU_MIN_PER_ARCH) / 2
    assert f"about {round(minutes)} min with 2 compile job(s) on 2 core(s)" in both
    # More jobs than cores do not make the build faster.
    assert bp.BuildPlan("90a", "x").estimate_minutes(jobs=8, cores=2) == bp.BuildPlan("90a", "x").estimate_minutes(2, 2)


def test_the_plan_script_runs_before_the_package_can_be_imported():
    # install.sh runs it before pip builds anything; it must not import internlm2 (whose __init__ loads _C).
    out = subprocess.run([sys.executable, "internlm2/_build_plan.py"], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "INTERNLM2_SKIP_CUDA": "1", "MAX_JOBS": "3"}, check=True)
    assert out.stdout.startswith("internlm2: building CPU kernels only: about")
    assert "with 3 compile job(s)" in out.stdout and "because INTERNLM2_SKIP_CUDA is set" in out.stdout


@pytest.mark.parametrize(
    "capability, expected",
    [
        ((9, 0), "    INTERNLM2_CUDA_ARCHS=90a ./scripts/install.sh"),
        ((8, 6), "    INTERNLM2_CUDA_ARCHS=80 ./scripts/install.sh"),
        ((10, 0), "This GPU (sm_100) has none of our kernels"),
    ],
)
def test_missing_cuda_kernels_message_names_the_rebuild_for_this_gpu(capability, expected):
    msg = missing_cuda_kernels_message("internlm2::rms_norm_forward", "no GPU visible", capability)
    assert msg.startswith("internlm2::rms_norm_forward was called on a CUDA tensor, but internlm2._C was built "
                          "without CUDA kernels (no GPU visible).")
    assert expected in msg and "--set model.kernels=reference" in msg


def _cuda_call(op, *args):
    """Calls `op`'s CUDA kernel on CPU tensors: the dispatch a CUDA tensor would take, without a GPU."""
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


def test_guard_gives_ops_without_a_cuda_kernel_one_that_says_how_to_rebuild():
    ns = f"guard_test_{uuid.uuid4().hex[:8]}"
    defs = torch.library.Library(ns, "DEF")
    defs.define("cpu_only(Tensor x) -> Tensor")
    defs.define("both(Tensor x) -> Tensor")
    defs.impl("cpu_only", lambda x: x + 1, "CPU")
    defs.impl("both", lambda x: x + 2, "CPU")
    defs.impl("both", lambda x: x + 3, "CUDA")
    guard = guard_cuda_calls(ns, "no GPU visible")
    ops = getattr(torch.ops, ns)
    with pytest.raises(RuntimeError, match=rf"{ns}::cpu_only was called on a CUDA tensor.*no GPU visible"):
        _cuda_call(ops.cpu_only.default, torch.zeros(2))
    assert _cuda_call(ops.both.default, torch.zeros(2)).tolist() == [3.0, 3.0]  # a real kernel stays
    assert ops.cpu_only(torch.zeros(2)).tolist() == [1.0, 1.0]  # CPU untouched
    del guard, defs


def test_a_build_without_cuda_kernels_guards_every_op():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("internlm2::")]
    assert names
    if internlm2._C.with_cuda:
        assert internlm2._cuda_guard is None  # the real kernels answer
        return
    x, w = torch.ones(2, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match=r"internlm2::rms_norm_forward was called on a CUDA tensor"):
        _cuda_call(torch.ops.internlm2.rms_norm_forward.default, x, w, 1e-5)
    assert all(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA") for n in names)
