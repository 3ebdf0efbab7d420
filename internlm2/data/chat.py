"""ChatML as InternLM2 uses it, rendered to token ids with a loss mask for SFT.

    <s><|im_start|>system\n{meta}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n
    <|im_start|>assistant\n{a}<|im_end|>\n

Roles: system, user, assistant, environment. Tools: a system or environment message may name one
(`name: "plugin"` or `"interpreter"`), rendered `<|im_start|>system name=<|plugin|>\n...`; an assistant
writes a tool call inline, `...<|action_start|><|plugin|>\n{"name": ..., "parameters": {...}}<|action_end|>`
(`tool_call_text`, `parse_tool_calls`), and the chat tokens in content are encoded as themselves. A plugin
system message whose content is JSON (a list of `{"name": ...}` schemas) declares the tools a conversation
may call; a call to any other tool is refused.

The text between two chat tokens is encoded as one piece, as a tokenizer that reads the whole rendered
string does (transformers' `apply_chat_template` with the template of chat_template.py): a message's
`role\n` header and its content are encoded together, so content that starts with a newline gives the
merged newline token the whole string gives. The mask starts at the first token that lies wholly inside the
content; a token that straddles the header and the content is not trained.

JSON form of a conversation: `[{"role": "user", "content": "..."}, ...]` (optional `"name"`).
"""

import json
from dataclasses import dataclass
from typing import Sequence

from internlm2.data.errors import DataError
from internlm2.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "environment")
TOOLS = ("plugin", "interpreter")
ACTION_START, ACTION_END = "<|action_start|>", "<|action_end|>"

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
    stop. `generation_prompt` appends `<|im_start|>assistant\n` for the model to continue."""
    start, end = tokenizer.special_id("<|im_start|>"), tokenizer.special_id("<|im_end|>")
    ids = [tokenizer.bos_id] if bos else []
    mask = [0] * len(ids)

    def put(tokens: list[int], trained: bool) -> None:
        ids.extend(tokens)
        mask.extend([int(trained)] * len(tokens))

    for m in messages:
        header = m.role + "\n"
        if m.name is not None:  # the tool token by id, so a tokenizer without it fails instead of spelling it out
            put([start, *tokenizer.encode(f"{m.role} name="), tokenizer.special_id(f"<|{m.name}|>")], False)
            header = "\n"
        else:
            put([start], False)
        tokens = tokenizer.encode(header + m.content)
        split = _content_start(tokens, header, tokenizer)
        put(tokens[:split], False)
        put([*tokens[split:], end], m.role in train_roles)
        put(tokenizer.encode("\n"), False)
    if generation_prompt:
        put([start, *tokenizer.encode("assistant\n")], False)
    return ids, mask


def _content_start(tokens: list[int], header: str, tokenizer: Tokenizer) -> int:
    """Index of the first of `tokens` (the encoding of header + content) that lies wholly in the content."""
    k = 0
    while k < len(tokens) and header.startswith(tokenizer.decode(tokens[:k + 1])):
        k += 1
    return k if tokenizer.decode(tokens[:k]) == header else k + 1


@dataclass(frozen=True)
class ToolCall:
    """A tool call in an assistant message: a plugin function by name with its parameters, or code for the
    interpreter (`name` None, `parameters` the code)."""

    tool: str  # "plugin" or "interpreter"
    name: str | None
    parameters: dict | str


def tool_call_text(name: str, parameters: dict) -> str:
    """A plugin call as the assistant writes it."""
    return f"{ACTION_START}<|plugin|>\n{json.dumps({'name': name, 'parameters': parameters})}{ACTION_END}"


def parse_tool_calls(content: str, where: str = "message") -> list[ToolCall]:
    """The tool calls in an assistant message's content, in order; `ChatFormatError` for one that does not
    parse (an unclosed action, an unknown tool token, a plugin call that is not a JSON object with a string
    `name` and an object `parameters`)."""
    calls, rest = [], content
    while ACTION_START in rest:
        body, closed, rest = rest.split(ACTION_START, 1)[1].partition(ACTION_END)
        if not closed:
            raise ChatFormatError(f"{where}: {ACTION_START} without {ACTION_END}")
        tool = next((t for t in TOOLS if body.startswith(f"<|{t}|>\n")), None)
        if tool is None:
            raise ChatFormatError(f"{where}: a tool call must start with <|plugin|> or <|interpreter|> and a newline, "
                                  f"got {body[:40]!r}")
        body = body[len(f"<|{tool}|>\n"):]
        if tool == "interpreter":
            calls.append(ToolCall(tool, None, body))
            continue
        try:
            call = json.loads(body)
        except ValueError as e:
            raise ChatFormatError(f"{where}: the plugin call is not JSON ({e})") from None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and isinstance(call.get("parameters", {}), dict)):
            raise ChatFormatError(f'{where}: a plugin call is {{"name": str, "parameters": {{...}}}}, '
                                  f"got {body[:80]!r}")
        calls.append(ToolCall(tool, call["name"], call.get("parameters", {})))
    return calls


def declared_tools(messages: Sequence[Message]) -> set[str] | None:
    """Names of the plugin tools that the plugin system messages declare as JSON schemas (a list of
    `{"name": ...}` objects, or one); None when no such message declares any (free-text tool prompts)."""
    names = None
    for m in messages:
        if m.role != "system" or m.name != "plugin":
            continue
        try:
            schemas = json.loads(m.content)
        except ValueError:
            continue
        for schema in schemas if isinstance(schemas, list) else [schemas]:
            if isinstance(schema, dict) and isinstance(schema.get("name"), str):
                names = (names or set()) | {schema["name"]}
    return names


def check_tool_calls(messages: Sequence[Message], where: str = "conversation") -> None:
    """Every assistant tool call parses and names a declared tool (when the conversation declares any)."""
    declared = declared_tools(messages)
    for k, m in enumerate(messages):
        if m.role != "assistant":
            continue
        for call in parse_tool_calls(m.content, f"{where}: message {k}"):
            if call.tool == "plugin" and declared is not None and call.name not in declared:
                raise ChatFormatError(f"{where}: message {k} calls unknown tool {call.name!r}; the conversation "
                                      f"declares {sorted(declared)}")


def conversation_tokens(value, tokenizer: Tokenizer, where: str) -> tuple[list[int], list[int]]:
    """A JSON conversation for SFT, checked (role order, ending with an assistant turn, tool calls) and
    rendered."""
    messages = parse_messages(value, where)
    check_order(messages, ("assistant",), where)
    check_tool_calls(messages, where)
    return render(messages, tokenizer)
