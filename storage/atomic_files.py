"""Files written so a crash leaves the old file or the new one, never half of one.

Each file is written under a temporary name in a directory on the same filesystem, fsynced, renamed
onto its target, and the rename made durable by fsyncing the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


def json_writer(content: object) -> Callable[[Path], None]:
    data = (json.dumps(content, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return lambda path: path.write_bytes(data)


def write_atomic(tmp_dir: Path, target: Path, write: Callable[[Path], None]) -> None:
    """write() a temporary file in tmp_dir (same filesystem), fsync it, rename it onto target."""
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=f"-{target.name}", dir=tmp_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a checkpoint is read like any download
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in path durable (POSIX: the directory entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_entry(out_dir: Path, name: str) -> dict:
    digest = hashlib.sha256()
    size = 0
    for chunk in read_chunks(out_dir / name):
        digest.update(chunk)
        size += len(chunk)
    return {"path": name, "sha256": digest.hexdigest(), "size": size}


def read_chunks(path: Path, chunk_bytes: int = 8 * 2**20) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            yield chunk
