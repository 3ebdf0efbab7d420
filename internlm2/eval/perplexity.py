"""`internlm2 eval perplexity --model DIR --data PREPARED --seq-len L`: mean loss by token position, the
curve long-context work reads (does the loss keep falling as the model sees more of a document, and
where does it turn up past the trained length?).

Each of the first `--docs` documents with at least L + 1 tokens contributes its first L positions (the
target of position t is token t + 1), so position means position in the document. The positions are
grouped into `--buckets` equal buckets. Writes `<out>/perplexity.json` and `<out>/perplexity.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from internlm2.eval import EvalError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from internlm2.eval.model_access import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="a prepared dataset (`internlm2 prepare-data` output)")
    parser.add_argument("--seq-len", type=int, required=True, help="positions per document")
    parser.add_argument("--docs", type=int, default=32, help="documents to average over (default 32)")
    parser.add_argument("--buckets", type=int, default=16, help="position buckets (default 16)")
    parser.add_argument("--batch-size", type=int, default=4, help="documents per forward pass")
    parser.add_argument("--out", help="output directory (default: eval_perplexity)")


def long_documents(data, seq_len: int, limit: int) -> list[int]:
    """The first `limit` documents with at least seq_len + 1 tokens."""
    lengths = np.concatenate([np.diff(shard.offsets) for shard in data.shards])
    found = np.flatnonzero(lengths >= seq_len + 1)[:limit]
    if found.size == 0:
        raise EvalError(f"{data.path}: no document has --seq-len + 1 = {seq_len + 1} tokens (the longest has "
                        f"{int(lengths.max())}); use a smaller --seq-len or longer documents")
    return found.tolist()


def bucket_edges(seq_len: int, buckets: int) -> list[int]:
    return [round(i * seq_len / buckets) for i in range(buckets + 1)]


def position_losses(model, data, docs: list[int], seq_len: int, batch_size: int) -> np.ndarray:
    """Loss (nats) at every position [docs, seq_len]."""
    import torch

    device = model.output.weight.device
    rows = []
    with torch.no_grad():
        for start in range(0, len(docs), batch_size):
            tokens = [data.document(i)[0][: seq_len + 1].astype(np.int64) for i in docs[start:start + batch_size]]
            ids = torch.from_numpy(np.concatenate([t[:-1] for t in tokens])).to(device)
            labels = torch.from_numpy(np.concatenate([t[1:] for t in tokens])).to(device)
            cu = torch.arange(0, len(tokens) + 1, dtype=torch.int32, device=device) * seq_len
            out = model(ids, cu_seqlens=cu, max_seqlen=seq_len, labels=labels, loss_reduction="none",
                        return_logits=False)
            rows.append(out.loss.float().view(len(tokens), seq_len).cpu().numpy())
    return np.concatenate(rows)


def summarize(losses: np.ndarray, buckets: int) -> dict:
    edges = bucket_edges(losses.shape[1], buckets)
    by_position = losses.mean(axis=0)
    return {
        "mean_loss": float(losses.mean()),
        "buckets": [{"start": a, "end": b, "mean_loss": float(by_position[a:b].mean())}
                    for a, b in zip(edges[:-1], edges[1:]) if b > a],
    }


def run(args: argparse.Namespace) -> int:
    from internlm2.data.errors import DataError
    from internlm2.data.prepared import PreparedDataset
    from internlm2.eval.memory import check_fits, estimate
    from internlm2.eval.model_access import Checkpoint
    from internlm2.eval.plots import loss_by_position

    try:
        for name in ("seq_len", "docs", "buckets", "batch_size"):
            if getattr(args, name) < 1:
                raise EvalError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        if args.buckets > args.seq_len:
            raise EvalError(f"--buckets {args.buckets} is more than the {args.seq_len} positions")
        checkpoint = Checkpoint(args)
        try:
            data = PreparedDataset(args.data, checkpoint.tokenizer.fingerprint)
        except DataError as err:
            raise EvalError(str(err)) from None
        docs = long_documents(data, args.seq_len, args.docs)
        batch = min(args.batch_size, len(docs))
        need = estimate(checkpoint.config, length=args.seq_len, batch=batch, new_tokens=0, dtype=checkpoint.dtype,
                        kv_cache=False, all_logits=checkpoint.config.kernels == "reference")
        what = f"--seq-len {args.seq_len} with batch size {batch}"
        check_fits(need, checkpoint.device, what)
    except EvalError as err:
        print(f"internlm2 eval perplexity: {err}", file=sys.stderr)
        return 1
    print(f"eval perplexity: {len(docs)} documents; {what} needs {need.describe()}", flush=True)
    losses = position_losses(checkpoint.load(), data, docs, args.seq_len, args.batch_size)
    summary = summarize(losses, args.buckets)
    out_dir = Path(args.out or "eval_perplexity")
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"task": "perplexity", "settings": {**checkpoint.describe(), "data": str(args.data),
                                                  "seq_len": args.seq_len, "docs": len(docs)}, **summary}
    path = out_dir / "perplexity.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    png = loss_by_position(summary["buckets"], f"loss by position: {checkpoint.directory}", out_dir / "perplexity.png")
    for b in summary["buckets"]:
        print(f"  positions {b['start']:>7}-{b['end'] - 1:<7} loss {b['mean_loss']:.4f} "
              f"(ppl {math.exp(min(b['mean_loss'], 50)):.2f})")
    print(f"wrote {path} and {png}")
    return 0
