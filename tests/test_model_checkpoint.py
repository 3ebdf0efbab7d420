"""HF checkpoint I/O: bitwise round trips through both layouts, sharding, legacy .bin, the convert
command, and every way a checkpoint can be wrong."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from internlm2.cli import main as cli_main
from internlm2.data import Tokenizer, train_tokenizer
from internlm2.model import ConfigError, convert_checkpoint, load_pretrained, save_pretrained
from internlm2.model.checkpoint_files import CheckpointError, CheckpointReader
from internlm2.model.hf_layout import fuse_qkv, split_wqkv
from tests.test_model_support import random_ids, random_model, tiny_config


def read_all(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, whatever its sharding."""
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(directory / name))
    return tensors


def assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> bytes:
    docs = [f"The quick brown fox {i} jumps over the lazy dog.\nPack my box with five dozen liquor jugs." for i in range(50)]
    return train_tokenizer(docs, tmp_path_factory.mktemp("tok"), 320).model_proto


@pytest.fixture
def internlm2_dir(tmp_path, tokenizer_model):
    """An InternLM2-layout checkpoint (bf16, as released) with a tokenizer file beside it."""
    model = random_model(tiny_config(), dtype=torch.bfloat16)
    path = tmp_path / "internlm2"
    save_pretrained(model, path)
    (path / "tokenizer.model").write_bytes(tokenizer_model)
    return path


def test_wqkv_layout_is_grouped_per_kv_head():
    """Rows of wqkv are [q_0..q_{g-1}, k, v] per KV group: check against an explicit row listing."""
    config = tiny_config()  # 8 heads, 2 KV heads, head_dim 8 -> g = 4
    d, g, kv = config.head_size, config.queries_per_kv, config.num_key_value_heads
    q = torch.arange(8 * d)[:, None].float()  # row i of q holds value i
    k = 1000 + torch.arange(kv * d)[:, None].float()
    v = 2000 + torch.arange(kv * d)[:, None].float()
    wqkv = fuse_qkv(q, k, v, config)
    expected = []
    for h in range(kv):
        for j in range(g):
            expected += list(range((h * g + j) * d, (h * g + j + 1) * d))
        expected += [1000 + i for i in range(h * d, (h + 1) * d)]
        expected += [2000 + i for i in range(h * d, (h + 1) * d)]
    assert wqkv[:, 0].tolist() == expected
    assert all(torch.equal(a, b) for a, b in zip(split_wqkv(wqkv, config), (q, k, v)))


def test_round_trip_internlm2_through_ours_is_bitwise(internlm2_dir, tmp_path):
    model = load_pretrained(internlm2_dir, kernels="reference")
    assert model.output.weight.dtype == torch.bfloat16  # the stored dtype is kept
    save_pretrained(model, tmp_path / "again")
    assert_bitwise_equal(read_all(internlm2_dir), read_all(tmp_path / "again"))
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (internlm2_dir / "tokenizer.model").read_bytes()
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads(
        (internlm2_dir / "config.json").read_text())


def test_round_trip_internlm2_to_llama_and_back_is_bitwise(internlm2_dir, tmp_path):
    convert_checkpoint(internlm2_dir, tmp_path / "llama", "llama")
    llama = read_all(tmp_path / "llama")
    assert "model.layers.1.self_attn.k_proj.weight" in llama and not any("wqkv" in n for n in llama)
    convert_checkpoint(tmp_path / "llama", tmp_path / "back", "internlm2")
    assert_bitwise_equal(read_all(internlm2_dir), read_all(tmp_path / "back"))


