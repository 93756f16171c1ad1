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


def read_json_lines(path: Path | str) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl), skipping a line that is not a whole record: a
    run killed mid-write can leave its last line torn, even cut mid-character."""
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


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


# ----------------------------------------------------------------------------------------------
# One writer per folder


class FolderBusy(RuntimeError):
    """This process may not write the folder (another live process does, or it is not writable); the
    message names it and the fix."""


_HELD_LOCKS: dict[Path, int] = {}  # folder -> the open lock file: the lock lasts as long as the process


def lock_folder(folder: Path | str, what: str) -> Path:
    """Take the exclusive lock of FOLDER/.lock for this process (`what` it does there, e.g. "train.py",
    is written beside its pid), or raise FolderBusy naming the process that holds it. An OS lock (flock): the kernel releases it when its holder exits or is killed, so
    a run killed with -9 never blocks the next. Taking a lock this process holds is a no-op."""
    import fcntl

    folder = Path(folder).resolve()
    if folder in _HELD_LOCKS:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise FolderBusy(f"cannot write in {folder} ({error.strerror}); choose a folder you can write") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "of unknown pid"
        os.close(descriptor)
        raise FolderBusy(f"{folder} is in use by process {holder}; wait for it to finish, stop it, or choose "
                         f"another folder") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()} ({what})\n".encode(), 0)
    _HELD_LOCKS[folder] = descriptor
    return folder


def unlock_folder(folder: Path | str):
    """Give back a lock this process took (it also goes when the process ends)."""
    descriptor = _HELD_LOCKS.pop(Path(folder).resolve(), None)
    if descriptor is not None:
        os.close(descriptor)  # closing the only descriptor releases the flock
