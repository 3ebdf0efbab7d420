"""Small files of the data pipeline (tokenizer models, manifests, shard headers): written atomically,
and JSON read back with its format tag and version checked."""

import json
import os
from pathlib import Path

from internlm2.data.errors import DataError


def write_atomic(path: Path, data: bytes) -> None:
    """Writes under a temporary name and renames, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, value: dict) -> None:
    write_atomic(path, (json.dumps(value, indent=1) + "\n").encode())


def read_versioned_json(path: Path, fmt: str, version: int, what: str) -> dict:
    """The object in `path`, which must carry `"format": fmt` and `"version": version`."""
    try:
        value = json.loads(Path(path).read_text())
        ok = value.get("format") == fmt
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise DataError(f"{path}: not a {what} (corrupt or foreign file)")
    if value.get("version") != version:
        raise DataError(f"{path}: {what} version {value.get('version')}, this code reads {version}")
    return value
