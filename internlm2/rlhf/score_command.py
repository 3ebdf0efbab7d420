"""`internlm2 score --model DIR --input FILE.jsonl [--condition NAME]`: a reward model's score of each
conversation, one JSON line per input line, in order.

Input lines: a conversation as a list of messages (`[{"role": "user", "content": ...}, {"role":
"assistant", ...}]`), or an object `{"messages": [...], "condition": NAME}`. `--condition` applies to
lines that name none. Conditions are the reward model's own (`conditions.json` in its directory) unless
`--conditions FILE` gives others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="reward model: an HF directory (InternLM2ForRewardModel)")
    parser.add_argument("--input", required=True, help="JSONL of conversations")
    parser.add_argument("--condition", help="domain whose system prompt the reward model sees (default: none)")
    parser.add_argument("--conditions", help="JSON file of condition name -> system prompt (default: the model's)")
    parser.add_argument("--output", help="write the scores here instead of standard output")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward pass")
    parser.add_argument("--kernels", choices=("fused", "reference"), default="fused")


def _conversations(path: Path, default_condition: str | None):
    from internlm2.data.chat import parse_messages
    from internlm2.data.errors import DataError

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not JSON ({err.msg})") from None
        condition = default_condition
        if isinstance(record, dict):
            if "messages" not in record or set(record) - {"messages", "condition"}:
                raise DataError(f"{where}: expected a list of messages or {{messages, condition}}")
            condition = record.get("condition", default_condition)
            record = record["messages"]
        yield where, parse_messages(record, where), condition


def run(args: argparse.Namespace) -> int:
    from internlm2.data import Tokenizer
    from internlm2.model import InternLM2ForScore, load_pretrained
    from internlm2.rlhf.scorer import CONDITIONS_FILE, Scorer, read_conditions
    from internlm2.errors import UserError

    model = load_pretrained(args.model, kernels=args.kernels).eval()
    if not isinstance(model, InternLM2ForScore):
        raise UserError(f"{args.model} is a {type(model).__name__}, not a reward model")
    conditions = read_conditions(Path(args.conditions) if args.conditions else Path(args.model) / CONDITIONS_FILE,
                                 required=bool(args.conditions))
    scorer = Scorer(model, Tokenizer.load(args.model), conditions, batch_tokens=args.batch_tokens)
    items = list(_conversations(Path(args.input), args.condition))
    scores = scorer.score_tokens([scorer.tokens(messages, condition, where) for where, messages, condition in items])
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for (_, _, condition), score in zip(items, scores.tolist()):
            out.write(json.dumps({"score": score, "condition": condition}) + "\n")
    finally:
        if args.output:
            out.close()
    return 0
