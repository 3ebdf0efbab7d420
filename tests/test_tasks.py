"""The verifiable tasks: deterministic, balanced, held-out prompts never seen in training, conversations
that SFT's data checks accept (the tool task's call and result agree with the calculator), and checkers
that accept right answers in either wording and reject checked wrong ones."""

import json
import random
import re

import pytest

from internlm2.chat.calculator import evaluate
from internlm2.data.chat import check_order, check_tool_calls, parse_tool_calls
from internlm2.errors import UserError
from internlm2.tasks.verifiable import (TASK_NAMES, Example, exact_match, explained_answer, is_correct,
                                        make_examples, wrong_answer)


@pytest.fixture(scope="module")
def examples():
    return {split: make_examples(split, per, seed=3) for split, per in (("train", 120), ("eval", 30))}


def test_examples_are_deterministic_balanced_and_held_out(examples):
    train, held_out = examples["train"], examples["eval"]
    assert [e.to_json() for e in make_examples("eval", 30, seed=3)] == [e.to_json() for e in held_out]
    assert [e.to_json() for e in make_examples("eval", 30, seed=4)] != [e.to_json() for e in held_out]
    assert [e.task for e in train[:8]] == list(TASK_NAMES) * 2  # round-robin: every prefix is balanced
    for split in (train, held_out):
        questions = [e.prompt[-1].content for e in split]
        assert len(set(questions)) == len(questions)
    assert not {e.prompt[-1].content for e in train} & {e.prompt[-1].content for e in held_out}
    code = {e.prompt[-1].content for e in held_out if e.task == "function_name"}
    assert not code & {e.prompt[-1].content for e in make_examples("train", 2000, tasks=["function_name"])}


def test_conversations_are_valid_sft_data_and_answers_are_right(examples):
    for e in examples["train"] + examples["eval"]:
        messages = e.messages
        check_order(messages, ("assistant",))
        check_tool_calls(messages)
        assert messages[-1].content == e.answer and Example.from_json(json.loads(json.dumps(e.to_json()))) == e
        question = e.prompt[-1].content
        if e.task == "calculator":
            (call,) = parse_tool_calls(e.reference[0].content)
            expression = call.parameters["expression"]
            assert call.name == "calculator" and question == f"What is {expression}?"
            assert json.loads(e.reference[1].content) == {"result": evaluate(expression)} == {"result": int(e.answer)}
        elif e.task == "function_name":
            code = question.split("```python\n")[1].removesuffix("\n```")
            compile(code, "<snippet>", "exec")
            assert code.startswith(f"def {e.answer}(")
        else:
            given = json.loads(re.search(r"\[.*?\]", question).group())
            want = given[::-1] if e.task == "reverse_list" else sorted(given)
            assert json.loads(e.answer) == want and 3 <= len(given) <= 5


def test_checkers(examples):
    rng = random.Random(0)
    for e in examples["eval"]:
        assert exact_match(e, e.answer) and exact_match(e, f" {e.answer}\n") and is_correct(e, e.answer)
        explained = explained_answer(e)
        assert is_correct(e, explained) and not exact_match(e, explained)
        wrong = wrong_answer(e, rng)
        assert not is_correct(e, wrong) and not exact_match(e, wrong)
        assert not is_correct(e, "") and not is_correct(e, "I do not know.")


def test_bad_requests_are_refused():
    with pytest.raises(UserError, match="split 'test'"):
        make_examples("test", 1)
    with pytest.raises(UserError, match=r"unknown task\(s\) \['poetry'\]"):
        make_examples("train", 1, tasks=["poetry"])
