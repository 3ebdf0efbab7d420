"""HF checkpoints in and out, as free functions (the modules know nothing of files): `load_pretrained`,
`load_into` (weights into modules that exist already, e.g. a trainer's pipeline chunks), `save_pretrained`,
`write_pretrained` and directory-to-directory `convert_checkpoint`.

A checkpoint's head follows its config.json (`architectures`): a causal LM (`InternLM2ForCausalLM`) or
InternLM2's reward-model layout (`InternLM2ForScore`, HF `InternLM2ForRewardModel`: the backbone plus
`v_head.weight`). `MODEL_CLASSES` is the one table from head kind to model class.

Every tensor of a checkpoint is checked against the model the config describes: missing and unexpected
tensors are listed, a wrong shape names the tensor with the expected and found shapes. Loading streams
one tensor at a time and each rank reads only its tensor-parallel chunk of it (safetensors slices), so
host memory peaks at the parameters plus one chunk; a replicated tensor (a norm weight) is read whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from internlm2.model.checkpoint_files import (
    CheckpointError,
    CheckpointReader,
    atomic_directory,
    copy_companion_files,
    parse_size,
    write_safetensors_shards,
)
from internlm2.constants import DTYPES, dtype_name
from internlm2.model.config import ModelConfig
from internlm2.model.hf_config import FORMATS, config_to_hf, read_hf_config, read_head_kind
from internlm2.model.hf_layout import IGNORED_SOURCE_TENSOR, from_ours, source_names, to_ours
from internlm2.model.model import InternLM2ForCausalLM, InternLM2ForScore
from internlm2.parallel import ParallelState
from internlm2.parallel.tensor_parallel import gather_tensor

DEFAULT_MAX_SHARD_SIZE = "5GB"
MODEL_CLASSES = {"causal_lm": InternLM2ForCausalLM, "score": InternLM2ForScore}


def model_kind(model: nn.Module) -> str:
    """The head kind of a model (or pipeline chunk) instance."""
    for kind, cls in MODEL_CLASSES.items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"no HF head kind for model class {type(model).__name__}")


def full_parameter_shapes(config: ModelConfig, kind: str = "causal_lm") -> dict[str, torch.Size]:
    """Name -> shape of every tensor of the whole (single-process) model, computed on the meta device."""
    model = MODEL_CLASSES[kind](config.replace(kernels="reference"), device="meta")
    return {name: p.shape for name, p in model.named_parameters()}


def _short_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _check_tensor_names(reader: CheckpointReader, fmt: str, expected: Mapping[str, torch.Size]) -> None:
    """Raises naming the missing and unexpected tensors of the whole checkpoint (from its index alone)."""
    needed = {src for ours in expected for src in source_names(ours, fmt)}
    present = {n for n in reader.names() if not IGNORED_SOURCE_TENSOR.match(n)}
    missing, unexpected = sorted(needed - present), sorted(present - needed)
    if missing or unexpected:
        parts = [f"missing tensors: {_short_list(missing)}"] if missing else []
        parts += [f"unexpected tensors: {_short_list(unexpected)}"] if unexpected else []
        raise CheckpointError(f"checkpoint {reader.directory} ({fmt} layout) does not match its config: " + "; ".join(parts))


def _read_tensor(reader: CheckpointReader, config: ModelConfig, fmt: str, name: str, full_shape: torch.Size,
                 part: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Our tensor `name` (of `full_shape`) from the checkpoint, or with `part=(dim, index, parts)` only that
    chunk of it, read as the same chunk of each source tensor (see hf_layout)."""
    chunks = []
    for src, want in from_ours(name, torch.empty(full_shape, device="meta"), fmt, config):
        found = reader.shape(src)
        if found != want.shape:
            raise CheckpointError(f"tensor {src} in {reader.directory} has shape {tuple(found)}, expected "
                                  f"{tuple(want.shape)} for the config in config.json")
        chunks.append(reader.get(src, part))
    return to_ours(name, chunks, fmt, config)


