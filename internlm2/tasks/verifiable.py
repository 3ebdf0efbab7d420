"""Small chat tasks whose answers a program checks: SFT's demo data, and the ground truth that the reward
model and PPO demos measure against (their preference pairs and true rewards come from here).

Tasks, each made from material on every machine (the Python standard library's sources, random numbers):

- `function_name`: a short function from the standard library; "Which function does this code define?"
  -> its name.
- `reverse_list` / `sort_list`: a list of 3-5 digits -> the list reversed / sorted ascending.
- `calculator`: "What is 37 * 12 + 5?" -> a call of the calculator tool (declared in a plugin system
  message), its result as an environment message, then the number: the tool format end to end.

`make_examples(split, per_task, seed)` is a pure function of its arguments (on one Python installation:
another version's standard library holds other functions). The held-out split never shares a prompt with
the training split: a function is held out by the file it comes from, a list or expression by a hash of
itself (one in eight). Examples come round-robin over the tasks, so every prefix is balanced.

Checkers, given the final assistant text: `exact_match` (the reference answer, exactly), `is_correct`
(the verifier: the last list, integer or identifier in the text is the right one, so an explained answer
counts too). `explained_answer` and `wrong_answer` give a correct answer in other words and a checked
wrong one, for preference data.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import random
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from internlm2.chat.calculator import evaluate as calculate
from internlm2.chat.tools import Calculator, Toolbox
from internlm2.data.builtin_corpus import stdlib_files, stdlib_root
from internlm2.data.chat import Message, parse_messages, tool_call_text
from internlm2.errors import UserError

TASK_NAMES = ("function_name", "reverse_list", "sort_list", "calculator")
SPLITS = ("train", "eval")
HELD_OUT_ONE_IN = 8
TOOL_TASKS = ("calculator",)

_LIST = re.compile(r"\[[^\[\]]*\]")
_INTEGER = re.compile(r"-?\d+")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Example:
    task: str
    prompt: tuple[Message, ...]  # what the model is given: (a tool declaration and) the user's question
    reference: tuple[Message, ...]  # the reference turns that follow: the answer (tool call, result, answer)
    answer: str  # the reference final answer, the last assistant turn's content

    @property
    def messages(self) -> list[Message]:
        return [*self.prompt, *self.reference]

    def to_json(self) -> dict:
        """The JSONL record: SFT reads `messages`; `task`, `prompt_turns` and `answer` let it be read back."""
        return {"task": self.task, "prompt_turns": len(self.prompt), "answer": self.answer,
                "messages": [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                             for m in self.messages]}

    @classmethod
    def from_json(cls, record: dict, where: str = "example") -> "Example":
        messages = parse_messages(record["messages"], where)
        k = record["prompt_turns"]
        return cls(record["task"], tuple(messages[:k]), tuple(messages[k:]), record["answer"])


def held_out(key: str) -> bool:
    """Whether material keyed `key` belongs to the held-out split (a stable hash, not Python's)."""
    return hashlib.blake2b(key.encode(), digest_size=8).digest()[0] % HELD_OUT_ONE_IN == 0


# ---- the tasks ----------------------------------------------------------------------------------
_DEF = re.compile(r"( *)def ([A-Za-z_][A-Za-z0-9_]*)\(")


@functools.lru_cache(maxsize=None)
def _functions() -> dict[str, tuple[tuple[str, str], ...]]:
    """split -> (name, source) of the standard library's short (2-8 lines, at most 320 characters),
    undecorated, non-dunder functions. Found line by line (a def and the lines indented below it) and each
    candidate parsed on its own: parsing every file of the library would take minutes on a busy machine."""
    pools: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    root = stdlib_root()
    for path in stdlib_files():
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (UnicodeDecodeError, OSError):
            continue
        split = "eval" if held_out(path.relative_to(root).as_posix()) else "train"
        for i, line in enumerate(lines):
            found = _DEF.match(line)
            if not found or found[2].startswith("__") or (i and lines[i - 1].strip().startswith("@")):
                continue
            indent, end = len(found[1]), i + 1
            while end < len(lines) and end - i <= 8 and (not lines[end].strip() or
                                                        len(lines[end]) - len(lines[end].lstrip(" ")) > indent):
                end += 1
            while end > i + 1 and not lines[end - 1].strip():
                end -= 1
            code = textwrap.dedent("\n".join(lines[i:end]))
            if not 2 <= end - i <= 8 or len(code) > 320 or "\t" in code:
                continue
            try:
                ast.parse(code)
            except SyntaxError:  # the block ended early (a signature's closing line, a string's lines)
                continue
            pools[split].append((found[2], code))
    return {s: tuple(pool) for s, pool in pools.items()}


def _list_text(values) -> str:
    return "[" + ", ".join(map(str, values)) + "]"


def _function_name(rng: random.Random, split: str) -> tuple[str, str, list[Message], list[Message]] | None:
    pool = _functions()[split]
    if not pool:
        raise UserError(f"the standard library at {stdlib_root()} has no short functions for the {split} split")
    name, code = pool[rng.randrange(len(pool))]
    question = f"Which function does this code define?\n```python\n{code}\n```"
    return code, name, [Message("user", question)], [Message("assistant", name)]


def _list_task(kind: str):
    def make(rng: random.Random, split: str):
        values = [rng.randrange(10) for _ in range(rng.randint(3, 5))]
        key = f"{kind}:{values}"
        if held_out(key) != (split == "eval"):
            return None
        answer = _list_text(values[::-1] if kind == "reverse_list" else sorted(values))
        question = (f"Reverse the list {_list_text(values)}." if kind == "reverse_list"
                    else f"Sort the list {_list_text(values)} in ascending order.")
        return key, answer, [Message("user", question)], [Message("assistant", answer)]
    return make


def _calculator(rng: random.Random, split: str):
    terms = [str(rng.randint(1, 999)) for _ in range(rng.choice((2, 2, 3)))]
    expression = terms[0] + "".join(f" {rng.choice('+-*')} {t}" for t in terms[1:])
    if held_out(f"calculator:{expression}") != (split == "eval"):
        return None
    answer = str(calculate(expression))
    call = Message("assistant", tool_call_text(Calculator.name, {"expression": expression}))
    result = Message("environment", json.dumps({"result": int(answer)}), name="plugin")
    prompt = [Toolbox([Calculator()]).system_message(), Message("user", f"What is {expression}?")]
    return expression, answer, prompt, [call, result, Message("assistant", answer)]


_MAKERS = {"function_name": _function_name, "reverse_list": _list_task("reverse_list"),
           "sort_list": _list_task("sort_list"), "calculator": _calculator}


def make_examples(split: str, per_task: int, seed: int = 0, tasks=TASK_NAMES) -> list[Example]:
    """`per_task` distinct examples of each task from `split` ("train" or "eval"), round-robin by task."""
    if split not in SPLITS:
        raise UserError(f"split {split!r}: expected one of {SPLITS}")
    unknown = sorted(set(tasks) - set(TASK_NAMES))
    if unknown:
        raise UserError(f"unknown task(s) {unknown}; the tasks are {TASK_NAMES}")
    per = {}
    for task in tasks:
        rng = random.Random(f"{seed}:{task}:{split}")
        seen, examples = set(), []
        for _ in range(200 * per_task + 1000):  # the pools are large; this bounds a too-small one
            made = _MAKERS[task](rng, split)
            if made is None or made[0] in seen:
                continue
            seen.add(made[0])
            _, answer, prompt, reference = made
            examples.append(Example(task, tuple(prompt), tuple(reference), answer))
            if len(examples) == per_task:
                break
        if len(examples) < per_task:
            raise UserError(f"task {task}: only {len(examples)} distinct {split} examples, {per_task} asked")
        per[task] = examples
    return [per[task][i] for i in range(per_task) for task in tasks]


def write_jsonl(examples: list[Example], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples))
    return path


