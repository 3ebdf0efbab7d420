"""`internlm2 chat --model HF_DIR`: talk to a chat model in the terminal, or answer a file of conversations.

Interactive: each line you type is a user turn; the answer streams as it is generated and stops at
`<|im_end|>`; the history is kept (`/reset` clears it, `/system TEXT` sets the system prompt, `/exit` or
end of input quits). With tools (`--tool calculator`, or `--tool module:attribute` for your own, see
tools.py), the model is shown their schemas; when it calls one, the call runs and its result goes back
as an environment message, and the model answers on.

Batch: `--input FILE.jsonl` (records `{"messages": [...]}` ending with a user or environment turn)
answers every conversation, `--batch-size` at a time on the KV cache, and writes one JSON line per record
in input order, `{"messages": [...the input and the new turns...], "finish_reason": ...}`, to `--output`
or stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint directory with its tokenizer")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--tool", action="append", default=[], metavar="NAME|MODULE:ATTR",
                        help="a tool the model may call (built in: calculator); repeatable")
    parser.add_argument("--input", help="JSONL of conversations to answer (batch mode)")
    parser.add_argument("--output", help="batch mode: where to write the answers (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch mode: conversations per generation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="per assistant turn")
    parser.add_argument("--max-tool-rounds", type=int, default=3, help="tool calls answered per user turn")
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=0.9, help="1: off")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: the checkpoint's)")


def _conversations(path: Path, system):
    """The batch file's conversations (each checked: roles in order, ending where the model answers)."""
    from internlm2.data.chat import Message, check_order, parse_messages
    from internlm2.data.errors import DataError, Skips
    from internlm2.data.sources import InputFile, Span, read_records

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out = []
    for where, record in read_records(Span(InputFile.of(path), 0, path.stat().st_size), Skips(fail=True)):
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f'{where}: a record is {{"messages": [...]}}')
        messages = parse_messages(record["messages"], str(where))
        if system is not None and messages[0].role != "system":
            messages.insert(0, Message("system", system))
        check_order(messages, ("user", "environment"), str(where))
        out.append(messages)
    if not out:
        raise DataError(f"{path}: no conversations")
    return out


def _as_json(messages) -> list[dict]:
    return [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})} for m in messages]


class _Stream:
    """Prints one conversation's tokens as text while they are generated (a piece that ends inside a UTF-8
    character waits for the rest)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.stops = {tokenizer.special_id("<|im_end|>"), tokenizer.eos_id}
        self.tokens: list[int] = []
        self.shown = 0

    def __call__(self, _conversation: int, token: int) -> None:
        if token in self.stops:
            self.out.write("\n")
            self.tokens, self.shown = [], 0
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)


def _interactive(model, tokenizer, params, toolbox, args, generator) -> None:
    from internlm2.chat.session import respond
    from internlm2.data.chat import Message

    def fresh(system):
        first = [Message("system", system)] if system else []
        return toolbox.declare(first) if toolbox else first

    system = args.system
    history = fresh(system)
    stream = _Stream(tokenizer, sys.stdout)
    tools = f" tools: {', '.join(toolbox.tools)}." if toolbox else ""
    print(f"chatting with {args.model}.{tools} /reset, /system TEXT, /exit", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset" or line.startswith("/system "):
            system = line.removeprefix("/system ").strip() if line.startswith("/system ") else system
            history = fresh(system)
            print("(new conversation)" if line.strip() == "/reset" else "(system prompt set; new conversation)")
            continue
        history.append(Message("user", line))
        print("assistant> ", end="", flush=True)
        reply = respond(model, tokenizer, [history], params, toolbox=toolbox, max_tool_rounds=args.max_tool_rounds,
                        generator=generator, on_token=stream)[0]
        for m in reply.messages:
            if m.role == "environment":
                print(f"[tool] {m.content}\nassistant> ", end="", flush=True)
        if reply.finish_reason != "stop":
            print(f"\n({reply.finish_reason})")
        history += reply.messages


def run(args: argparse.Namespace) -> int:
    import torch

    from internlm2.chat.session import respond
    from internlm2.chat.tools import Toolbox, load_tool
    from internlm2.data import Tokenizer
    from internlm2.errors import UserError
    from internlm2.model.generation import SamplingParams
    from internlm2.model.pretrained import load_pretrained

    directory = Path(args.model)
    if not (directory / "tokenizer.model").is_file():
        raise UserError(f"{directory} has no tokenizer.model: chat needs the model's tokenizer beside it")
    if args.batch_size < 1 or args.max_tool_rounds < 0:
        raise UserError("--batch-size must be >= 1 and --max-tool-rounds >= 0")
    tokenizer = Tokenizer.load(directory)
    toolbox = Toolbox([load_tool(spec) for spec in args.tool]) if args.tool else None
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p)
    except ValueError as err:
        raise UserError(str(err)) from None
    conversations = _conversations(Path(args.input), args.system) if args.input else None
    model = load_pretrained(directory, dtype=getattr(torch, args.dtype) if args.dtype else None).eval()
    generator = torch.Generator().manual_seed(args.seed)
    if conversations is None:
        _interactive(model, tokenizer, params, toolbox, args, generator)
        return 0
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for start in range(0, len(conversations), args.batch_size):
            batch = conversations[start:start + args.batch_size]
            if toolbox is not None:
                batch = [toolbox.declare(c) for c in batch]
            for conversation, reply in zip(batch, respond(model, tokenizer, batch, params, toolbox=toolbox,
                                                          max_tool_rounds=args.max_tool_rounds, generator=generator)):
                out.write(json.dumps({"messages": _as_json(conversation + reply.messages),
                                      "finish_reason": reply.finish_reason}) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0

