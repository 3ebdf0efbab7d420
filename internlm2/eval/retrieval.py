"""The retrieval grid shared by `eval needle` and `eval passkey`: every (length, depth, repeat) cell is a
prompt with a random key hidden at that depth; the model answers greedily; the answer is scored.

Scores per cell, on the answer with leading whitespace stripped:
- exact: the answer starts with the key, and the key is not the start of a longer word or number;
- partial: the fraction of the key's characters the answer has at the same places (a 7-digit key with
  one digit wrong scores 6/7).

Cells of one length are answered in batches (`--batch-size` prompts per `generate` call). Results:
`<out>/<task>.json` (settings, every cell with its key and answer, the means per depth x length and
per length) and `<out>/<task>.png` (the depth x length heatmaps of both scores).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from internlm2.eval import EvalError
from internlm2.eval.haystack import Prompt


@dataclass(frozen=True)
class Cell:
    length: int
    depth: float
    repeat: int


@dataclass
class CellResult:
    length: int
    depth: float
    repeat: int
    key: str
    answer: str
    exact: float
    partial: float
    needle_depth: float  # where the needle landed (the nearest unit boundary to `depth`)


@dataclass(frozen=True)
class Task:
    """An evaluation on the grid: how a cell's prompt is made for a key, how keys are drawn, and the
    settings that describe it in the results."""

    name: str
    prompt: Callable[[Cell, str], Prompt]
    key: Callable[[random.Random], str]
    settings: dict


# prompts -> answers (token ids): the model's greedy decoding, or a stand-in in tests
Answerer = Callable[[list[list[int]], int], list[list[int]]]


def exact_match(answer: str, key: str) -> float:
    return float(re.match(re.escape(key) + r"(?!\w)", answer.lstrip()) is not None)


def partial_match(answer: str, key: str) -> float:
    answer = answer.lstrip()
    return sum(a == k for a, k in zip(answer, key)) / len(key)


def random_digits(rng: random.Random, digits: int) -> str:
    """A number of exactly `digits` digits (no leading zero)."""
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def cell_key(task: Task, cell: Cell, seed: int) -> str:
    """The cell's key, the same on every run with the same seed."""
    return task.key(random.Random(f"{seed}:{task.name}:{cell.length}:{cell.depth}:{cell.repeat}"))


def grid(lengths: Sequence[int], depths: Sequence[float], repeats: int) -> list[Cell]:
    """Every (length, depth, repeat) cell, by length (depths are checked where prompts are made)."""
    bad = [n for n in lengths if n < 1]
    if bad or repeats < 1:
        raise EvalError(f"--lengths must be positive and --repeats at least 1, got lengths {bad} repeats {repeats}")
    return [Cell(n, d, r) for n in sorted(set(lengths)) for d in depths for r in range(repeats)]


def make_prompts(task: Task, cells: Sequence[Cell], seed: int = 0) -> dict[Cell, tuple[str, Prompt]]:
    """Every cell's key and prompt (made before any model time is spent, so a bad cell fails first)."""
    prompts = {}
    for cell in cells:
        key = cell_key(task, cell, seed)
        prompts[cell] = (key, task.prompt(cell, key))
    return prompts


def run_grid(task: Task, prompts: dict[Cell, tuple[str, Prompt]], answerer: Answerer, tokenizer, *,
             batch_size: int = 8, progress: bool = True) -> list[CellResult]:
    """Answers and scores every cell, `batch_size` cells of one length per answerer call."""
    from tqdm import tqdm

    results = []
    with tqdm(total=len(prompts), desc=f"eval {task.name}", unit="cell", disable=not progress) as bar:
        for length in sorted({c.length for c in prompts}):
            same = [c for c in prompts if c.length == length]
            for start in range(0, len(same), batch_size):
                batch = same[start:start + batch_size]
                keys = [prompts[c][0] for c in batch]
                max_new = max(len(tokenizer.encode(" " + k)) for k in keys) + 2
                answers = answerer([prompts[c][1].tokens for c in batch], max_new)
                for cell, key, ids in zip(batch, keys, answers):
                    text = tokenizer.decode(ids)
                    results.append(CellResult(cell.length, cell.depth, cell.repeat, key, text,
                                              exact_match(text, key), partial_match(text, key),
                                              round(prompts[cell][1].depth, 2)))
                bar.set_postfix(length=length)
                bar.update(len(batch))
    return results


