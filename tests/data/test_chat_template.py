"""The chat template of an HF export: `transformers.AutoTokenizer.from_pretrained(export).apply_chat_template`
gives exactly the token ids of our own ChatML rendering (`render`), tool calls and environment results
included, with InternLM2's real tokenizer and with a demo tokenizer. The oracle is transformers' own
tokenizer and Jinja on the exported tokenizer files."""

import json

import pytest
import torch

from internlm2.data import Message, Tokenizer, hf_tokenizer_files, render
from internlm2.data.chat import tool_call_text
from internlm2.data.chat_template import CHAT_TEMPLATE
from internlm2.model.pretrained import full_parameter_shapes, write_pretrained
from tests.data.conftest import REAL_TOKENIZER
from tests.test_model_hf_release_format import RELEASED_CHAT_TEMPLATE
from tests.test_model_support import tiny_config

SCHEMA = '[{"name": "calculator", "parameters": {"expression": "string"}}]'
CONVERSATIONS = {
    "multi_turn": [Message("system", "You are InternLM2."), Message("user", "What is 2+2?"),
                   Message("assistant", "4."), Message("user", "And 3 × 3?\n(explain)"),
                   Message("assistant", "It is 9, because 3+3+3 = 9.")],
    "tools": [Message("system", "You can use tools."), Message("system", SCHEMA, name="plugin"),
              Message("user", "What is 37 * 12?"),
              Message("assistant", "Let me compute." + tool_call_text("calculator", {"expression": "37 * 12"})),
              Message("environment", '{"result": 444}', name="plugin"), Message("assistant", "444")],
    "interpreter": [Message("system", "Run code.", name="interpreter"), Message("user", "print 1"),
                    Message("assistant", "<|action_start|><|interpreter|>\nprint(1)<|action_end|>"),
                    Message("environment", "1\n", name="interpreter"), Message("assistant", "It printed 1.")],
    # content that starts with newlines and spaces merges with the header's newline in a whole-string
    # tokenizer: render encodes the two together too
    "whitespace": [Message("user", "\n\nindented:\n    code"), Message("assistant", "  two spaces\n")],
}


@pytest.fixture(params=["demo", "real"])
def tokenizer(request, small_tokenizer):
    if request.param == "demo":
        return small_tokenizer
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"InternLM2's tokenizer.model is not at {REAL_TOKENIZER} (a fresh clone has no ../shared/data)")
    return Tokenizer.load(REAL_TOKENIZER)


def exported(tokenizer: Tokenizer, tmp_path):
    """An HF export of a (tiny, zero) model with the tokenizer's files, through the export writer."""
    config = tiny_config(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    tensors = ((name, torch.zeros(shape)) for name, shape in full_parameter_shapes(config).items())
    return write_pretrained(tmp_path / "export", config, tensors, tokenizer_files=hf_tokenizer_files(tokenizer))


def ids_of(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def as_dicts(messages):
    return [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})} for m in messages]


def test_apply_chat_template_gives_our_rendering(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    export = exported(tokenizer, tmp_path)
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    theirs = AutoTokenizer.from_pretrained(export)
    ours = Tokenizer.load(export)
    assert ours.special_ids == tokenizer.special_ids
    for name, conversation in CONVERSATIONS.items():
        ids, _ = render(conversation, tokenizer)
        assert ids_of(theirs.apply_chat_template(as_dicts(conversation), tokenize=True)) == ids, name
        prompt = conversation[:-1]
        ids, _ = render(prompt, tokenizer, generation_prompt=True)
        got = theirs.apply_chat_template(as_dicts(prompt), tokenize=True, add_generation_prompt=True)
        assert ids_of(got) == ids, f"{name} with the generation prompt"


def test_without_tools_the_template_renders_as_internlm2s_released_one(tmp_path):
    from transformers import AutoTokenizer

    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"InternLM2's tokenizer.model is not at {REAL_TOKENIZER}")
    theirs = AutoTokenizer.from_pretrained(exported(Tokenizer.load(REAL_TOKENIZER), tmp_path))
    for generation_prompt in (False, True):
        messages = as_dicts(CONVERSATIONS["multi_turn"])
        assert (theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
                == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                              chat_template=RELEASED_CHAT_TEMPLATE))


def test_render_keeps_the_header_newline_out_of_the_loss(tokenizer):
    """A token that holds the header's newline and the content's first newlines is not trained; the rest
    of the content and <|im_end|> are."""
    messages = [Message("user", "q"), Message("assistant", "\n\nanswer")]
    ids, mask = render(messages, tokenizer)
    trained = [t for t, m in zip(ids, mask) if m]
    assert tokenizer.decode(trained).endswith("answer<|im_end|>")
    assert ids[1:] == tokenizer.encode(tokenizer.decode(ids))  # the whole string's tokens
