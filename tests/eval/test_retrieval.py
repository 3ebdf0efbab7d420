"""The retrieval grid: a model that copies perfectly scores 100%, a random one about 0, on both tasks;
scores by hand; cells of one length answered in batches."""

import argparse
import math

import pytest

from internlm2.eval import needle, passkey
from internlm2.eval.retrieval import exact_match, grid, make_prompts, partial_match, run_grid, summarize
from tests.eval.support import RandomAnswerer, RecordingAnswerer, copying_answerer

LENGTHS, DEPTHS, REPEATS = [160, 400], [0, 30, 60, 100], 2


def _task(module, tokenizer, *extra):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(["--model", "unused", "--lengths", ",".join(map(str, LENGTHS)), "--repeats",
                              str(REPEATS), *extra])
    return module.make_task(args, tokenizer)


@pytest.mark.parametrize("module", [needle, passkey], ids=["needle", "passkey"])
def test_copying_model_scores_100_percent_and_random_model_about_0(module, small_tokenizer):
    task = _task(module, small_tokenizer)
    prompts = make_prompts(task, grid(LENGTHS, DEPTHS, REPEATS))
    perfect = summarize(run_grid(task, prompts, copying_answerer, small_tokenizer, progress=False))
    assert perfect["exact_mean"] == 1.0 and perfect["partial_mean"] == 1.0
    assert perfect["exact"] == [[1.0] * len(LENGTHS)] * len(DEPTHS)
    results = run_grid(task, prompts, RandomAnswerer(small_tokenizer.vocab_size), small_tokenizer, progress=False)
    noise = summarize(results)
    assert noise["exact_mean"] == 0.0 and noise["partial_mean"] < 0.05
    assert len({r.key for r in results}) == len(results)  # every cell has its own key


def test_cells_of_one_length_are_answered_together(small_tokenizer):
    task = _task(passkey, small_tokenizer)
    cells = grid(LENGTHS, DEPTHS, REPEATS)
    recorder = RecordingAnswerer(copying_answerer)
    results = run_grid(task, make_prompts(task, cells), recorder, small_tokenizer, batch_size=3, progress=False)
    per_length = len(DEPTHS) * REPEATS
    assert len(recorder.calls) == len(LENGTHS) * math.ceil(per_length / 3)
    for call in recorder.calls:
        assert len(set(call)) == 1 and call[0] in LENGTHS and len(call) <= 3
    assert sorted((r.length, r.depth, r.repeat) for r in results) == sorted((c.length, c.depth, c.repeat) for c in cells)


def test_fixed_needle_key_and_answer_prefix_are_options(small_tokenizer):
    task = _task(needle, small_tokenizer, "--needle", "The password of the vault is {key}.", "--question",
                 "What is the password of the vault?", "--answer-prefix", "The password of the vault is",
                 "--key", "swordfish")
    prompts = make_prompts(task, grid([300], [50], 1))
    (key, prompt), = prompts.values()
    assert key == "swordfish" and "The password of the vault is swordfish." in small_tokenizer.decode(prompt.tokens)
    assert summarize(run_grid(task, prompts, copying_answerer, small_tokenizer, progress=False))["exact_mean"] == 1.0


def test_scores_by_hand():
    assert exact_match(" 48213. Remember it.", "48213") == 1.0
    assert exact_match("\n48213", "48213") == 1.0
    assert exact_match(" 482134", "48213") == 0.0  # a longer number is not the key
    assert exact_match(" the key is 48213", "48213") == 0.0
    assert partial_match(" 48013", "48213") == 0.8
    assert partial_match(" 482", "48213") == 0.6
    assert partial_match("", "48213") == 0.0
    assert partial_match(" 84213", "48213") == 0.6
