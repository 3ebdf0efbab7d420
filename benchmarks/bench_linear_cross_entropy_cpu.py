"""Fused linear cross-entropy vs F.cross_entropy on the full logits, on CPU: time and peak memory.

The shape is InternLM2's output layer (vocab 92544, hidden 2048) over 4096 tokens. Both sides run forward
+ backward into hidden and weight. Peak memory is the growth of the process's resident memory while a
fresh process builds the inputs and runs one step; it is also shown without the inputs and gradients
(the part the fused op exists to shrink: the logits).

    python -m benchmarks.bench_linear_cross_entropy_cpu [--dtypes bfloat16 float32] [--repeats N]
"""

import argparse

import torch

from benchmarks.harness import Report, cpu_peak_memory, load_note, median_time
from internlm2 import ops

TOKENS, HIDDEN, VOCAB = 4096, 2048, 92544


def make_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    # Made in their own dtype: a float32 temporary would dominate the peak-memory numbers.
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=dtype).mul_(HIDDEN**-0.5).requires_grad_()
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    labels[::10] = -100
    return hidden, weight, labels


IMPLEMENTATIONS = {
    "internlm2 linear_cross_entropy": ops.linear_cross_entropy,
    "F.cross_entropy(full logits)": ops.linear_cross_entropy_reference,
}


def step(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    fn(hidden, weight, labels).backward()


def peak_bytes(fn, dtype, run_step: bool) -> int:
    def job():
        h, w, labels = make_inputs(dtype)
        if run_step:
            step(fn, h, w, labels)
        else:  # the inputs and their gradients alone (filled: untouched pages are not resident)
            h.grad, w.grad = torch.empty_like(h).fill_(1), torch.empty_like(w).fill_(1)

    return cpu_peak_memory(job)


def run(dtypes, repeats: int) -> Report:
    report = Report(
        "Linear cross-entropy CPU benchmark",
        ["dtype", "impl", "fwd+bwd s", "speedup vs F.cross_entropy", "peak MiB", "peak vs F.cross_entropy",
         "peak above inputs+grads MiB", "above-inputs vs F.cross_entropy"],
    )
    report.notes.append(load_note())
    report.notes.append(f"tokens {TOKENS}, hidden {HIDDEN}, vocab {VOCAB}, 10% of labels ignored, reduction mean")
    report.notes.append("F.cross_entropy(full logits) = F.cross_entropy((hidden @ weight.T).float(), labels)")
    # Memory first: cpu_peak_memory forks, and a child forked after this process ran OpenMP/MKL threads
    # hangs in its first parallel region.
    peaks = {dtype: {name: peak_bytes(fn, dtype, run_step=True) for name, fn in IMPLEMENTATIONS.items()}
             for dtype in dtypes}
    base = {dtype: peak_bytes(None, dtype, run_step=False) for dtype in dtypes}
    for dtype in dtypes:
        base_bytes = base[dtype]
        rows = {}
        for name, fn in IMPLEMENTATIONS.items():
            h, w, labels = make_inputs(dtype)
            t = median_time(lambda: step(fn, h, w, labels), warmup=1, repeats=repeats)
            del h, w, labels
            rows[name] = (t, peaks[dtype][name])
        t_ref, m_ref = rows["F.cross_entropy(full logits)"]
        for name, (t, m) in rows.items():
            report.add(
                str(dtype).removeprefix("torch."), name, t, t_ref / t, m / 2**20, m / m_ref,
                (m - base_bytes) / 2**20, (m - base_bytes) / (m_ref - base_bytes),
            )
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    run([getattr(torch, d) for d in args.dtypes], args.repeats).write("linear_cross_entropy_cpu")


if __name__ == "__main__":
    main()
