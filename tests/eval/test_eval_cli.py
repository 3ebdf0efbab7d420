"""`internlm2 eval ...` on a real exported tiny model: the outputs, agreement with plain `generate` and
with a loss computed from full logits, and one-line errors naming bad input."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from internlm2.cli import main as cli_main
from internlm2.data.builtin_corpus import stdlib_root
from internlm2.data.prepare import prepare
from internlm2.data.prepared import PreparedDataset
from internlm2.eval import needle, passkey
from internlm2.eval.perplexity import bucket_edges
from internlm2.eval.retrieval import Cell, cell_key
from internlm2.model import SamplingParams, generate, load_pretrained


def _eval(*argv) -> int:
    return cli_main(["eval", *map(str, argv)])


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_retrieval_cli_writes_json_and_heatmap_and_answers_as_generate_does(task, tiny_checkpoint, small_tokenizer,
                                                                            tmp_path):
    out = tmp_path / task
    assert _eval(task, "--model", tiny_checkpoint, "--lengths", "160,240", "--depths", "0,50,100", "--repeats", 2,
                 "--batch-size", 4, "--out", out, "--no-progress") == 0
    result = json.loads((out / f"{task}.json").read_text())
    assert (out / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = result["cells"]
    assert len(cells) == 2 * 3 * 2
    assert result["summary"]["lengths"] == [160, 240] and result["summary"]["depths"] == [0, 50, 100]
    assert result["summary"]["exact_mean"] == 0.0  # random weights do not find a random key
    assert result["settings"]["model"] == str(tiny_checkpoint)
    # the batched grid answers each prompt as a one-prompt greedy generate does
    module = {"needle": needle, "passkey": passkey}[task]
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_checkpoint), "--lengths", "160,240", "--repeats", "2"])
    made = module.make_task(args, small_tokenizer)
    model = load_pretrained(tiny_checkpoint).eval()
    for cell in (cells[0], cells[-1]):
        c = Cell(cell["length"], cell["depth"], cell["repeat"])
        key = cell_key(made, c, 0)
        assert key == cell["key"]
        tokens = generate(model, [made.prompt(c, key).tokens],
                          SamplingParams(max_new_tokens=len(small_tokenizer.encode(" " + key)) + 2,
                                         stop_token_ids=(small_tokenizer.eos_id,))).tokens[0]
        assert small_tokenizer.decode(tokens) == cell["answer"]


def _prepared(small_tokenizer, tmp_path) -> Path:
    files = [str(stdlib_root() / name) for name in ("argparse.py", "ast.py", "calendar.py", "csv.py", "shlex.py")]
    prepare(files, small_tokenizer, tmp_path / "data")
    return tmp_path / "data"


def test_perplexity_cli_buckets_equal_the_loss_from_full_logits(tiny_checkpoint, small_tokenizer, tmp_path):
    data_dir = _prepared(small_tokenizer, tmp_path)
    out = tmp_path / "ppl"
    assert _eval("perplexity", "--model", tiny_checkpoint, "--data", data_dir, "--seq-len", 96, "--docs", 3,
                 "--buckets", 4, "--batch-size", 2, "--out", out) == 0
    result = json.loads((out / "perplexity.json").read_text())
    assert (out / "perplexity.png").is_file() and result["settings"]["docs"] == 3
    # oracle: each document alone through the model, full logits, plain cross-entropy
    model = load_pretrained(tiny_checkpoint, kernels="reference").eval()
    data = PreparedDataset(data_dir)
    losses = []
    with torch.no_grad():
        for i in range(data.num_docs):
            doc = torch.from_numpy(data.document(i)[0].astype(np.int64))
            if len(doc) >= 97 and len(losses) < 3:
                logits = model(doc[:96]).logits
                losses.append(F.cross_entropy(logits.double(), doc[1:97], reduction="none"))
    by_position = torch.stack(losses).mean(0)
    edges = bucket_edges(96, 4)
    expected = [float(by_position[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
    assert [b["mean_loss"] for b in result["buckets"]] == pytest.approx(expected, rel=1e-4)
    assert [(b["start"], b["end"]) for b in result["buckets"]] == [(0, 24), (24, 48), (48, 72), (72, 96)]


def _error(capsys, *argv) -> str:
    assert _eval(*argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_gets_one_line_naming_it(tiny_checkpoint, small_tokenizer, tmp_path, capsys):
    model = ["--model", tiny_checkpoint]
    assert "--model /nowhere/model: no such directory" in _error(capsys, "passkey", "--model", "/nowhere/model")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    assert f"--model {bare}: no tokenizer.model" in _error(capsys, "needle", "--model", bare)
    assert "depth 150 is outside [0, 100]" in _error(capsys, "passkey", *model, "--lengths", 128, "--depths", "0,150")
    assert "length 20 is shorter than the needle and question alone" in _error(
        capsys, "passkey", *model, "--lengths", "20,128")
    short = tmp_path / "short.txt"
    short.write_text("A short corpus. Of two sentences.\n")
    assert f"corpus {short} is too short" in _error(capsys, "needle", *model, "--corpus", short, "--lengths", 512)
    message = _error(capsys, "passkey", *model, "--lengths", 2 ** 31, "--depths", 50, "--repeats", 1)
    assert f"length {2 ** 31} with batch size 1 needs about" in message and "KV cache" in message and "free on cpu" in message
    data_dir = _prepared(small_tokenizer, tmp_path)
    message = _error(capsys, "perplexity", *model, "--data", data_dir, "--seq-len", 10 ** 7)
    assert f"{data_dir}: no document has --seq-len + 1 = {10 ** 7 + 1} tokens (the longest has" in message
    assert "not a prepared dataset" in _error(capsys, "perplexity", *model, "--data", tmp_path, "--seq-len", 64)
