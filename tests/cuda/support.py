"""Helpers for the CUDA kernel tests: the registration check (runs on every machine, GPU or not) and
replay of an op inside a captured CUDA graph."""

import os

import pytest
import torch

import internlm2


def assert_registered_for_cuda(*op_names: str) -> None:
    """Each `internlm2::<name>` op has a CUDA kernel in this build (a dispatch-table check: no GPU needed).

    Skips when the extension was built without CUDA kernels, unless INTERNLM2_EXPECT_CUDA_KERNELS=1 (CI),
    where a build that silently dropped them fails.
    """
    if not internlm2._C.with_cuda:
        if os.environ.get("INTERNLM2_EXPECT_CUDA_KERNELS") == "1":
            pytest.fail("INTERNLM2_EXPECT_CUDA_KERNELS=1 but the extension was built without CUDA kernels")
        pytest.skip("extension built without CUDA kernels")
    for name in op_names:
        op = f"internlm2::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"


def run_in_cuda_graph(fn, *inputs):
    """Captures fn(*static inputs) in a CUDA graph, then replays it on `inputs` copied into the static
    buffers; returns the replay's outputs (cloned). Ops that synchronise with the host fail to capture."""
    static = [t.clone() for t in inputs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*[t.clone() for t in static])  # warm-up outside the graph (lazy initialisation, kernel attributes)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static)
    for dst, src in zip(static, inputs):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    return tuple(o.clone() for o in outputs)
