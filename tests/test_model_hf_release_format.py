"""InternLM2-layout exports in the format of InternLM2's released checkpoints, and released configs read back.

The oracles are the released files themselves (config.json and tokenizer_config.json of
internlm2-chat-1_8b and internlm2-1_8b-reward, key for key below), transformers' own tokenizer on the
exported tokenizer files, and, when `INTERNLM2_REMOTE_CODE` names a directory holding InternLM2's
`configuration_internlm2.py` and `modeling_internlm2.py` (and `tokenization_internlm2.py`), from its HF
repositories, which this project does not ship, that remote code run on an export. The remote code needs
the transformers of its day (4.x) and einops.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from internlm2.data import Tokenizer, hf_tokenizer_files, train_tokenizer
from internlm2.data.chat_template import CHAT_TEMPLATE
from internlm2.model import ConfigError, load_pretrained, preset_config, save_pretrained
from internlm2.model.hf_config import config_from_hf
from tests.data.conftest import REAL_TOKENIZER
from tests.test_model_support import random_ids, random_model, tiny_config

# internlm2-chat-1_8b's config.json (transformers_version dropped: it names the writer's version).
RELEASED_CHAT_1_8B = {
    "architectures": ["InternLM2ForCausalLM"],
    "attn_implementation": "eager",
    "auto_map": {
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    },
    "bias": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 32768, "model_type": "internlm2",
    "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 8, "pad_token_id": 2,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "rope_theta": 1000000, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 92544,
}
# internlm2-1_8b-reward: the same backbone; its scalar head reads the hidden state at reward_token_id.
RELEASED_REWARD_1_8B = {
    **RELEASED_CHAT_1_8B,
    "architectures": ["InternLM2ForRewardModel"],
    "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                 "AutoModel": "modeling_internlm2.InternLM2ForRewardModel",
                 "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
    "reward_token_id": 92527, "torch_dtype": "float16",
}
RELEASED_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
RELEASED_CHAT_TOKENS = {"92538": "<|plugin|>", "92539": "<|interpreter|>", "92540": "<|action_end|>",
                        "92541": "<|action_start|>", "92542": "<|im_end|>", "92543": "<|im_start|>"}
RELEASED_ADDITIONAL = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>",
                       "<|plugin|>"]
TEXTS = ["def f(x):\n    return x  +  1\n", " a leading space, 12345 digits", "数字和中文 émoji 🤖",
         "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
         "<|action_start|><|plugin|>\n{\"name\": \"f\"}<|action_end|>"]


@pytest.mark.parametrize("released", [RELEASED_CHAT_1_8B, RELEASED_REWARD_1_8B], ids=["chat", "reward"])
def test_released_configs_read_as_the_1_8b_preset(released):
    config, fmt = config_from_hf(released)
    assert fmt == "internlm2"
    # the reward model's scored token travels with its config
    assert config == preset_config("internlm2-1_8b", kernels=config.kernels,
                                   reward_token_id=released.get("reward_token_id"))


def test_export_config_json_has_the_released_keys_and_values(tmp_path):
    model = random_model(tiny_config())
    save_pretrained(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert set(written) == set(RELEASED_CHAT_1_8B)
    for key in ("architectures", "attn_implementation", "auto_map", "bias", "hidden_act", "model_type",
                "pretraining_tp", "tie_word_embeddings", "use_cache"):
        assert written[key] == RELEASED_CHAT_1_8B[key], key
    # InternLM2Config's own rule: exactly {type, factor}, the factor a float >= 1.
    assert written["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert isinstance(written["rope_scaling"]["factor"], float)
    assert config_from_hf(written, kernels="reference")[0] == model.config

    save_pretrained(random_model(tiny_config(rope_scaling_factor=None)), tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["rope_scaling"] is None


def test_reading_stays_strict_about_what_changes_the_math():
    for change, pattern in [({"bias": True}, "bias=True"), ({"rope_scaling": {"type": "linear", "factor": 2.0}},
                                                            "'linear' is not supported"),
                            ({"reward_token": 3}, "unknown config key.*reward_token")]:
        with pytest.raises(ConfigError, match=pattern):
            config_from_hf({**RELEASED_REWARD_1_8B, **change})


# ---- tokenizer files

def exported_tokenizer(tokenizer: Tokenizer, directory: Path) -> Path:
    directory.mkdir()
    for name, contents in hf_tokenizer_files(tokenizer).items():
        (directory / name).write_bytes(contents)
    return directory


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory) -> Tokenizer:
    docs = [f"def f{i}(x):\n    return x + {i}  # the quick brown fox jumps over the lazy dog\n" for i in range(200)]
    return train_tokenizer(docs, tmp_path_factory.mktemp("tok"), 320)


@pytest.fixture(params=["demo", "released"])
def tokenizer(request, demo_tokenizer) -> Tokenizer:
    if request.param == "demo":
        return demo_tokenizer
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"InternLM2's tokenizer.model is not at {REAL_TOKENIZER} (a fresh clone has no ../shared/data)")
    return Tokenizer.load(REAL_TOKENIZER)


def test_transformers_tokenizes_the_export_as_we_do(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    directory = exported_tokenizer(tokenizer, tmp_path / "tok")
    theirs = AutoTokenizer.from_pretrained(directory)
    again = Tokenizer.load(directory)
    assert again.special_ids == tokenizer.special_ids
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=True)
        assert theirs(text)["input_ids"] == ids, text  # BOS added, EOS not, chat tokens at their ids
        assert again.encode(text, bos=True) == ids
        assert theirs.decode(ids, skip_special_tokens=False) == theirs.bos_token + text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_id)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    rendered = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_config_matches_the_released_one(tmp_path):
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"InternLM2's tokenizer.model is not at {REAL_TOKENIZER} (a fresh clone has no ../shared/data)")
    directory = exported_tokenizer(Tokenizer.load(REAL_TOKENIZER), tmp_path / "tok")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")} == {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["additional_special_tokens"] == RELEASED_ADDITIONAL
    # the released template extended with tool names (tests/data/test_chat_template.py: the same text without)
    assert config["chat_template"] == CHAT_TEMPLATE
    decoder = {i: entry["content"] for i, entry in config["added_tokens_decoder"].items()}
    assert decoder == {"0": "<unk>", "1": "<s>", "2": "</s>", **RELEASED_CHAT_TOKENS}
    assert all(entry["special"] and not entry["normalized"] for entry in config["added_tokens_decoder"].values())
    special = json.loads((directory / "special_tokens_map.json").read_text())
    assert special == {"additional_special_tokens": RELEASED_ADDITIONAL, "bos_token": "<s>", "eos_token": "</s>",
                       "pad_token": "</s>", "unk_token": "<unk>"}


def test_exported_model_file_only_renames_the_spare_chat_pieces(tmp_path):
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"InternLM2's tokenizer.model is not at {REAL_TOKENIZER} (a fresh clone has no ../shared/data)")
    import sentencepiece as spm

    raw = spm.SentencePieceProcessor(model_file=str(REAL_TOKENIZER))
    exported = spm.SentencePieceProcessor(
        model_proto=hf_tokenizer_files(Tokenizer.load(REAL_TOKENIZER))["tokenizer.model"])
    assert exported.get_piece_size() == raw.get_piece_size()
    renamed = {int(i): t for i, t in RELEASED_CHAT_TOKENS.items()}
    for i in range(raw.get_piece_size()):
        assert exported.id_to_piece(i) == renamed.get(i, raw.id_to_piece(i)), i
        assert exported.get_score(i) == raw.get_score(i), i
        kinds = ("is_control", "is_unknown", "is_unused", "is_byte")
        assert [getattr(exported, k)(i) for k in kinds] == [getattr(raw, k)(i) for k in kinds], i
    for text in TEXTS[:3]:
        assert exported.encode(text) == raw.encode(text)


# ---- InternLM2's own modeling code on an export

REMOTE_CODE = os.environ.get("INTERNLM2_REMOTE_CODE")
REMOTE_FILES = ("configuration_internlm2.py", "modeling_internlm2.py")


@pytest.mark.skipif(not REMOTE_CODE, reason="set INTERNLM2_REMOTE_CODE to a directory with InternLM2's "
                                            "configuration_internlm2.py and modeling_internlm2.py to run it")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_internlm2_remote_code_runs_the_export(dtype, tmp_path):
    from transformers import AutoModelForCausalLM

    # 40 tokens past max_position_embeddings 16: dynamic NTK is active in both implementations.
    model = random_model(tiny_config(max_position_embeddings=16, rope_scaling_factor=2.0), dtype=dtype)
    save_pretrained(model, tmp_path / "export")
    for name in REMOTE_FILES:
        shutil.copy(Path(REMOTE_CODE) / name, tmp_path / "export" / name)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True,
                                                  torch_dtype=dtype).eval()
    assert type(theirs).__module__.endswith("modeling_internlm2")
    ids = random_ids((2, 40), model.config.vocab_size)
    with torch.no_grad():
        exact = load_pretrained(tmp_path / "export", kernels="reference", dtype=torch.float32).eval()(ids).logits
        ours = load_pretrained(tmp_path / "export", kernels="reference").eval()(ids).logits
        got = theirs(ids).logits
    ours_error = (ours.double() - exact.double()).abs().max().item()
    their_error = (got.double() - exact.double()).abs().max().item()
    # fp32: the same math. bf16: within 3x our own bf16 error against fp32 (measured 0.6-2.1x over seeds:
    # their code also rounds the RoPE tables and attention probabilities to bf16).
    assert their_error <= (1e-4 if dtype == torch.float32 else 3 * ours_error + 1e-2), (their_error, ours_error)


@pytest.mark.skipif(not REMOTE_CODE or not (Path(REMOTE_CODE) / "tokenization_internlm2.py").is_file(),
                    reason="set INTERNLM2_REMOTE_CODE to a directory with InternLM2's tokenization_internlm2.py")
def test_internlm2_remote_tokenizer_reads_the_export(tokenizer, tmp_path):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    directory = exported_tokenizer(tokenizer, tmp_path / "tok")
    shutil.copy(Path(REMOTE_CODE) / "tokenization_internlm2.py", directory)
    theirs = get_class_from_dynamic_module("tokenization_internlm2.InternLM2Tokenizer", directory).from_pretrained(
        directory)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == tokenizer.encode(text, bos=True), text
