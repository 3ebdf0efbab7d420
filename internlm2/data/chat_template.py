"""The chat template an HF export's tokenizer_config.json carries (hf_tokenizer.py), so that
`AutoTokenizer.apply_chat_template` renders as chat.py does.

InternLM2's released template, extended with the tool name of a system or environment message
(`<|im_start|>system name=<|plugin|>\\n...`): a conversation without tools renders exactly as with the
released one. Every newline and chat token sits inside a string expression, so transformers' Jinja options
(`trim_blocks`, `lstrip_blocks`) change nothing; tokenized, the text gives chat.py's `render` ids (which
encodes the text between chat tokens as one piece, as a tokenizer of the whole string does).
"""

from __future__ import annotations

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
