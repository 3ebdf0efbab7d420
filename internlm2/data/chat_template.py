"""The chat template an HF export carries, so `AutoTokenizer.apply_chat_template` renders as chat.py does.

InternLM2's released template, extended with the tool name of a system or environment message
(`<|im_start|>system name=<|plugin|>\\n...`): a conversation without tools renders exactly as with the
released one. Every newline and chat token sits inside a string expression, so transformers' Jinja options
(`trim_blocks`, `lstrip_blocks`) change nothing; tokenized, the text gives chat.py's `render` ids (which
encodes the text between chat tokens as one piece, as a tokenizer of the whole string does).
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_CONFIG = "tokenizer_config.json"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] }}"
    "{% if message['name'] is defined and message['name'] %}{{ ' name=<|' + message['name'] + '|>' }}{% endif %}"
    "{{ '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_template() -> str:
    return CHAT_TEMPLATE


def add_chat_template(directory: str | Path) -> None:
    """Sets `chat_template` in the tokenizer_config.json of an HF directory holding a tokenizer (creating
    the file when the tokenizer came without one)."""
    path = Path(directory) / TOKENIZER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["chat_template"] = chat_template()
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
