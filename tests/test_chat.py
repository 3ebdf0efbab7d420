"""Chatting: the safe calculator (against Python's arithmetic on random expressions, and what it refuses),
tool calls parsed and answered, the answering loop with a scripted model (the tool round trip, batching,
stop reasons, streaming) and with a real one, and `internlm2 chat` interactive and in batch mode."""

import json
import operator
import random
import subprocess
import sys
from fractions import Fraction

import pytest

from internlm2.chat import session
from internlm2.chat.calculator import CalculatorError, evaluate
from internlm2.chat.tools import Calculator, Toolbox, load_tool
from internlm2.data import Message, Tokenizer, render, train_tokenizer
from internlm2.data.chat import ChatFormatError, ToolCall, check_tool_calls, parse_tool_calls, tool_call_text
from internlm2.errors import UserError
from internlm2.model.generation import GenerationResult, SamplingParams, generate
from internlm2.model.pretrained import load_pretrained, save_pretrained
from tests.test_model_support import random_model, tiny_config
from tests.train.tiny_run import ROOT

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def random_expression(rng: random.Random, depth: int = 0) -> tuple[str, Fraction]:
    """An expression and its exact value (fractions: an oracle independent of the calculator)."""
    if depth > 2 or rng.random() < 0.3:
        n = rng.randint(0, 999)
        return str(n), Fraction(n)
    (a, va), (b, vb) = random_expression(rng, depth + 1), random_expression(rng, depth + 1)
    op = rng.choice("+-*/")
    if op == "/" and vb == 0:
        op = "+"
    value = va / vb if op == "/" else OPS[op](va, vb)
    return f"({a} {op} {b})", value


def test_calculator_matches_exact_arithmetic():
    rng = random.Random(0)
    for _ in range(300):
        expression, value = random_expression(rng)
        assert evaluate(expression) == pytest.approx(float(value), rel=1e-12, abs=1e-12), expression
    assert evaluate("2 ** 10 - 7 // 2 % 2") == 1023 and evaluate("-(3)") == -3 and evaluate("6 / 3") == 2
    assert isinstance(evaluate("6 / 3"), int) and evaluate("1 / 4") == 0.25


