"""ChatML rendering and assistant-only loss masks, token by token; preference and prompt datasets."""

import jinja2
import pytest
import torch

from internlm2.data import ChatFormatError, DataError, Message, PreferenceDataset, PromptDataset, render
from internlm2.data.chat import check_order, conversation_tokens, parse_messages
from tests.data.conftest import write_jsonl

# InternLM2's HF chat template, extended with the tool name of chat_format.md (`system name=<|plugin|>`):
# an independent rendering of the same format, as text.
CHATML = jinja2.Template(
    "{{ bos }}{% for m in messages %}<|im_start|>{{ m.role }}{% if m.name %} name=<|{{ m.name }}|>{% endif %}\n"
    "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

MULTI_TURN = [
    Message("system", "You are InternLM2."),
    Message("user", "What is 2+2?"),
    Message("assistant", "4."),
    Message("user", "And 3 × 3?\n(explain)"),
    Message("assistant", "It is 9, because 3+3+3 = 9."),
]
TOOLS = [
    Message("system", "You can use tools."),
    Message("system", '[{"name": "search", "parameters": {"q": "string"}}]', name="plugin"),
    Message("user", "Find InternLM2."),
    Message("assistant", 'Searching.<|action_start|><|plugin|>\n{"name": "search", "parameters": {"q": "x"}}'
                         "<|action_end|>"),
    Message("environment", '{"result": "arXiv 2403.17297"}', name="plugin"),
    Message("assistant", "It is arXiv 2403.17297."),
]


def as_dicts(messages):
    return [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})} for m in messages]


def runs(ids, mask, value):
    """The token runs where mask == value, in order."""
    out, current = [], []
    for token, m in zip(ids, mask):
        if m == value:
            current.append(token)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


@pytest.mark.parametrize("conversation", [MULTI_TURN, TOOLS], ids=["multi_turn", "tools"])
@pytest.mark.parametrize("which", ["small", "real"])
def test_rendering_matches_the_template_and_masks_only_assistant_turns(conversation, which, request):
    tok = request.getfixturevalue(f"{which}_tokenizer")
    ids, mask = render(conversation, tok)
    assert len(ids) == len(mask)
    text = CHATML.render(messages=as_dicts(conversation), bos="", add_generation_prompt=False)
    assert ids[0] == tok.bos_id and mask[0] == 0
    assert tok.decode(ids) == text
    if which == "real":
        # Our per-message encoding gives the tokens of the whole rendered string (no merges across turns).
        assert ids[1:] == tok.encode(text)
    start, end = tok.special_ids["<|im_start|>"], tok.special_ids["<|im_end|>"]
    # token by token: every turn opens with an untrained <|im_start|>, and closes with <|im_end|> trained
    # exactly when the turn is the assistant's
    opens = [k for k, t in enumerate(ids) if t == start]
    closes = [k for k, t in enumerate(ids) if t == end]
    assert len(opens) == len(closes) == len(conversation)
    for m, o, c in zip(conversation, opens, closes):
        assert mask[o] == 0 and mask[c] == (m.role == "assistant")
        assert all(v == (m.role == "assistant") for v in mask[o + 1:c + 1][-len(tok.encode(m.content)) - 1:])
    assistant = [m.content for m in conversation if m.role == "assistant"]
    assert [tok.decode(r) for r in runs(ids, mask, 1)] == [a + "<|im_end|>" for a in assistant]
    pieces = runs(ids, mask, 0)
    assert tok.decode(pieces[0]).endswith("<|im_start|>assistant\n")
    for piece in pieces[1:-1]:
        assert tok.decode(piece).startswith("\n<|im_start|>") and tok.decode(piece).endswith("<|im_start|>assistant\n")
    assert tok.decode(pieces[-1]) == "\n"


def test_generation_prompt_and_no_bos(small_tokenizer):
    messages = [Message("user", "hi")]
    ids, mask = render(messages, small_tokenizer, bos=False, generation_prompt=True)
    assert small_tokenizer.decode(ids) == CHATML.render(messages=as_dicts(messages), bos="", add_generation_prompt=True)
    assert not any(mask)


def test_real_tokenizer_known_ids(real_tokenizer):
    ids, mask = render([Message("user", "hi"), Message("assistant", "ok")], real_tokenizer)
    assert ids[:4] == [1, 92543, 1008, 364]  # <s><|im_start|>user\n
    assert ids.count(92542) == 2 and mask[ids.index(92542)] == 0 and mask[len(ids) - 2] == 1


