"""Data pipeline throughput: tokenizer training, corpus preparation, and the training loader.

    python -m benchmarks.bench_data [--max-bytes 4M] [--repeats 3]

Preparation: tokens/s of `prepare` with 1 and 2 worker processes against a plain single-process loop
that reads the same documents and calls SentencePiece on each (no shards written), for a tokenizer
trained here on the built-in corpus and for InternLM2's released one (when present).

Loader: tokens/s of packed micro-batches (sampler -> rows -> collate, in this process) against the
tokens/s a training step consumes: forward + backward of the tiny model preset (what the demos train)
on the same batch. The loader must never be the bottleneck, so its ratio to the step must stay well
above 1. The curriculum's 4k and 32k rows are timed for the loader alone.
"""

import argparse
import itertools
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch

from benchmarks.harness import Report, median_time
from internlm2.data import (PackedDataset, PreparedDataset, PrepareOptions, ResumableSampler, Tokenizer,
                            collate_packed, prepare, train_tokenizer)
from internlm2.data.errors import Skips
from internlm2.data.prepare_data_cli import parse_size
from internlm2.data.sources import read_texts, resolve_inputs, spans_within
from internlm2.model import InternLM2ForCausalLM, preset_config

REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "internlm2_tokenizer.model"


def corpus_texts(max_bytes: int | None) -> list[str]:
    spans = spans_within(resolve_inputs(["builtin:stdlib"]), max_bytes)
    skips = Skips(fail=False)
    return [text for span in spans for _, text in read_texts(span, "text", skips)]


def with_cpu_time(fn, cpu: list[float]):
    """`fn` that also appends the CPU seconds it used (this process and its workers) to `cpu`: on a shared
    machine, CPU time shows the work done even when other jobs stretch the wall time."""

    def timed():
        before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        fn()
        after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        cpu.append(sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before)))

    return timed


def bench_tokenizer_training(report: Report, texts: list[str], work: Path) -> Tokenizer:
    tokenizer = None
    for vocab in (2048, 8192):
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(texts, work / f"tok{vocab}", vocab)
        report.add("train tokenizer", f"trained {vocab}", "-", time.perf_counter() - t0, "-", "-", "-")
    return tokenizer


def bench_preparation(report: Report, tokenizer: Tokenizer, label: str, max_bytes: int | None, work: Path,
                      repeats: int) -> None:
    sp = spm.SentencePieceProcessor(model_file=tokenizer.source)
    spans = spans_within(resolve_inputs(["builtin:stdlib"]), max_bytes)
    counted = {}

    def plain_loop():
        # the baseline reads the same files and tokenizes document by document, like a naive script
        n = 0
        for span in spans:
            text = Path(span.file.path).read_text(encoding="utf-8")
            if text.strip():  # preparation leaves empty documents out too
                n += len(sp.encode(text, add_bos=True, add_eos=True))
        counted["tokens"] = n

    cpu: list[float] = []
    base = median_time(with_cpu_time(plain_loop, cpu), warmup=1, repeats=repeats)
    tokens = counted["tokens"]
    report.add("prepare", label, "plain SentencePiece loop", base, tokens / base, tokens / statistics.median(cpu), 1.0)
    for workers in (1, 2):
        out = work / f"prep-{label}-{workers}"

        def run():
            shutil.rmtree(out, ignore_errors=True)
            summary = prepare(["builtin:stdlib"], tokenizer, out,
                              PrepareOptions(max_bytes=max_bytes, shard_bytes=512 << 10), workers=workers)
            assert summary["num_tokens"] == tokens, (summary["num_tokens"], tokens)

        cpu = []
        seconds = median_time(with_cpu_time(run, cpu), warmup=1, repeats=repeats)
        report.add("prepare", label, f"prepare, {workers} worker{'s' * (workers > 1)}", seconds, tokens / seconds,
                   tokens / statistics.median(cpu), base / seconds)


def bench_loader(report: Report, prepared: PreparedDataset, vocab_size: int, repeats: int) -> None:
    for seq_len, micro_batch, preset in ((256, 8, "internlm2-tiny"), (1024, 2, "internlm2-tiny"),
                                         (4096, 1, None), (32768, 1, None)):
        rows = PackedDataset(prepared, seq_len)
        sampler = iter(ResumableSampler(len(rows), micro_batch, seed=0))
        batches = itertools.cycle([collate_packed([rows[i] for i in next(sampler)]) for _ in range(4)])

        def load():
            collate_packed([rows[i] for i in next(sampler)])

        tokens = seq_len * micro_batch
        load_s = median_time(load, warmup=3, repeats=max(20, repeats))
        if preset is None:  # the curriculum's lengths: the loader alone (a CPU step would take minutes)
            report.add("loader", f"T={seq_len} B={micro_batch}", "packed rows + collate", load_s, tokens / load_s,
                       "-", "-")
            continue
        model = InternLM2ForCausalLM(preset_config(preset, vocab_size=vocab_size, max_position_embeddings=seq_len))

        def train_step():
            batch = next(batches)
            out = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], position_ids=batch["position_ids"],
                        max_seqlen=batch["max_seqlen"], labels=batch["labels"])
            out.loss.backward()

        step_s = median_time(train_step, warmup=1, repeats=repeats)
        report.add("loader", f"T={seq_len} B={micro_batch}", "packed rows + collate", load_s, tokens / load_s,
                   "-", step_s / load_s)
        report.add("loader", f"T={seq_len} B={micro_batch}", f"{preset} fwd+bwd (the need)", step_s,
                   tokens / step_s, "-", 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-bytes", type=parse_size, default=parse_size("4M"),
                        help="input bytes of the built-in corpus to use (default 4M)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report = Report("data pipeline", ["bench", "case", "what", "median s", "tokens/s", "tokens/cpu-s", "ratio"])
    report.notes += [
        f"built-in corpus (stdlib sources), first {args.max_bytes} bytes; shards of 512 KiB of input",
        "tokens/cpu-s: tokens per CPU second of this process and its workers (median run)",
        "prepare ratio: wall-time speed-up over the plain loop; loader ratio: loader tokens/s over the step's tokens/s "
        "(must stay >> 1)",
    ]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = corpus_texts(args.max_bytes)
        tokenizer = bench_tokenizer_training(report, texts, work)
        bench_preparation(report, tokenizer, "trained 8192", args.max_bytes, work, args.repeats)
        if REAL_TOKENIZER.is_file():
            bench_preparation(report, Tokenizer.load(REAL_TOKENIZER), "InternLM2 92544", args.max_bytes, work,
                              args.repeats)
        else:
            report.notes.append(f"InternLM2's tokenizer not found at {REAL_TOKENIZER}: its rows are missing")
        torch.manual_seed(0)
        bench_loader(report, PreparedDataset(work / "prep-trained 8192-1"), tokenizer.vocab_size, args.repeats)
    report.notes.append(f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
                        f"(other jobs share the {os.cpu_count()} cores: worker speed-ups are bounded by them)")
    report.write("data")


if __name__ == "__main__":
    main()
