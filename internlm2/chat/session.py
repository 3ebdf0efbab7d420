"""Answering conversations with a chat model: one assistant turn per conversation, batched on the KV
cache, and the tool loop.

`respond` renders each conversation with the generation prompt (`<|im_start|>assistant\\n`), generates
until `<|im_end|>` (or EOS, or the token budget) for all of them at once, and appends the assistant turn.
When a turn calls plugin tools and a toolbox is given, the toolbox's environment message follows it and
the model answers again (the conversations that called a tool are batched again), up to
`max_tool_rounds`. The interactive `internlm2 chat`, its batch mode and the task evaluation all answer
through here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from internlm2.chat.tools import Toolbox
from internlm2.data.chat import ChatFormatError, Message, parse_tool_calls, render
from internlm2.data.tokenizer import Tokenizer
from internlm2.model.generation import SamplingParams, generate


@dataclass
class Reply:
    """The messages a conversation gained (assistant turns, and environment messages between them) and how
    its last turn ended: "stop" (`<|im_end|>`), "eos" (the end-of-text token instead: not ChatML),
    "length" (the token budget), or "tool_rounds" (it still called a tool after `max_tool_rounds`)."""

    messages: list[Message] = field(default_factory=list)
    finish_reason: str = "stop"
    malformed_tool_call: str | None = None  # why a turn's tool call did not parse, if one did not

    @property
    def answer(self) -> str:
        """The content of the last assistant turn."""
        return self.messages[-1].content if self.messages else ""


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    return (tokenizer.special_id("<|im_end|>"), tokenizer.eos_id)


def respond(model, tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]], params: SamplingParams, *,
            toolbox: Toolbox | None = None, max_tool_rounds: int = 3, generator: torch.Generator | None = None,
            on_token: Callable[[int, int], None] | None = None) -> list[Reply]:
    """One `Reply` per conversation (see the module docstring). `on_token(conversation index, token)`
    streams every generated token, stop tokens included."""
    im_end = tokenizer.special_id("<|im_end|>")
    params = replace(params, stop_token_ids=stop_ids(tokenizer))
    histories = [list(c) for c in conversations]
    replies = [Reply() for _ in conversations]
    pending = list(range(len(conversations)))
    for round_ in range(max_tool_rounds + 1):
        if not pending:
            break
        prompts = [render(histories[i], tokenizer, generation_prompt=True)[0] for i in pending]
        stream = None if on_token is None else (lambda j, token, ids=tuple(pending): on_token(ids[j], token))
        result = generate(model, prompts, params, generator=generator, on_token=stream)
        called = []
        for i, tokens, reason in zip(pending, result.tokens, result.finish_reasons):
            ended = tokens[-1] if reason == "stop" else None
            turn = Message("assistant", tokenizer.decode(tokens[:-1] if ended is not None else tokens))
            histories[i].append(turn)
            reply = replies[i]
            reply.messages.append(turn)
            reply.finish_reason = "length" if ended is None else "stop" if ended == im_end else "eos"
            if toolbox is None or reply.finish_reason != "stop":
                continue
            try:
                calls = [c for c in parse_tool_calls(turn.content) if c.tool == "plugin"]
            except ChatFormatError as err:
                reply.malformed_tool_call = str(err)
                continue
            if calls:
                if round_ == max_tool_rounds:
                    reply.finish_reason = "tool_rounds"
                    continue
                result_message = toolbox.run(calls)
                histories[i].append(result_message)
                reply.messages.append(result_message)
                called.append(i)
        pending = called
    return replies