def read_tensors(reader: CheckpointReader, config: ModelConfig, fmt: str,
                 kind: str = "causal_lm") -> Iterator[tuple[str, torch.Tensor]]:
    """Our full tensors (InternLM2 names and layout) from checkpoint `reader` in format `fmt`, one at a time,
    after checking the whole checkpoint for missing and unexpected tensors."""
    expected = full_parameter_shapes(config, kind)
    _check_tensor_names(reader, fmt, expected)
    for name, shape in expected.items():
        yield name, _read_tensor(reader, config, fmt, name, shape)


# The fields that decide the parameters' shapes: a checkpoint loads into a model only if they agree.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                 "num_key_value_heads", "head_size")


def shape_differences(source: ModelConfig, model: ModelConfig) -> list[str]:
    """The shape fields in which a checkpoint's config differs from the model's, as `field a (model: b)`."""
    return [f"{f} {getattr(source, f)} (model: {getattr(model, f)})" for f in _SHAPE_FIELDS
            if getattr(source, f) != getattr(model, f)]


@torch.no_grad()
def load_into(modules: Iterable[nn.Module], directory: str | Path, parallel: ParallelState | None = None, *,
              config: ModelConfig | None = None, fresh: Iterable[str] = ()) -> ModelConfig:
    """Copies the weights of the HF checkpoint `directory` (InternLM2 or Llama layout) into the parameters
    of `modules`: a model, or the pipeline chunks this rank holds (parameter names are global, so a chunk
    takes its own layers). Each tensor is read in turn, only this rank's tensor-parallel chunk of it, and
    cast to its parameter's dtype and device. `config`, the modules' model config: when given, a checkpoint
    of another shape is refused naming the fields that differ, before anything is read. `fresh`: names of
    parameters the checkpoint may lack, which then keep their values (a new head on a pretrained
    backbone, e.g. a reward model's `v_head.weight` on an SFT model); the checkpoint's own head is then
    not read.

    Returns the checkpoint's config (from its config.json)."""
    directory = Path(directory)
    parallel = parallel or ParallelState.single()
    source, fmt, _ = read_hf_config(directory)
    if config is not None:
        differ = shape_differences(source, config)
        if differ:
            raise CheckpointError(f"{directory / 'config.json'} describes another model shape: {', '.join(differ)}")
    reader = CheckpointReader(directory)
    expected = full_parameter_shapes(source, read_head_kind(directory))
    _check_tensor_names(reader, fmt, expected)
    fresh = set(fresh)
    for module in modules:
        for name, param in module.named_parameters():
            if name in fresh and name not in expected:
                continue
            dim = getattr(param, "tensor_parallel_dim", None)
            full = list(param.shape)
            if dim is not None:
                full[dim] *= parallel.tp_size
            if name not in expected or list(expected[name]) != full:
                found = f"shape {tuple(expected[name])}" if name in expected else "no such tensor"
                raise CheckpointError(f"{directory}: parameter {name} of shape {tuple(full)} has {found} in the "
                                      "checkpoint (its config.json describes another model)")
            part = None if dim is None else (dim, parallel.tp_rank, parallel.tp_size)
            param.copy_(_read_tensor(reader, source, fmt, name, expected[name], part))
    return source


