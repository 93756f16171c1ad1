"""Files written whole: a reader sees the old content or the new, never half of either.

Every script that writes a result, a manifest, a stamp or a checkpoint's small files goes through
`write_atomically` (a temporary name beside the target, flushed and fsynced, then one rename, which
POSIX makes atomic within a filesystem), and `fsync_tree` before a folder is renamed into place.
Imports only the standard library, so the torch-free sweep uses it too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path


def write_atomically(path: Path | str, content: str | bytes | Sequence[bytes | memoryview]) -> Path:
    """Write content to path through a temporary file in the same folder and one rename. Content
    may be a sequence of byte parts, written one after the other: a large file (a token shard)
    then needs no second copy in memory."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(content, str):
        content = content.encode()
    parts = [content] if isinstance(content, (bytes, bytearray, memoryview)) else content
    try:
        with open(temporary, "wb") as file:
            for part in parts:
                file.write(part)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # only still there if the write or the rename failed
    return path


def write_json_atomically(path: Path | str, value, indent: int | None = 1, allow_nan: bool = False) -> Path:
    """write_atomically of json.dumps(value), ending in a newline."""
    return write_atomically(path, json.dumps(value, indent=indent, allow_nan=allow_nan) + "\n")


def fsync_tree(folder: Path, files: bool = True):
    """fsync every file under folder (if files) and every folder, so that what was written is on disk."""
    inside = sorted(folder.rglob("*")) if files else []
    paths = [p for p in inside if p.is_file()] + [p for p in inside if p.is_dir()] + [folder]
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
