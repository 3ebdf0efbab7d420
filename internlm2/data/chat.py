"""ChatML as InternLM2 uses it, rendered to token ids with a loss mask for SFT.

    <s><|im_start|>system\\n{meta}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n
    <|im_start|>assistant\\n{a}<|im_end|>\\n

Roles: system, user, assistant, environment. Tools: a system or environment message may name one
(`name: "plugin"` or `"interpreter"`), rendered `<|im_start|>system name=<|plugin|>\\n...`; an assistant
writes a tool call inline, `...<|action_start|><|plugin|>\\n{"name": ...}<|action_end|>`, and the chat
tokens in content are encoded as themselves.

Each message's header (`<|im_start|>role\\n`) and content are encoded separately, so the boundary between
what is trained and what is not always falls between tokens.

JSON form of a conversation: `[{"role": "user", "content": "..."}, ...]` (optional `"name"`).
"""

from dataclasses import dataclass
from typing import Sequence

from internlm2.data.errors import DataError
from internlm2.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "environment")
TOOLS = ("plugin", "interpreter")

# Which role may follow which; None is the start of the conversation. System messages (the meta prompt,
# tool schemas) come first; an environment message answers an assistant's tool call.
_NEXT = {
    None: ("system", "user"),
    "system": ("system", "user"),
    "user": ("assistant",),
    "assistant": ("user", "environment"),
    "environment": ("assistant",),
}


class ChatFormatError(DataError):
    """A conversation that is not valid ChatML input: bad fields, unknown role, wrong role order."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str | None = None  # a tool ("plugin" or "interpreter"), for system and environment messages


def parse_messages(value, where: str = "conversation") -> list[Message]:
    """Messages from their JSON form; a `ChatFormatError` naming `where` and the message otherwise."""
    if not isinstance(value, list) or not value:
        raise ChatFormatError(f"{where}: messages must be a non-empty list")
    messages = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ChatFormatError(f"{where}: message {k} needs a role in {ROLES} and a string content, got {m!r:.200}")
        name = m.get("name")
        if name is not None and (m["role"] not in ("system", "environment") or name not in TOOLS):
            raise ChatFormatError(f"{where}: message {k} ({m['role']}) has name {name!r}; only system and "
                                  f"environment messages name a tool, one of {TOOLS}")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ChatFormatError(f"{where}: message {k} has unknown fields {sorted(extra)}")
        messages.append(Message(m["role"], m["content"], name))
    return messages


def check_order(messages: Sequence[Message], ends_with: Sequence[str], where: str = "conversation") -> None:
    """Raises `ChatFormatError` unless the roles follow ChatML's order and the last is in `ends_with`."""
    previous = None
    for k, m in enumerate(messages):
        if m.role not in _NEXT[previous]:
            after = f"after {previous}" if previous else "first"
            raise ChatFormatError(f"{where}: message {k} is {m.role} {after}; expected one of {_NEXT[previous]}")
        previous = m.role
    if previous not in ends_with:
        raise ChatFormatError(f"{where}: the last message is {previous}; expected one of {tuple(ends_with)}")


def render(messages: Sequence[Message], tokenizer: Tokenizer, *, bos: bool = True, generation_prompt: bool = False,
           train_roles: Sequence[str] = ("assistant",)) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a mask (1 = a training target): the content and closing
    `<|im_end|>` of every message whose role is in `train_roles`, so the model learns to answer and to
    stop. `generation_prompt` appends `<|im_start|>assistant\\n` for the model to continue."""
    start, end = tokenizer.special_id("<|im_start|>"), tokenizer.special_id("<|im_end|>")
    newline = tokenizer.encode("\n")
    ids = [tokenizer.bos_id] if bos else []
    mask = [0] * len(ids)

    def put(tokens: list[int], trained: bool) -> None:
        ids.extend(tokens)
        mask.extend([int(trained)] * len(tokens))

    for m in messages:
        trained = m.role in train_roles
        if m.name is None:
            put([start, *tokenizer.encode(m.role + "\n")], False)
        else:  # the tool token by id, so a tokenizer without it fails instead of spelling it out
            put([start, *tokenizer.encode(f"{m.role} name="), tokenizer.special_id(f"<|{m.name}|>"), *newline], False)
        put([*tokenizer.encode(m.content), end], trained)
        put(newline, False)
    if generation_prompt:
        put([start, *tokenizer.encode("assistant\n")], False)
    return ids, mask


def conversation_tokens(value, tokenizer: Tokenizer, where: str) -> tuple[list[int], list[int]]:
    """A JSON conversation for SFT, checked (it must end with an assistant turn) and rendered."""
    messages = parse_messages(value, where)
    check_order(messages, ("assistant",), where)
    return render(messages, tokenizer)