@pytest.mark.parametrize("expression,error", [
    ("__import__('os').system('echo no')", "only numbers"),
    ("x + 1", "only numbers"),
    ("(1).real", "only numbers"),
    ("[1, 2]", "only numbers"),
    ("'a' * 3", "only numbers"),
    ("9 ** 9 ** 9", "more than 100 digits"),
    ("1 / 0", "division by zero"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 +", "not an arithmetic expression"),
    ("1" * 201, "longer than 200"),
    ("+".join(["1"] * 60), "more than 100 parts"),
    ("True + 1", "only numbers"),
])
def test_calculator_refuses(expression, error):
    with pytest.raises(CalculatorError, match=error):
        evaluate(expression)


def test_tool_calls_parse_and_run():
    content = "Let me see." + tool_call_text("calculator", {"expression": "6 * 7"}) + \
        "<|action_start|><|interpreter|>\nprint(1)<|action_end|>"
    assert parse_tool_calls(content) == [ToolCall("plugin", "calculator", {"expression": "6 * 7"}),
                                         ToolCall("interpreter", None, "print(1)")]
    for bad, error in [("<|action_start|><|plugin|>\n{oops}<|action_end|>", "not JSON"),
                       ("<|action_start|><|plugin|>\n{}", "without <|action_end|>"),
                       ("<|action_start|><|browser|>\nx<|action_end|>", "must start with <|plugin|>"),
                       ('<|action_start|><|plugin|>\n{"name": 3}<|action_end|>', "a plugin call is")]:
        with pytest.raises(ChatFormatError, match=error):
            parse_tool_calls(bad, "m")
    toolbox = Toolbox([Calculator()])
    declared = toolbox.declare([Message("system", "Be exact."), Message("user", "hi")])
    assert [m.role for m in declared] == ["system", "system", "user"] and declared[1].name == "plugin"
    assert toolbox.declare(declared) == declared
    check_tool_calls([*declared, Message("assistant", tool_call_text("calculator", {}))])
    with pytest.raises(ChatFormatError, match="calls unknown tool 'search'"):
        check_tool_calls([*declared, Message("assistant", tool_call_text("search", {}))])
    answer = toolbox.run([ToolCall("plugin", "calculator", {"expression": "6 * 7"})])
    assert (answer.role, answer.name, json.loads(answer.content)) == ("environment", "plugin", {"result": 42})
    answers = json.loads(toolbox.run([ToolCall("plugin", "calculator", {"expression": "1/0"}),
                                      ToolCall("plugin", "search", {})]).content)
    assert answers[0] == {"error": "division by zero"} and "unknown tool 'search'" in answers[1]["error"]
    assert isinstance(load_tool("calculator"), Calculator)
    assert isinstance(load_tool("internlm2.chat.tools:Calculator"), Calculator)
    with pytest.raises(UserError, match="cannot import"):
        load_tool("no_such_module:Tool")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    docs = [f"def f{i}(x):\n    return x * {i} + 1  # What is the answer? It is {i}. No tool needed, I ramble "
            f'on. {{"name": "calculator", "parameters": {{"expression": "{i} * 7"}}}} The end.\n' for i in range(300)]
    return train_tokenizer(docs, tmp_path_factory.mktemp("tok"), 320)


class ScriptedModel:
    """Stands in for `generate`: answers each prompt with the next scripted text for its conversation
    (found by the user turn it contains), ending with the given stop token."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, {k: list(v) for k, v in script.items()}, []

    def generate(self, model, prompts, params, generator=None, on_token=None):
        self.calls.append(len(prompts))
        out = GenerationResult([], [], [])
        for j, prompt in enumerate(prompts):
            key = next(k for k in self.script if k in self.tokenizer.decode(prompt))
            text, stop = self.script[key].pop(0)
            tokens = self.tokenizer.encode(text) + ([stop] if stop is not None else [])
            for t in tokens:
                if on_token:
                    on_token(j, t)
            out.tokens.append(tokens)
            out.finish_reasons.append("stop" if stop is not None else "length")
        return out


def test_respond_runs_tool_round_trips_batched(tokenizer, monkeypatch):
    im_end = tokenizer.special_id("<|im_end|>")
    call = tool_call_text("calculator", {"expression": "6 * 7"})
    scripted = ScriptedModel(tokenizer, {
        "Q1": [(call, im_end), ("It is 42.", im_end)],
        "Q2": [("No tool needed.", im_end)],
        "Q3": [("I ramble on", None)],
        "Q4": [("<|action_start|><|plugin|>\n{bad json<|action_end|>", im_end)],
        "Q5": [("The end", tokenizer.eos_id)],
    })
    monkeypatch.setattr(session, "generate", scripted.generate)
    toolbox = Toolbox([Calculator()])
    conversations = [toolbox.declare([Message("user", q)]) for q in ("Q1", "Q2", "Q3", "Q4", "Q5")]
    streamed = {}
    replies = session.respond(None, tokenizer, conversations, SamplingParams(), toolbox=toolbox,
                              on_token=lambda i, t: streamed.setdefault(i, []).append(t))
    assert scripted.calls == [5, 1]  # all five at once, then the one that called a tool
    first = replies[0]
    assert [m.role for m in first.messages] == ["assistant", "environment", "assistant"]
    assert first.messages[0].content == call and json.loads(first.messages[1].content) == {"result": 42}
    assert first.answer == "It is 42." and first.finish_reason == "stop"
    assert (replies[1].answer, replies[1].finish_reason) == ("No tool needed.", "stop")
    assert replies[2].finish_reason == "length" and replies[4].finish_reason == "eos"
    assert replies[3].malformed_tool_call and "not JSON" in replies[3].malformed_tool_call
    assert tokenizer.decode(streamed[0]) == call + "<|im_end|>It is 42.<|im_end|>"


def test_tool_rounds_are_bounded(tokenizer, monkeypatch):
    im_end = tokenizer.special_id("<|im_end|>")
    call = tool_call_text("calculator", {"expression": "1 + 1"})
    monkeypatch.setattr(session, "generate", ScriptedModel(tokenizer, {"Q": [(call, im_end)] * 3}).generate)
    toolbox = Toolbox([Calculator()])
    (reply,) = session.respond(None, tokenizer, [toolbox.declare([Message("user", "Q")])], SamplingParams(),
                               toolbox=toolbox, max_tool_rounds=2)
    assert reply.finish_reason == "tool_rounds" and [m.role for m in reply.messages].count("environment") == 2


def test_respond_with_a_model_is_generate_on_the_rendered_prompt(tokenizer):
    """The real path: each conversation is rendered with the generation prompt and continued by `generate`
    (batched) to the same tokens as one at a time; streaming sees exactly those tokens."""
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    conversations = [[Message("user", "What is the answer?")], [Message("system", "Be brief."), Message("user", "x")]]
    params = SamplingParams(max_new_tokens=6)
    streamed = {0: [], 1: []}
    replies = session.respond(model, tokenizer, conversations, params,
                              on_token=lambda i, t: streamed[i].append(t))
    stops = (tokenizer.special_id("<|im_end|>"), tokenizer.eos_id)
    for i, conversation in enumerate(conversations):
        prompt, _ = render(conversation, tokenizer, generation_prompt=True)
        alone = generate(model, [prompt], SamplingParams(max_new_tokens=6, stop_token_ids=stops))
        assert streamed[i] == alone.tokens[0]
        ended = alone.finish_reasons[0] == "stop"
        assert replies[i].answer == tokenizer.decode(alone.tokens[0][:-1] if ended else alone.tokens[0])


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat_model")
    (directory / "tok").mkdir()
    (directory / "tok" / "tokenizer.model").write_bytes(open(tokenizer.source, "rb").read())
    save_pretrained(random_model(tiny_config(vocab_size=tokenizer.vocab_size)), directory / "hf",
                    tokenizer_directory=directory / "tok")
    return directory / "hf"


def as_json(messages):
    return [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})} for m in messages]


def chat_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "internlm2.cli", "chat", *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_chat_batch_mode_answers_every_conversation_in_order(model_dir, tmp_path):
    records = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}]} for i in range(5)]
    records[2]["messages"] = [{"role": "system", "content": "Be brief."}, *records[2]["messages"]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = chat_cli("--model", model_dir, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl",
                      "--batch-size", 2, "--max-new-tokens", 5, "--tool", "calculator", "--temperature", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 5
    tokenizer = Tokenizer.load(model_dir)
    model = load_pretrained(model_dir)
    toolbox = Toolbox([Calculator()])
    given = [toolbox.declare([Message(m["role"], m["content"]) for m in r["messages"]]) for r in records]
    expected = [reply for start in (0, 2, 4) for reply in  # the same batches as the command's
                session.respond(model, tokenizer, given[start:start + 2], SamplingParams(max_new_tokens=5),
                                toolbox=toolbox)]
    for conversation, reply, answer in zip(given, expected, out):
        assert answer["messages"] == as_json(conversation + reply.messages)  # the input, then the new turns
        assert answer["finish_reason"] == reply.finish_reason


def test_chat_interactive_keeps_history_and_streams(model_dir):
    result = chat_cli("--model", model_dir, "--max-new-tokens", 4, "--system", "Be brief.",
                      stdin="hello\n/reset\nagain\n/exit\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("assistant> ") == 2 and "(new conversation)" in result.stdout


def test_chat_bad_input_is_one_line(model_dir, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}]}\n'
                                        '{"messages": [{"role": "assistant", "content": "b"}]}\n')
    result = chat_cli("--model", model_dir, "--input", tmp_path / "bad.jsonl")
    assert result.returncode == 2 and "bad.jsonl:2" in result.stderr and "assistant first" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = chat_cli("--model", model_dir, "--tool", "nope:Tool")
    assert result.returncode == 2 and "cannot import" in result.stderr
