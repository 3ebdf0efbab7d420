"""The files of an HF checkpoint directory: reading tensors lazily, writing sharded safetensors atomically.

Readers never unpickle: safetensors files are memory-mapped, legacy `pytorch_model*.bin` files go through
`torch.load(weights_only=True)`. The writer builds the whole directory under a temporary sibling name and
renames it into place only when every file is complete, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from internlm2.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Files copied beside the weights when a checkpoint is rewritten: the tokenizer, generation defaults and
# InternLM2's remote-code modules (which its config.json's auto_map points at).
COMPANION_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "generation_config.json",
)
REMOTE_CODE_GLOB = "*internlm2*.py"




class CheckpointReader:
    """Tensors of an HF checkpoint directory by name, each loaded only when asked for."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        self._bins: dict[str, dict] = {}
        self._file_of = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        d = self.directory
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = d / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise CheckpointError(f"{index} is not a valid index (no weight_map): {err}") from err
                absent = sorted({f for f in weight_map.values() if not (d / f).is_file()})
                if absent:
                    raise FileNotFoundError(f"{index} lists shard(s) missing from {d}: {', '.join(absent)}")
                return weight_map
        for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
            if (d / single).is_file():
                return {name: single for name in self._names_in(single)}
        raise FileNotFoundError(
            f"no weights in {d}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
        )

    def _open_safetensors(self, filename: str):
        try:
            return safe_open(self.directory / filename, framework="pt", device="cpu")
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {self.directory / filename} (corrupt or truncated?): {err}") from err

    def _bin(self, filename: str) -> dict:
        """The memory-mapped state dict of a legacy .bin file (kept open: unpickling it again per tensor
        would cost more than its mapping)."""
        if filename not in self._bins:
            path = self.directory / filename
            try:
                # weights_only: tensors and plain containers only, never arbitrary pickled objects.
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as err:
                raise CheckpointError(f"{path} holds pickled objects other than tensors; refusing to load it "
                                      f"(only weights are read, never code): {str(err).splitlines()[-1]}") from err
            except (OSError, RuntimeError, EOFError) as err:
                raise CheckpointError(f"cannot read {path} (corrupt or truncated?): {err}") from err
            if not isinstance(state, dict):
                raise CheckpointError(f"{path} does not hold a dict of tensors")
            self._bins[filename] = state
        return self._bins[filename]

    def _names_in(self, filename: str) -> list[str]:
        if filename.endswith(".safetensors"):
            with self._open_safetensors(filename) as handle:
                return list(handle.keys())
        return list(self._bin(filename))

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    @contextmanager
    def _lazy(self, name: str) -> Iterator[tuple[torch.Size, Callable[[tuple], torch.Tensor]]]:
        """(shape of tensor `name`, a function reading the part of it an index selects), valid inside the
        block. A safetensors file is mapped only for the block, so the pages a read touched leave this
        process's resident memory after each tensor."""
        filename = self._file_of[name]
        where = self.directory / filename
        if not filename.endswith(".safetensors"):
            tensor = self._bin(filename).get(name)
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{name} in {where} is not a tensor")
            yield tensor.shape, lambda index: tensor[index].clone()  # out of the map: only those pages are read
            return
        with self._open_safetensors(filename) as handle:
            try:
                lazy = handle.get_slice(name)
            except SafetensorError as err:
                raise CheckpointError(f"tensor {name} is listed for {where} but unreadable: {err}") from err

            def read(index: tuple) -> torch.Tensor:
                try:
                    return lazy[index]
                except SafetensorError as err:
                    raise CheckpointError(f"cannot read tensor {name} from {where} (corrupt or truncated?): "
                                          f"{err}") from err

            yield torch.Size(lazy.get_shape()), read

    def shape(self, name: str) -> torch.Size:
        """The shape of tensor `name`, read from the file's header (no data)."""
        with self._lazy(name) as (shape, _):
            return shape

    def get(self, name: str, part: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Tensor `name`, or with `part=(dim, index, parts)` only its chunk `index` of `parts` equal chunks
        along `dim`: then only that chunk's bytes are read (a tensor-parallel shard costs its own size)."""
        with self._lazy(name) as (shape, read):
            if part is None:
                return read((...,))
            dim, i, parts = part
            if shape[dim] % parts:
                raise CheckpointError(f"tensor {name} in {self.directory / self._file_of[name]}: dim {dim} of "
                                      f"shape {tuple(shape)} does not split into {parts} equal parts")
            size = shape[dim] // parts
            return read((slice(None),) * dim + (slice(i * size, (i + 1) * size),))


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB', '500MiB', '2e9'."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(float(text))


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside `target` that becomes `target` only if the block succeeds."""
    target = Path(target)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not empty (pass overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_safetensors_shards(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Writes `tensors` (consumed one at a time, in order) as `model.safetensors`, or as
    `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when they exceed `max_shard_bytes`."""
    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = 0
    metadata = {"format": "pt"}

    def flush() -> None:
        nonlocal pending, pending_bytes
        save_file(pending, directory / f"shard-{len(shards)}.tmp", metadata=metadata)
        shards.append(list(pending))
        pending, pending_bytes = {}, 0

    seen: set[str] = set()
    for name, tensor in tensors:
        if name in seen:
            raise CheckpointError(f"tensor {name} written twice")
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + nbytes > max_shard_bytes:
            flush()
        pending[name] = tensor.detach().to("cpu").contiguous()
        pending_bytes += nbytes
        total_bytes += nbytes
    if pending or not shards:
        flush()
    if len(shards) == 1:
        os.replace(directory / "shard-0.tmp", directory / SAFETENSORS_SINGLE)
        return
    weight_map = {}
    for i, names in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(directory / f"shard-{i}.tmp", directory / filename)
        weight_map.update(dict.fromkeys(names, filename))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_companion_files(source: Path, target: Path, with_remote_code: bool) -> list[str]:
    """Copies the tokenizer and friends (and InternLM2's remote code when asked) from `source`; returns
    the names copied."""
    names = [n for n in COMPANION_FILES if (source / n).is_file()]
    if with_remote_code:
        names += sorted(p.name for p in source.glob(REMOTE_CODE_GLOB))
    for name in names:
        shutil.copy2(source / name, target / name)
    return names