@pytest.mark.parametrize("messages,error", [
    ([Message("assistant", "x")], "message 0 is assistant first"),
    ([Message("user", "a"), Message("user", "b")], "message 1 is user after user"),
    ([Message("user", "a"), Message("assistant", "b"), Message("system", "c")], "message 2 is system after assistant"),
    ([Message("user", "a"), Message("environment", "b")], "message 1 is environment after user"),
    ([Message("user", "a")], "the last message is user"),
    ([Message("system", "a"), Message("user", "q"), Message("assistant", "x"), Message("environment", "r")],
     "the last message is environment"),
])
def test_wrong_role_order_is_refused(messages, error):
    with pytest.raises(ChatFormatError, match=error):
        check_order(messages, ("assistant",))


@pytest.mark.parametrize("value,error", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "robot", "content": "x"}], "needs a role"),
    ([{"role": "user"}], "needs a role"),
    ([{"role": "user", "content": "x", "name": "plugin"}], "only system and environment messages name a tool"),
    ([{"role": "system", "content": "x", "name": "browser"}], "name 'browser'"),
    ([{"role": "user", "content": "x", "weight": 0}], "unknown fields"),
])
def test_malformed_messages_are_refused(value, error, small_tokenizer):
    with pytest.raises(ChatFormatError, match=error):
        parse_messages(value, "f.jsonl:3")
    with pytest.raises(ChatFormatError, match="f.jsonl:3"):
        conversation_tokens(value, small_tokenizer, "f.jsonl:3")


CONDITIONS = {"helpful": "Be helpful.", "code": "Judge the code."}


def test_preference_pairs(tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Sort [3,1]?", "chosen": "[1, 3]", "rejected": "[3, 1]", "condition": "code"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Go away."},
    ])
    data = PreferenceDataset(path, small_tokenizer, CONDITIONS)
    assert len(data) == 2
    first = data[0]
    prompt = [{"role": "system", "content": "Judge the code."},
              {"role": "user", "content": "Sort [3,1]?"}]
    for name, answer in (("chosen", "[1, 3]"), ("rejected", "[3, 1]")):
        expected = CHATML.render(messages=prompt + [{"role": "assistant", "content": answer}], bos="")
        assert small_tokenizer.decode(first[f"{name}_ids"]) == expected
        assert first[f"{name}_ids"].dtype == torch.int64 and first[f"{name}_mask"].dtype == torch.bool
        trained = first[f"{name}_ids"][first[f"{name}_mask"]]
        assert small_tokenizer.decode(trained) == answer + "<|im_end|>"
    assert first["condition"] == "code" and data[1]["condition"] is None
    assert small_tokenizer.decode(data[1]["rejected_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


GOOD_PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("bad,error", [
    ({"prompt": "q", "chosen": "a"}, "a preference record needs prompt, chosen and rejected"),
    ("{not json", "invalid JSON"),
    ({**GOOD_PAIR, "condition": "poetry"}, "condition 'poetry' has no system prompt"),
    ({**GOOD_PAIR, "chosen": [{"role": "user", "content": "a"}]}, "chosen: message 1 is user after user"),
    ({**GOOD_PAIR, "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "prompt: the last message is assistant"),
])
def test_bad_preference_records_fail_with_their_line_or_are_counted(tmp_path, small_tokenizer, bad, error):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_PAIR, bad, GOOD_PAIR])
    with pytest.raises(DataError, match=r"pairs.jsonl:2\b.*" + error.replace("[", r"\[")):
        PreferenceDataset(path, small_tokenizer, CONDITIONS)
    data = PreferenceDataset(path, small_tokenizer, CONDITIONS, on_error="skip")
    assert len(data) == 2 and sum(data.skips.counts.values()) == 1
    assert "pairs.jsonl:2" in data.skips.summary()
    assert torch.equal(data[1]["chosen_ids"], data[0]["chosen_ids"])


def test_prompts(tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Write a poem.", "condition": "helpful"},
        {"prompt": [{"role": "user", "content": "Run it"}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "again"}]},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ])
    with pytest.raises(DataError, match=r"prompts.jsonl:3 prompt: the last message is assistant"):
        PromptDataset(path, small_tokenizer)
    data = PromptDataset(path, small_tokenizer, on_error="skip")
    assert len(data) == 2
    item = data[0]
    assert small_tokenizer.decode(item["prompt_ids"]) == CHATML.render(
        messages=[{"role": "user", "content": "Write a poem."}], bos="", add_generation_prompt=True)
    assert item["condition"] == "helpful" and "helpful" not in small_tokenizer.decode(item["prompt_ids"])
    assert [m.role for m in data[1]["messages"]] == ["user", "assistant", "user"]
