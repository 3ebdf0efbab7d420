"""Generation: the KV cache against full forward passes, stop tokens, sampling filters, the CLI."""

import json

import pytest
import torch

from internlm2.cli import main as cli_main
from internlm2.model import save_pretrained
from internlm2.model.generation import SamplingParams, generate, sample_next
from tests.test_model_support import KERNEL_CHOICES, random_ids, random_model, tiny_config

PROMPT_LENGTHS = (3, 17, 1, 9)


def prompts_for(vocab_size):
    return [random_ids((n,), vocab_size).tolist() for n in PROMPT_LENGTHS]


def greedy_without_cache(model, prompt, steps):
    """The oracle: a full forward pass over the whole sequence for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor(seq)).logits[-1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("kernels", KERNEL_CHOICES)
def test_greedy_with_kv_cache_equals_step_by_step_argmax(kernels):
    model = random_model(tiny_config(kernels=kernels))
    prompts = prompts_for(model.config.vocab_size)
    result = generate(model, prompts, SamplingParams(max_new_tokens=32, stop_token_ids=()))
    assert result.finish_reasons == ["length"] * len(prompts)
    for prompt, tokens in zip(prompts, result.tokens):
        assert tokens == greedy_without_cache(model, prompt, 32)


def test_stop_tokens_end_each_sequence_where_it_emits_one():
    model = random_model(tiny_config())
    prompts = prompts_for(model.config.vocab_size)
    full = generate(model, prompts, SamplingParams(max_new_tokens=24, stop_token_ids=())).tokens
    stops = (full[0][3], full[2][10])
    result = generate(model, prompts, SamplingParams(max_new_tokens=24, stop_token_ids=stops))
    for tokens, expected, reason in zip(result.tokens, full, result.finish_reasons):
        cut = next((i + 1 for i, t in enumerate(expected) if t in stops), None)
        assert tokens == expected[:cut]
        assert reason == ("stop" if cut is not None else "length")
    assert result.finish_reasons[0] == "stop" and len(result.tokens[0]) <= 4


def test_default_stop_token_is_the_config_eos():
    model = random_model(tiny_config())
    prompts = prompts_for(model.config.vocab_size)
    first = generate(model, prompts, SamplingParams(max_new_tokens=6, stop_token_ids=())).tokens[1][2]
    model.config = model.config.replace(eos_token_id=first)
    result = generate(model, prompts, SamplingParams(max_new_tokens=6))
    assert result.tokens[1][-1] == first and result.finish_reasons[1] == "stop"


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = random_model(tiny_config())
    prompts = prompts_for(model.config.vocab_size)
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=8, stop_token_ids=())).tokens
    for params in (SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, stop_token_ids=()),
                   SamplingParams(max_new_tokens=8, temperature=1.5, top_p=1e-6, stop_token_ids=())):
        assert generate(model, prompts, params, torch.Generator().manual_seed(3)).tokens == greedy


def test_sampling_is_reproducible_with_a_seed():
    model = random_model(tiny_config())
    prompts = prompts_for(model.config.vocab_size)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, stop_token_ids=())
    a = generate(model, prompts, params, torch.Generator().manual_seed(7)).tokens
    b = generate(model, prompts, params, torch.Generator().manual_seed(7)).tokens
    assert a == b


def test_sample_next_draws_from_the_filtered_distribution():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # ranked: 1, 3, 2, 0
    logits = probs.log().repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    # top-p 0.7: tokens 1 (0.5) and 3 (0.3 brings the mass to 0.8) stay, renormalised to 5/8 and 3/8.
    draws = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.7), g)
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 5 / 8) < 0.02
    # top-k 3 drops token 0; temperature 0.5 squares the odds: 0.25 : 0.0225 : 0.09 normalised.
    draws = sample_next(logits, SamplingParams(temperature=0.5, top_k=3), g)
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    sharpened = torch.tensor([0.0, 0.25, 0.0225, 0.09], dtype=torch.float64)
    assert counts[0] == 0
    assert torch.allclose(counts, sharpened / sharpened.sum(), atol=0.02)


def test_bad_generation_input_is_rejected():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match="prompt 0 has token ids outside \\[0, vocab_size=320\\): \\[320\\]"):
        generate(model, [[1, 320]])
    for bad, pattern in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                         (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k")]:
        with pytest.raises(ValueError, match=pattern):
            SamplingParams(**bad)


# ---- the command line

def test_generate_command_prints_text_with_the_tokenizer(tmp_path, capsys):
    from internlm2.data.tokenizer_training import train_tokenizer

    docs = [f"The quick brown fox {i} jumps over the lazy dog.\nPack my box with five dozen liquor jugs." for i in range(50)]
    tokenizer = train_tokenizer(docs, tmp_path / "tok", 320)
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    save_pretrained(model, tmp_path / "model", tokenizer_directory=tmp_path / "tok")
    assert (tmp_path / "model" / "tokenizer.model").is_file()
    args = ["generate", "--model", str(tmp_path / "model"), "--prompt", "The quick", "--prompt", "Pack my box",
            "--max-new-tokens", "5", "--kernels", "reference", "--json"]
    assert cli_main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in lines] == [0, 1]
    expected = generate(model, [tokenizer.encode("The quick", bos=True), tokenizer.encode("Pack my box", bos=True)],
                        SamplingParams(max_new_tokens=5))
    for record, tokens in zip(lines, expected.tokens):
        assert record["tokens"] == tokens and record["text"] == tokenizer.decode(tokens)
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(tmp_path / "model"), "--prompt", "hi", "--chat",
                     "--max-new-tokens", "3", "--kernels", "reference"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_generate_command_without_tokenizer_takes_ids(tmp_path, capsys):
    model = random_model(tiny_config())
    save_pretrained(model, tmp_path / "model")
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(tmp_path / "model"), "--prompt-ids", "5,6,7",
                     "--max-new-tokens", "4", "--kernels", "reference"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    assert printed == generate(model, [[5, 6, 7]], SamplingParams(max_new_tokens=4)).tokens[0]
    assert cli_main(["generate", "--model", str(tmp_path / "model"), "--prompt", "text"]) == 1
    assert "no tokenizer.model" in capsys.readouterr().err
