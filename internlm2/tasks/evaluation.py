"""How well a chat model does the verifiable tasks: greedy answers to held-out prompts (tool calls run by
the calculator), scored per task.

- exact match: the final answer is the reference answer, exactly;
- correct: the verifier accepts it (`is_correct`);
- format: the answer is well-formed ChatML: every turn ended with `<|im_end|>` (not EOS, not the token
  budget), every tool call parsed, and a tool task's first turn called its tool.
"""

from __future__ import annotations

from collections.abc import Sequence

from internlm2.chat.session import Reply, respond
from internlm2.chat.tools import Calculator, Toolbox
from internlm2.data.chat import parse_tool_calls
from internlm2.data.tokenizer import Tokenizer
from internlm2.model.generation import SamplingParams
from internlm2.tasks.verifiable import TOOL_TASKS, Example, exact_match, is_correct

METRICS = ("exact_match", "correct", "format")


def well_formed(example: Example, reply: Reply) -> bool:
    if reply.finish_reason != "stop" or reply.malformed_tool_call is not None:
        return False
    if example.task in TOOL_TASKS:
        first = reply.messages[0].content
        return any(c.tool == "plugin" for c in parse_tool_calls(first)) and len(reply.messages) > 1
    return True


def evaluate(model, tokenizer: Tokenizer, examples: Sequence[Example], *, max_new_tokens: int = 64,
             batch_size: int = 32) -> dict[str, dict[str, float]]:
    """task -> {"examples": n, "exact_match", "correct", "format": fractions}, plus "all" over every task."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    toolbox = Toolbox([Calculator()])
    replies: list[Reply] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        replies += respond(model, tokenizer, [e.prompt for e in chunk], params, toolbox=toolbox)
    scores: dict[str, dict[str, float]] = {}
    for group in sorted({e.task for e in examples}) + ["all"]:
        pairs = [(e, r) for e, r in zip(examples, replies) if group in ("all", e.task)]
        scores[group] = {
            "examples": len(pairs),
            "exact_match": sum(exact_match(e, r.answer) for e, r in pairs) / len(pairs),
            "correct": sum(is_correct(e, r.answer) for e, r in pairs) / len(pairs),
            "format": sum(well_formed(e, r) for e, r in pairs) / len(pairs),
        }
    return scores
