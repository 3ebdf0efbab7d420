"""Talking to a chat model: the answering loop with tool calls (session.py), the tools (tools.py, the safe
calculator in calculator.py) and `internlm2 chat` (command.py)."""
