"""`internlm2 <command>`: every user-facing entry point.

Each command lives in its own module with `add_arguments(parser)` and `run(args) -> int | None`, or is a
group whose module has its own `COMMANDS` table (`internlm2 eval TASK`); only the chosen command's module
is imported, so `internlm2 --help` is instant.

A user's mistake (`internlm2.errors.UserError`: bad config, bad layout, missing or corrupt files, bad
data) and a missing or unreadable file print one line, `internlm2 <command>: error: ...`, and exit 2;
`--debug` (or INTERNLM2_DEBUG=1, e.g. through a launcher) shows the traceback instead. Anything else is a
bug and keeps its traceback.
"""

import argparse
import importlib
import os
import sys

from internlm2.errors import UserError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("internlm2.train.pretrain_command", "train a run of stages from a YAML config (resumes automatically)"),
    "sft": ("internlm2.train.sft_command", "supervised fine-tuning on ChatML data (YAML config, resumes)"),
    "chat": ("internlm2.chat.command", "chat with an HF checkpoint (streaming, tools) or answer a JSONL of chats"),
    "export": ("internlm2.train.export", "write a training checkpoint as an HF checkpoint (InternLM2 or Llama layout)"),
    "env": ("internlm2.env", "versions, how the extension was built, and which kernels each op has"),
    "plot": ("internlm2.train.plot", "draw a run's loss, learning-rate and throughput curves to a PNG"),
    "convert": ("internlm2.model.convert_command", "rewrite an HF checkpoint in the InternLM2 or Llama layout"),
    "generate": ("internlm2.model.generate_command", "continue prompts with an HF checkpoint (KV-cache decoding)"),
    "train-tokenizer": ("internlm2.data.train_tokenizer_cli", "train a SentencePiece BPE tokenizer with chat tokens"),
    "prepare-data": ("internlm2.data.prepare_data_cli", "tokenize a corpus (text, JSONL, chat) into token shards"),
    "train-rm": ("internlm2.rlhf.train_rm_command", "train a (conditional) reward model on preference pairs (YAML, resumes)"),
    "score": ("internlm2.rlhf.score_command", "score conversations with a reward model (batched, one JSON line each)"),
    "ppo": ("internlm2.rlhf.ppo_command", "online PPO with a conditional reward model and fast-path rounds"),
    "eval": ("internlm2.eval", "long-context evaluations of an HF checkpoint: needle, passkey, perplexity by position"),
}


def _command_list(commands: dict) -> str:
    width = max(map(len, commands))
    return "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in commands.items())


def dispatch(prog: str, description: str, commands: dict[str, tuple[str, str]], argv: list[str]) -> int:
    """Parses `COMMAND ARGS...` against `commands` and runs the chosen command (or command group)."""
    top = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"commands:\n{_command_list(commands)}\n\nRun `{prog} COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("command", choices=sorted(commands), metavar="COMMAND")
    top.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ns = top.parse_args(argv)
    module_name, help_ = commands[ns.command]
    module = importlib.import_module(module_name)
    if hasattr(module, "COMMANDS"):
        return dispatch(f"{prog} {ns.command}", help_, module.COMMANDS, ns.args)
    parser = argparse.ArgumentParser(prog=f"{prog} {ns.command}", description=help_)
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = parser.parse_args(ns.args)
    debug = args.debug or os.environ.get("INTERNLM2_DEBUG", "") not in ("", "0")
    try:
        return int(module.run(args) or 0)
    except (UserError, FileNotFoundError, PermissionError, IsADirectoryError) as err:
        if debug:
            raise
        print(f"{prog} {ns.command}: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return dispatch("internlm2", "Train InternLM2-family models.", COMMANDS, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