# ---- checkers -----------------------------------------------------------------------------------
def _extract(task: str, text: str):
    """The answer a text gives for `task`, canonical (a list of ints, an int, a name), or None."""
    if task in ("reverse_list", "sort_list"):
        for found in reversed(_LIST.findall(text)):
            try:
                value = json.loads(found)
            except ValueError:
                continue
            if isinstance(value, list) and all(type(v) is int for v in value):
                return value
        return None
    pattern = _INTEGER if task == "calculator" else _IDENTIFIER
    found = pattern.findall(text)
    return (int(found[-1]) if task == "calculator" else found[-1]) if found else None


def is_correct(example: Example, text: str) -> bool:
    """The verifier: the answer `text` gives (its last list, integer or identifier) is the right one."""
    found = _extract(example.task, text)
    return found is not None and found == _extract(example.task, example.answer)


def exact_match(example: Example, text: str) -> bool:
    return text.strip() == example.answer


def explained_answer(example: Example) -> str:
    """A correct answer in a sentence (the same answer for `is_correct`, not for `exact_match`)."""
    question = example.prompt[-1].content
    if example.task == "function_name":
        return f"The code defines the function `{example.answer}`."
    if example.task == "calculator":
        return f"{question.removeprefix('What is ').removesuffix('?')} = {example.answer}."
    given = _LIST.findall(question)[0]
    verb = "Reversed" if example.task == "reverse_list" else "Sorted in ascending order"
    return f"{verb}, the list {given} reads {example.answer}."


def wrong_answer(example: Example, rng: random.Random) -> str:
    """An answer in the reference's form that `is_correct` rejects."""
    if example.task == "function_name":
        name = example.answer
        return rng.choice([f"{name}s", f"get_{name}", f"{name}_impl", f"_{name}"])
    if example.task == "calculator":
        return str(int(example.answer) + rng.choice([-1, 1]) * rng.randint(1, 10))
    values = json.loads(example.answer)
    changed = [i for i in range(len(values) - 1) if values[i] != values[i + 1]]
    if changed:
        i = rng.choice(changed)
        values[i], values[i + 1] = values[i + 1], values[i]
    else:
        values[0] = (values[0] + 1) % 10
    return _list_text(values)
