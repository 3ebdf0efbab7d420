"""RMSNorm: internlm2's kernel vs the eager composite and torch.nn.functional.rms_norm.

CPU: time of forward and forward+backward, ratios against both baselines in the same run.
CUDA: the same, plus achieved bandwidth (bytes the op must move / time) and its fraction of the device's
measured copy bandwidth.

    python -m benchmarks.bench_rms_norm [--device cpu|cuda] [--repeats N]
"""

import argparse

import torch
import torch.nn.functional as F

from benchmarks.harness import Report, measured_copy_bandwidth, median_time, write_partial_results_on_sigterm
from internlm2 import ops

SHAPES = [(4096, 4096), (16384, 2048)]
EPS = 1e-5


def implementations():
    return {
        "internlm2": lambda x, w: ops.rms_norm(x, w, EPS),
        "eager composite": lambda x, w: ops.rms_norm_reference(x, w, EPS),
        "F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
    }


def bytes_moved(rows: int, hidden: int, itemsize: int, backward: bool) -> int:
    fwd = (2 * rows * hidden + hidden) * itemsize + 4 * rows  # x, y, w, rstd
    bwd = (3 * rows * hidden + 2 * hidden) * itemsize + 4 * rows  # dy, x, dx, w, dw, rstd
    return fwd + (bwd if backward else 0)


def run(device: str, repeats: int) -> Report:
    cols = ["shape", "dtype", "pass", "impl", "ms", "speedup vs eager", "speedup vs F.rms_norm"]
    copy_bw = None
    if device == "cuda":
        cols += ["GB/s", "% of copy BW"]
        copy_bw = measured_copy_bandwidth(device)
    report = Report("RMSNorm kernel benchmark", cols)
    if copy_bw:
        report.notes.append(f"measured device copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    report.notes.append("eager composite = x.float() * rsqrt(mean(x.float()^2) + eps) * w, cast back (HF style)")
    for rows, hidden in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, hidden, device=device, dtype=dtype)
            w = torch.randn(hidden, device=device, dtype=dtype)
            dy = torch.randn_like(x)
            for backward in (False, True):
                times = {}
                for name, fn in implementations().items():
                    if backward:
                        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

                        def step(fn=fn, xg=xg, wg=wg):
                            xg.grad = wg.grad = None
                            fn(xg, wg).backward(dy)
                    else:

                        def step(fn=fn):
                            with torch.no_grad():
                                fn(x, w)

                    times[name] = median_time(step, device, repeats=repeats)
                for name, t in times.items():
                    row = [
                        f"{rows}x{hidden}", str(dtype).removeprefix("torch."), "fwd+bwd" if backward else "fwd",
                        name, t * 1e3, times["eager composite"] / t, times["F.rms_norm"] / t,
                    ]
                    if copy_bw:
                        bw = bytes_moved(rows, hidden, x.element_size(), backward) / t
                        row += [bw / 1e9, 100 * bw / copy_bw]
                    report.add(*row)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    write_partial_results_on_sigterm("rms_norm")
    run(args.device, args.repeats).write("rms_norm")


if __name__ == "__main__":
    main()
