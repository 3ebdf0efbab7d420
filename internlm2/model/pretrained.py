"""HF checkpoints in and out: `from_pretrained`, `save_pretrained`, and directory-to-directory conversion.

Every tensor of a checkpoint is checked against the model the config describes: missing and unexpected
tensors are listed, a wrong shape names the tensor with the expected and found shapes. Loading streams
one tensor at a time into a model built on the meta device (each rank keeps only its tensor-parallel
shard), so peak memory is the model plus one full tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from internlm2.model.checkpoint_files import (
    CheckpointError,
    CheckpointReader,
    atomic_directory,
    copy_companion_files,
    parse_size,
    write_safetensors_shards,
)
from internlm2.data.chat_template import add_chat_template
from internlm2.model.config import ModelConfig
from internlm2.model.hf_config import FORMATS, config_to_hf, read_hf_config
from internlm2.model.hf_layout import IGNORED_SOURCE_TENSOR, from_ours, source_names, to_ours
from internlm2.model.model import InternLM2ForCausalLM
from internlm2.parallel import ParallelState
from internlm2.parallel.tensor_parallel import gather_tensor, local_shard

DEFAULT_MAX_SHARD_SIZE = "5GB"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def full_parameter_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of the whole (single-process) model, computed on the meta device."""
    model = InternLM2ForCausalLM(config.replace(kernels="reference"), device="meta")
    return {name: p.shape for name, p in model.named_parameters()}


