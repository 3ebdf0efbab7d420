"""A tiny run's model out through `internlm2 export` and back in through `init_from`: the export is in
InternLM2's released format (config.json, tokenizer files) and holds exactly the trained weights; a run
started from it begins with those weights; a checkpoint of another shape is refused by name."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from internlm2.cli import main as cli_main
from internlm2.config import from_dict
from internlm2.data import Tokenizer
from internlm2.model import load_pretrained
from internlm2.model.checkpoint_files import CheckpointError
from internlm2.train.config import TrainConfig
from internlm2.train.trainer import Trainer
from tests.train.tiny_run import make_data, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A finished 3-step run (checkpoint at its end) and the weights it ended with."""
    run = tmp_path_factory.mktemp("run")
    cfg = tiny_config(data_dir, run, **{"stages.0.steps": 2, "stages.1.steps": 1, "checkpoint.every": 3})
    trainer = Trainer(from_dict(TrainConfig, cfg))
    trainer.run()
    return trainer, {n: p.detach().clone() for n, p in trainer.engine.chunks[0].named_parameters()}


@pytest.mark.parametrize("fmt", ["internlm2", "llama"])
def test_export_command_writes_the_released_format(trained, data_dir, tmp_path, capsys, fmt):
    trainer, weights = trained
    out = tmp_path / "hf"
    assert cli_main(["export", "--checkpoint", str(trainer.checkpoints.latest()), "--out", str(out),
                     "--format", fmt, "--dtype", "float32", "--tokenizer", str(data_dir / "tokenizer")]) == 0
    assert "exported step_00000003 (model)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 100000.0  # the base of the stage last trained
    if fmt == "internlm2":
        assert config["auto_map"] == {"AutoConfig": "configuration_internlm2.InternLM2Config",
                                      "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                                      "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
        assert config["pretraining_tp"] == 1 and config["bias"] is False
        assert config["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer = Tokenizer.load(data_dir / "tokenizer")
    decoder = {int(i): e["content"] for i, e in tokenizer_config["added_tokens_decoder"].items()}
    assert decoder == {0: "<unk>", 1: "<s>", 2: "</s>", **{i: t for t, i in tokenizer.special_ids.items()}}
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"], tokenizer_config["pad_token"]) == (
        "<s>", "</s>", "</s>")
    assert json.loads((out / "special_tokens_map.json").read_text())["additional_special_tokens"] == list(
        tokenizer.special_ids)
    text = "<|im_start|>user\ndef f(x):<|im_end|>\n"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tokenizer.encode(text, bos=True)
    again = load_pretrained(out, kernels="reference")
    for name, param in again.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, weights[name]), name


def test_init_from_an_export_starts_from_its_weights(trained, data_dir, tmp_path):
    trainer, weights = trained
    assert cli_main(["export", "--checkpoint", str(trainer.checkpoints.latest()), "--out", str(tmp_path / "hf"),
                     "--dtype", "float32"]) == 0
    cfg = tiny_config(data_dir, tmp_path / "continued", init_from=str(tmp_path / "hf"))
    continued = Trainer(from_dict(TrainConfig, cfg))
    for name, param in continued.engine.chunks[0].named_parameters():
        assert torch.equal(param, weights[name]), name

    wider = tiny_config(data_dir, tmp_path / "wider", init_from=str(tmp_path / "hf"),
                        **{"model.intermediate_size": 256})
    with pytest.raises(CheckpointError, match=r"another model shape: intermediate_size 192 \(model: 256\)"):
        Trainer(from_dict(TrainConfig, wider))