def summarize(results: Sequence[CellResult]) -> dict:
    """Means of both scores per (depth, length) and per length."""
    lengths = sorted({r.length for r in results})
    depths = sorted({r.depth for r in results})

    def mean(score, pick):
        values = [getattr(r, score) for r in results if pick(r)]
        return sum(values) / len(values)

    out = {}
    for score in ("exact", "partial"):
        out[score] = [[mean(score, lambda r, d=d, n=n: r.depth == d and r.length == n) for n in lengths]
                      for d in depths]
        out[f"{score}_by_length"] = {str(n): mean(score, lambda r, n=n: r.length == n) for n in lengths}
        out[f"{score}_mean"] = mean(score, lambda r: True)
    return {"lengths": lengths, "depths": depths, **out}


def write_results(out_dir: Path, task: Task, results: Sequence[CellResult], settings: dict) -> tuple[Path, Path]:
    from internlm2.eval.plots import heatmaps

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    path = out_dir / f"{task.name}.json"
    payload = {"task": task.name, "settings": {**settings, **task.settings}, "summary": summary,
               "cells": [asdict(r) for r in results]}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    png = heatmaps(summary, f"{task.name}: {settings.get('model', '')}", out_dir / f"{task.name}.png")
    return path, png


def length_list(text: str) -> list[int]:
    """`1024,2k,4K` -> [1024, 2048, 4096]."""
    lengths = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = 1024 if part.endswith("k") else 1
        try:
            lengths.append(int(part.removesuffix("k")) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated token counts like 1024,2k") from None
    return lengths


def depth_list(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated percentages like 0,50,100") from None


def add_grid_arguments(parser: argparse.ArgumentParser, lengths: str) -> None:
    from internlm2.eval.model_access import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--lengths", type=length_list, default=length_list(lengths),
                        help=f"prompt lengths in the model's tokens (default {lengths})")
    parser.add_argument("--depths", type=depth_list, default=depth_list("0,25,50,75,100"),
                        help="needle depths in percent of the haystack (default 0,25,50,75,100)")
    parser.add_argument("--repeats", type=int, default=2, help="prompts per cell, each with its own key (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts of one length per generate call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys")
    parser.add_argument("--out", help="output directory (default: eval_TASK)")
    parser.add_argument("--no-progress", action="store_true")


def run_command(args: argparse.Namespace, name: str, make_task: Callable) -> int:
    """`eval needle` / `eval passkey`: checks everything that can be checked before loading the model
    (the checkpoint, the grid, the corpus, the memory estimate, every prompt), then runs the grid and
    writes the results.
    `make_task(args, tokenizer)` builds the task."""
    from internlm2.eval.memory import check_fits, estimate
    from internlm2.eval.model_access import Checkpoint, GreedyAnswerer

    try:
        if args.batch_size < 1:
            raise EvalError(f"--batch-size must be at least 1, got {args.batch_size}")
        cells = grid(args.lengths, args.depths, args.repeats)
        checkpoint = Checkpoint(args)
        task = make_task(args, checkpoint.tokenizer)
        longest = max(args.lengths)
        batch = min(args.batch_size, len(args.depths) * args.repeats)
        need = estimate(checkpoint.config, length=longest, batch=batch, new_tokens=32, dtype=checkpoint.dtype)
        what = f"length {longest} with batch size {batch}"
        check_fits(need, checkpoint.device, what)
        prompts = make_prompts(task, cells, args.seed)
    except EvalError as err:
        print(f"internlm2 eval {name}: {err}", file=sys.stderr)
        return 1
    print(f"eval {name}: {len(cells)} cells; {what} needs {need.describe()}", flush=True)
    tokenizer = checkpoint.tokenizer
    answerer = GreedyAnswerer(checkpoint.load(), tuple(i for i in (tokenizer.eos_id,) if i >= 0))
    results = run_grid(task, prompts, answerer, tokenizer, batch_size=args.batch_size, progress=not args.no_progress)
    settings = {**checkpoint.describe(), "lengths": sorted(set(args.lengths)), "depths": args.depths,
                "repeats": args.repeats, "seed": args.seed}
    path, png = write_results(Path(args.out or f"eval_{name}"), task, results, settings)
    summary = summarize(results)
    for n in summary["lengths"]:
        print(f"  length {n:>7}: exact {summary['exact_by_length'][str(n)]:.3f}  "
              f"partial {summary['partial_by_length'][str(n)]:.3f}")
    print(f"wrote {path} and {png}")
    return 0
