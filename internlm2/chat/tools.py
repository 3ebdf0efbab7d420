"""Tools a chat model calls through InternLM2's plugin format, and the toolbox that runs them.

A tool is any object with a `name`, a JSON `schema` (`{"name", "description", "parameters"}`, what the
model is shown) and `__call__(parameters: dict) -> dict` (the result, JSON-serialisable). The toolbox
declares its tools in a plugin system message (a JSON list of the schemas, which chat.py reads back as the
declared tools) and answers a model's calls with one environment message. The calculator ships with the
project; others plug in by import path: `--tool my_package.tools:Weather` (a class or factory called with
no arguments, or an instance).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from internlm2.chat import calculator
from internlm2.data.chat import Message, ToolCall
from internlm2.errors import UserError


class Tool(Protocol):
    name: str
    schema: dict

    def __call__(self, parameters: dict) -> dict: ...


class Calculator:
    """Evaluates an arithmetic expression (calculator.py: no eval, bounded)."""

    name = "calculator"
    schema = {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]},
    }

    def __call__(self, parameters: dict) -> dict:
        try:
            return {"result": calculator.evaluate(parameters.get("expression"))}
        except calculator.CalculatorError as err:
            return {"error": str(err)}


BUILTIN_TOOLS = {"calculator": Calculator}


def load_tool(spec: str) -> Tool:
    """A built-in tool by name, or `module:attribute` (a class or factory called with no arguments, or an
    object that already is a tool)."""
    if spec in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[spec]()
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise UserError(f"tool {spec!r}: not a built-in tool ({', '.join(BUILTIN_TOOLS)}) nor module:attribute")
    try:
        found: Any = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"tool {spec!r}: cannot import it ({err})") from None
    tool = found() if isinstance(found, type) or not hasattr(found, "schema") else found
    if not (hasattr(tool, "name") and hasattr(tool, "schema") and callable(tool)):
        raise UserError(f"tool {spec!r}: a tool has `name`, `schema` and is callable with a parameters dict")
    return tool


class Toolbox:
    """Tools by name; declares them to the model and runs its calls."""

    def __init__(self, tools: Iterable[Tool]):
        self.tools = {t.name: t for t in tools}

    def system_message(self) -> Message:
        """The plugin system message that declares the tools."""
        return Message("system", json.dumps([t.schema for t in self.tools.values()]), name="plugin")

    def declare(self, messages: Sequence[Message]) -> list[Message]:
        """`messages` with the tools' declaration after the opening system messages, unless a plugin system
        message already declares tools."""
        if any(m.role == "system" and m.name == "plugin" for m in messages):
            return list(messages)
        n = 0
        while n < len(messages) and messages[n].role == "system":
            n += 1
        return [*messages[:n], self.system_message(), *messages[n:]]

    def run(self, calls: Sequence[ToolCall]) -> Message:
        """The environment message answering a turn's plugin calls: one result object, or a list of them in
        call order. An unknown tool or a failing one answers with an error the model can read."""
        results = []
        for call in calls:
            tool = self.tools.get(call.name)
            if tool is None:
                results.append({"error": f"unknown tool {call.name!r}; available: {sorted(self.tools)}"})
                continue
            try:
                results.append(tool(call.parameters))
            except Exception as err:  # a plug-in tool's failure is the model's to read, not a crash of the chat
                results.append({"error": f"{call.name} failed: {err}"})
        return Message("environment", json.dumps(results[0] if len(results) == 1 else results), name="plugin")