def test_sharded_save_and_load(internlm2_dir, tmp_path):
    model = load_pretrained(internlm2_dir, kernels="reference")
    save_pretrained(model, tmp_path / "sharded", fmt="llama", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((tmp_path / "sharded" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(p.numel() * 2 for p in model.parameters())
    again = load_pretrained(tmp_path / "sharded", kernels="reference")
    for (name, a), b in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name


def test_legacy_bin_checkpoint_loads_without_pickle(internlm2_dir, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((internlm2_dir / "config.json").read_text())
    tensors = read_all(internlm2_dir)
    names = sorted(tensors)
    half = len(names) // 2
    torch.save({n: tensors[n] for n in names[:half]}, legacy / "pytorch_model-00001-of-00002.bin")
    torch.save({n: tensors[n] for n in names[half:]}, legacy / "pytorch_model-00002-of-00002.bin")
    weight_map = {n: f"pytorch_model-0000{1 if i < half else 2}-of-00002.bin" for i, n in enumerate(names)}
    (legacy / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_pretrained(legacy, kernels="reference")
    for name, param in model.named_parameters():
        assert torch.equal(param, tensors[name]), name


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_reader_returns_one_chunk_of_a_tensor(internlm2_dir, tmp_path, kind):
    tensors = read_all(internlm2_dir)
    directory = internlm2_dir
    if kind == "bin":
        directory = tmp_path / "legacy"
        directory.mkdir()
        torch.save(tensors, directory / "pytorch_model.bin")
    reader = CheckpointReader(directory)
    name = "model.layers.0.attention.wqkv.weight"
    for dim in (0, 1):
        for i in range(4):
            assert torch.equal(reader.get(name, (dim, i, 4)), tensors[name].chunk(4, dim)[i])
    assert reader.shape(name) == tensors[name].shape and torch.equal(reader.get(name), tensors[name])
    with pytest.raises(CheckpointError, match=r"dim 1 of shape \(96, 64\) does not split into 5 equal parts"):
        reader.get(name, (1, 0, 5))


def test_legacy_bin_with_pickled_code_is_refused(internlm2_dir, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    legacy = tmp_path / "evil"
    legacy.mkdir()
    (legacy / "config.json").write_text((internlm2_dir / "config.json").read_text())
    torch.save({"model.norm.weight": Payload()}, legacy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_pretrained(legacy, kernels="reference")


def test_pipeline_stage_loads_only_its_layers(internlm2_dir):
    stage = load_pretrained(internlm2_dir, kernels="reference", layer_ids=[1],
                                                 with_embedding=False, with_head=True)
    names = [n for n, _ in stage.named_parameters()]
    assert names[0].startswith("model.layers.1.") and "output.weight" in names
    assert not any(n.startswith(("model.layers.0.", "model.tok_embeddings")) for n in names)
    tensors = read_all(internlm2_dir)
    assert torch.equal(stage.model.layers["1"].attention.wqkv.weight, tensors["model.layers.1.attention.wqkv.weight"])


# ---- bad checkpoints: clear errors, nothing written

def edit_weights(directory, edit):
    tensors = read_all(directory)
    edit(tensors)
    os.remove(directory / "model.safetensors")
    save_file(tensors, directory / "model.safetensors")


def test_wrong_shape_names_tensor_and_shapes(internlm2_dir, tmp_path):
    edit_weights(internlm2_dir, lambda t: t.update({"model.layers.1.ffn_norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.ffn_norm\.weight.*\(63,\).*\(64,\)"):
        load_pretrained(internlm2_dir, kernels="reference")
    with pytest.raises(CheckpointError, match="ffn_norm"):
        convert_checkpoint(internlm2_dir, tmp_path / "out", "llama")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary directory left behind"


def test_missing_and_unexpected_tensors_are_listed(internlm2_dir):
    def edit(t):
        del t["model.layers.0.feed_forward.w3.weight"]
        del t["output.weight"]
        t["model.layers.7.attention.wo.weight"] = torch.zeros(2, 2)

    edit_weights(internlm2_dir, edit)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(internlm2_dir, kernels="reference")
    message = str(err.value)
    assert "missing tensors: model.layers.0.feed_forward.w3.weight, output.weight" in message
    assert "unexpected tensors: model.layers.7.attention.wo.weight" in message


def test_config_errors_name_the_key(internlm2_dir):
    path = internlm2_dir / "config.json"
    original = json.loads(path.read_text())
    for change, pattern in [
        ({"rope_sclaing": None}, "unknown config key.*rope_sclaing"),
        ({"bias": True}, "bias=True is not supported"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"num_key_value_heads": 3}, "num_attention_heads \\(8\\) must be divisible by num_key_value_heads \\(3\\)"),
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ]:
        path.write_text(json.dumps({**original, **change}))
        with pytest.raises(ConfigError, match=pattern):
            load_pretrained(internlm2_dir, kernels="reference")
    broken = dict(original)
    del broken["hidden_size"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="missing key.*hidden_size"):
        load_pretrained(internlm2_dir, kernels="reference")


def test_missing_directory_index_shard_and_corrupt_file(internlm2_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_pretrained(tmp_path / "does-not-exist")
    model = load_pretrained(internlm2_dir, kernels="reference")
    save_pretrained(model, tmp_path / "sharded", max_shard_size="20KB")
    second = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))[1]
    os.remove(tmp_path / "sharded" / second)
    with pytest.raises(FileNotFoundError, match=second):
        convert_checkpoint(tmp_path / "sharded", tmp_path / "out", "llama")
    assert not (tmp_path / "out").exists()
    (internlm2_dir / "model.safetensors").write_bytes((internlm2_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_pretrained(internlm2_dir, kernels="reference")


def test_existing_target_is_kept_unless_overwrite(internlm2_dir, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_checkpoint(internlm2_dir, target, "llama")
    assert (target / "keep.txt").read_text() == "mine"
    convert_checkpoint(internlm2_dir, target, "llama", overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()


def test_internlm2_layout_needs_head_dim_times_heads_equal_hidden(tmp_path):
    model = random_model(tiny_config(head_dim=16))  # 8 heads x 16 != hidden 64: fine for Llama
    save_pretrained(model, tmp_path / "llama", fmt="llama")
    with pytest.raises(ConfigError, match=r"head_dim \(16\) x num_attention_heads \(8\) == hidden_size \(64\)"):
        save_pretrained(model, tmp_path / "internlm2", fmt="internlm2")
    assert not (tmp_path / "internlm2").exists()
    again = load_pretrained(tmp_path / "llama", kernels="reference")
    ids = random_ids((9,), 320)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


# ---- the command line

def test_convert_command_round_trip(internlm2_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert cli_main(["convert", "--from", str(internlm2_dir), "--to", str(tmp_path / "l"), "--format", "llama"]) == 0
    assert cli_main(["convert", "--from", str(tmp_path / "l"), "--to", str(tmp_path / "i"), "--format", "internlm2",
                     "--max-shard-size", "30KB"]) == 0
    assert_bitwise_equal(read_all(internlm2_dir), read_all(tmp_path / "i"))
    config = json.loads((tmp_path / "i" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    assert config["pretraining_tp"] == 1 and config["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    # The Llama target loads in plain transformers, tokenizer included.
    tokenizer = Tokenizer.load(internlm2_dir)
    text = "<|im_start|>user\nThe quick brown fox<|im_end|>\n"
    assert AutoTokenizer.from_pretrained(tmp_path / "l")(text)["input_ids"] == tokenizer.encode(text, bos=True)
    ids = torch.tensor([tokenizer.encode(text, bos=True)])
    with torch.no_grad():
        theirs = LlamaForCausalLM.from_pretrained(tmp_path / "l", dtype=torch.float32)(ids).logits
        ours = load_pretrained(tmp_path / "i", kernels="reference", dtype=torch.float32)(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    for target in ("l", "i"):
        assert Tokenizer.load(tmp_path / target).special_ids == tokenizer.special_ids
        assert (tmp_path / target / "tokenizer.model").read_bytes() == tokenizer.model_proto  # names them already
    assert cli_main(["convert", "--from", str(tmp_path / "nowhere"), "--to", str(tmp_path / "x"),
                     "--format", "llama"]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert cli_main(["convert", "--from", str(internlm2_dir), "--to", str(tmp_path / "f"), "--format", "llama",
                     "--dtype", "float32"]) == 0
    converted = read_all(tmp_path / "f")
    assert all(t.dtype == torch.float32 for t in converted.values())
    assert json.loads((tmp_path / "f" / "config.json").read_text())["torch_dtype"] == "float32"