def _short_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def read_tensors(reader: CheckpointReader, config: ModelConfig, fmt: str,
                 names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors (InternLM2 names and layout) from checkpoint `reader` in format `fmt`, one at a time.

    The whole checkpoint is checked for missing and unexpected tensors first; then each tensor's shape as
    it is read. `names` restricts which of ours are produced (a pipeline stage's)."""
    expected = full_parameter_shapes(config)
    needed = {src for ours in expected for src in source_names(ours, fmt)}
    present = {n for n in reader.names() if not IGNORED_SOURCE_TENSOR.match(n)}
    missing, unexpected = sorted(needed - present), sorted(present - needed)
    if missing or unexpected:
        parts = [f"missing tensors: {_short_list(missing)}"] if missing else []
        parts += [f"unexpected tensors: {_short_list(unexpected)}"] if unexpected else []
        raise CheckpointError(f"checkpoint {reader.directory} ({fmt} layout) does not match its config: " + "; ".join(parts))
    for ours in expected if names is None else names:
        meta = torch.empty(expected[ours], device="meta")
        sources = []
        for src, want in from_ours(ours, meta, fmt, config):
            tensor = reader.get(src)
            if tensor.shape != want.shape:
                raise CheckpointError(
                    f"tensor {src} in {reader.directory} has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(want.shape)} for the config in config.json"
                )
            sources.append(tensor)
        yield ours, to_ours(ours, sources, fmt, config)


def _materialize(model: torch.nn.Module, device) -> None:
    """Allocates a meta-device model's parameters on `device` (uninitialised). Moving off the meta device
    replaces the Parameter objects, so their tensor-parallel marks are carried over by name."""
    marks = {name: getattr(p, "tensor_parallel_dim", None) for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        if marks[name] is not None:
            param.tensor_parallel_dim = marks[name]


def load_pretrained(directory: str | Path, *, parallel: ParallelState | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", kernels: str = "fused", **model_kwargs) -> InternLM2ForCausalLM:
    """An `InternLM2ForCausalLM` (or a pipeline stage of one: `layer_ids`, `with_embedding`, `with_head`)
    with the weights of the HF InternLM2 or Llama checkpoint in `directory`.

    dtype: the parameters' dtype (default: the checkpoint's `torch_dtype`, else float32)."""
    directory = Path(directory)
    config, fmt, stored_dtype = read_hf_config(directory, kernels=kernels)
    reader = CheckpointReader(directory)
    dtype = dtype or _DTYPES.get(stored_dtype, torch.float32)
    model = InternLM2ForCausalLM(config, parallel, dtype=dtype, device="meta", **model_kwargs)
    _materialize(model, device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in read_tensors(reader, config, fmt, names=params):
            param = params[name]
            param.copy_(local_shard(name, param, full, model.parallel))
    model.source_directory = directory
    return model


def full_tensors(model: InternLM2ForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's parameters as full tensors, one at a time (tensor-parallel shards gathered: every TP
    rank must iterate together)."""
    if model.layer_ids != list(range(model.config.num_layers)) or not (model.with_embedding and model.with_head):
        raise ValueError("a pipeline stage holds part of the model; save the full model (gather the stages first)")
    for name, param in model.named_parameters():
        dim = getattr(param, "tensor_parallel_dim", None)
        yield name, param.detach() if dim is None else gather_tensor(param, model.parallel, dim)


def save_pretrained(model: InternLM2ForCausalLM, directory: str | Path, *, fmt: str = "internlm2",
                    dtype: torch.dtype | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    tokenizer_directory: str | Path | None = None, overwrite: bool = False) -> Path | None:
    """Writes `model` as an HF checkpoint (see `write_pretrained`). Under tensor parallelism every TP rank
    calls this (the shards are gathered) and global rank 0 writes. The tokenizer is copied from
    `tokenizer_directory`, else from the directory the model was loaded from."""
    tensors = full_tensors(model)
    if model.parallel.rank != 0:
        for _ in tensors:  # take part in the gathers of rank 0's tensor-parallel group
            pass
        return None
    source = tokenizer_directory or getattr(model, "source_directory", None)
    return write_pretrained(directory, model.config, tensors, fmt=fmt, dtype=dtype, max_shard_size=max_shard_size,
                            source_directory=source, overwrite=overwrite)


def write_pretrained(directory: str | Path, config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], *,
                     fmt: str = "internlm2", dtype: torch.dtype | None = None,
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, source_directory: str | Path | None = None,
                     overwrite: bool = False) -> Path:
    """Writes an HF checkpoint directory in format `fmt` from our full tensors (name, tensor), which are
    consumed one at a time. Tokenizer files (and InternLM2's remote code, for the InternLM2 format) are
    copied from `source_directory` when given. Atomic: nothing appears at `directory` unless all succeeds."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    max_bytes = parse_size(max_shard_size)
    stored: list[torch.dtype] = []

    def converted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            tensor = tensor if dtype is None else tensor.to(dtype)
            stored.append(tensor.dtype)
            yield from from_ours(name, tensor, fmt, config)

    hf_config = config_to_hf(config, fmt, torch_dtype="float32")  # validates the format before any write
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_safetensors_shards(tmp, converted(), max_bytes)
        hf_config["torch_dtype"] = _dtype_name(stored[0]) if stored else "float32"
        source = Path(source_directory) if source_directory is not None else None
        copied = copy_companion_files(source, tmp, with_remote_code=fmt == "internlm2") if source else []
        if "tokenizer.model" in copied:  # the chat template for transformers' apply_chat_template
            add_chat_template(tmp)
        if fmt == "internlm2" and source is not None and any(n.endswith(".py") for n in copied):
            auto_map = json.loads((source / "config.json").read_text()).get("auto_map")
            if auto_map:
                hf_config["auto_map"] = auto_map
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return Path(directory)


def convert_checkpoint(source: str | Path, target: str | Path, fmt: str, *, dtype: torch.dtype | None = None,
                       max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Rewrites the HF checkpoint `source` (InternLM2 or Llama layout) as `target` in layout `fmt`,
    streaming one tensor at a time (no model is built)."""
    source = Path(source)
    config, source_fmt, _ = read_hf_config(source)
    reader = CheckpointReader(source)
    return write_pretrained(target, config, read_tensors(reader, config, source_fmt), fmt=fmt, dtype=dtype,
                            max_shard_size=max_shard_size, source_directory=source, overwrite=overwrite)