def _materialize(model: torch.nn.Module, device) -> None:
    """Allocates a meta-device model's parameters on `device` (uninitialised). Moving off the meta device
    replaces the Parameter objects, so their tensor-parallel marks are carried over by name."""
    marks = {name: getattr(p, "tensor_parallel_dim", None) for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        if marks[name] is not None:
            param.tensor_parallel_dim = marks[name]


def load_pretrained(directory: str | Path, *, parallel: ParallelState | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", kernels: str = "fused", **model_kwargs) -> nn.Module:
    """The model of the HF checkpoint in `directory` (InternLM2 or Llama layout): an `InternLM2ForCausalLM`,
    or an `InternLM2ForScore` for a reward model (or a pipeline stage of either: `layer_ids`,
    `with_embedding`, `with_head`).

    dtype: the parameters' dtype (default: the checkpoint's `torch_dtype`, else float32)."""
    directory = Path(directory)
    config, _, stored_dtype = read_hf_config(directory, kernels=kernels)
    dtype = dtype or DTYPES.get(stored_dtype, torch.float32)
    model = MODEL_CLASSES[read_head_kind(directory)](config, parallel, dtype=dtype, device="meta", **model_kwargs)
    _materialize(model, device)
    load_into([model], directory, model.parallel)
    model.source_directory = directory
    return model


def full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's parameters as full tensors, one at a time (tensor-parallel shards gathered: every TP
    rank must iterate together)."""
    if model.layer_ids != list(range(model.config.num_layers)) or not (model.with_embedding and model.with_head):
        raise ValueError("a pipeline stage holds part of the model; save the full model (gather the stages first)")
    for name, param in model.named_parameters():
        dim = getattr(param, "tensor_parallel_dim", None)
        yield name, param.detach() if dim is None else gather_tensor(param, model.parallel, dim)


def save_pretrained(model: nn.Module, directory: str | Path, *, fmt: str = "internlm2",
                    dtype: torch.dtype | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    tokenizer_directory: str | Path | None = None, tokenizer_files: Mapping[str, bytes] | None = None,
                    overwrite: bool = False) -> Path | None:
    """Writes `model` as an HF checkpoint (see `write_pretrained`). Under tensor parallelism every TP rank
    calls this (the shards are gathered) and global rank 0 writes. Companion files are copied from
    `tokenizer_directory`, else from the directory the model was loaded from."""
    tensors = full_tensors(model)
    if model.parallel.rank != 0:
        for _ in tensors:  # take part in the gathers of rank 0's tensor-parallel group
            pass
        return None
    source = tokenizer_directory or getattr(model, "source_directory", None)
    return write_pretrained(directory, model.config, tensors, fmt=fmt, kind=model_kind(model), dtype=dtype,
                            max_shard_size=max_shard_size, source_directory=source, tokenizer_files=tokenizer_files,
                            overwrite=overwrite)


def write_pretrained(directory: str | Path, config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], *,
                     fmt: str = "internlm2", kind: str = "causal_lm", dtype: torch.dtype | None = None,
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, source_directory: str | Path | None = None,
                     tokenizer_files: Mapping[str, bytes] | None = None, overwrite: bool = False) -> Path:
    """Writes an HF checkpoint directory in format `fmt` from our full tensors (name, tensor), which are
    consumed one at a time. Tokenizer files (and InternLM2's remote code, for the InternLM2 format) are
    copied from `source_directory` when given; `tokenizer_files` (name -> contents, e.g. from
    `internlm2.data.hf_tokenizer_files`) are written over them. Atomic: nothing appears at `directory`
    unless all succeeds."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    max_bytes = parse_size(max_shard_size)
    stored: list[torch.dtype] = []

    def converted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            tensor = tensor if dtype is None else tensor.to(dtype)
            stored.append(tensor.dtype)
            yield from from_ours(name, tensor, fmt, config)

    hf_config = config_to_hf(config, fmt, torch_dtype="float32", kind=kind)  # validates before any write
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_safetensors_shards(tmp, converted(), max_bytes)
        hf_config["torch_dtype"] = dtype_name(stored[0]) if stored else "float32"
        if source_directory is not None:
            copy_companion_files(Path(source_directory), tmp, with_remote_code=fmt == "internlm2")
        for name, contents in (tokenizer_files or {}).items():
            (tmp / name).write_bytes(contents)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def convert_checkpoint(source: str | Path, target: str | Path, fmt: str, *, dtype: torch.dtype | None = None,
                       max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                       tokenizer_files: Mapping[str, bytes] | None = None, overwrite: bool = False) -> Path:
    """Rewrites the HF checkpoint `source` (InternLM2 or Llama layout) as `target` in layout `fmt`,
    streaming one tensor at a time (no model is built); companion files come along (see `write_pretrained`)."""
    source = Path(source)
    config, source_fmt, _ = read_hf_config(source)
    kind = read_head_kind(source)
    reader = CheckpointReader(source)
    return write_pretrained(target, config, read_tensors(reader, config, source_fmt, kind), fmt=fmt, kind=kind,
                            dtype=dtype,
                            max_shard_size=max_shard_size, source_directory=source, tokenizer_files=tokenizer_files,
                            overwrite=overwrite)
