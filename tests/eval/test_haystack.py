"""Haystack prompts: exact lengths, the needle at the requested depth on a sentence boundary, the corpus's
text in order around it, and the errors that name a bad length, depth or corpus."""

import itertools

import pytest

from internlm2.eval import EvalError
from internlm2.eval.haystack import BUILTIN_CORPUS, Corpus, build_prompt, builtin_text, split_units
from internlm2.eval.passkey import PasskeyFormat

HEAD, NEEDLE, TAIL = [1], [900, 901, 902], [903, 904]


def test_units_are_sentences_and_paragraphs_that_join_back_to_the_text():
    text = "First one. Second one!  Third?\nStill third\n\n   indented paragraph.\n"
    units = split_units(text)
    assert units == ["First one. ", "Second one!  ", "Third?\n", "Still third\n\n", "   indented paragraph.\n"]
    assert "".join(units) == text
    builtin = builtin_text()
    assert "".join(split_units(builtin)) == builtin and len(split_units(builtin)) > 1000


@pytest.mark.parametrize("depth", [0, 10, 25, 33.3, 50, 75, 90, 100])
def test_needle_lands_at_the_requested_depth_on_a_unit_boundary(depth):
    units = [[10 + i] * (1 + i % 7) for i in range(200)]  # unequal sentences of 1..7 tokens
    prompt = build_prompt(iter(units), HEAD, NEEDLE, TAIL, 300, depth)
    budget = 300 - len(HEAD) - len(NEEDLE) - len(TAIL)
    assert len(prompt.tokens) == 300 and prompt.haystack_length == budget
    assert prompt.tokens[:1] == HEAD and prompt.tokens[-2:] == TAIL
    at = prompt.needle_start - len(HEAD)
    assert prompt.tokens[prompt.needle_start:prompt.needle_start + 3] == NEEDLE
    # the tokens before the needle are whole units, the ones after it the following units in order
    haystack = prompt.tokens[1:prompt.needle_start] + prompt.tokens[prompt.needle_start + 3:-2]
    assert haystack == list(itertools.chain(*units))[:budget]
    ends = list(itertools.accumulate(len(u) for u in units))
    assert at == 0 or at == budget or at in ends
    # nearest boundary: no unit boundary is closer to the requested position than where it landed
    target = depth / 100 * budget
    assert all(abs(b - target) >= abs(at - target) for b in [0, budget, *[e for e in ends if e <= budget]])
    assert abs(prompt.depth - depth) <= 100 * 7 / 2 / budget + 1e-9  # half the longest unit
    if depth == 0:
        assert at == 0
    if depth == 100:
        assert at == budget


def test_passkey_prompt_in_a_real_tokenizer_has_the_exact_length_and_the_key_where_asked(small_tokenizer):
    fmt = PasskeyFormat(small_tokenizer)
    for length, depth in [(200, 0), (333, 50), (512, 100)]:
        prompt = fmt.prompt("48213", length, depth)
        assert len(prompt.tokens) == length
        text = small_tokenizer.decode(prompt.tokens)
        assert text.startswith("There is an important info hidden") and text.endswith("What is the pass key? The pass key is")
        before, after = text.split(" The pass key is 48213. Remember it. 48213 is the pass key.")
        fillers_before = before.count("The grass is green.")
        total = fillers_before + after.count("The grass is green.")
        assert abs(fillers_before / total - depth / 100) <= 1 / total + 1e-9


def test_length_shorter_than_needle_and_question_is_refused():
    with pytest.raises(EvalError, match=r"length 5 is shorter than the needle and question alone \(6 tokens"):
        build_prompt(itertools.repeat([7]), HEAD, NEEDLE, TAIL, 5, 50)


@pytest.mark.parametrize("depth", [-1, 100.5])
def test_depth_outside_0_100_is_refused(depth):
    with pytest.raises(EvalError, match=f"depth {depth:g} is outside \\[0, 100\\]"):
        build_prompt(itertools.repeat([7]), HEAD, NEEDLE, TAIL, 50, depth)


def test_corpus_too_short_is_named(small_tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Only a few words here. And a second sentence.\n")
    corpus = Corpus([str(path)], small_tokenizer)
    with pytest.raises(EvalError, match=f"corpus {path} is too short: {corpus.num_tokens} tokens, the haystack "
                                        "of length 1000 needs 900"):
        corpus.check_fits(900, 1000)
    with pytest.raises(EvalError, match="--corpus .*missing.txt: no such file"):
        Corpus([str(tmp_path / "missing.txt")], small_tokenizer)


def test_repeats_read_other_text_of_the_builtin_corpus(small_tokenizer):
    corpus = Corpus([BUILTIN_CORPUS], small_tokenizer)
    starts = [corpus.start(r, 3, 2000) for r in range(3)]
    assert starts[0] == 0 and starts[0] < starts[1] < starts[2]
    tokens_left = sum(len(u) for u in corpus.units[starts[2]:])
    assert tokens_left >= 2000
