"""A staged shard's sha256, hashed while the shard fills, so closing it does not re-read gigabytes.

sha256 takes the file's bytes in order, and a shard's tensors lie in save_file's order (dtype, then
name: model.layers.10 before model.layers.2), not in the order blocks finish. The hasher therefore
advances over the longest run of tensors, from the file's start, whose bytes are all durable; each
block marked durable moves it on, and what is left at the close is the tensors that came last.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from rayquant.storage.shard_plan import PlannedShard

READ_BYTES = 8 * 2**20  # per pread: hashlib releases the GIL on large buffers, so the driver's thread keeps going


class ShardHasher:
    """The sha256 of the shard at `path` (laid out as `shard` plans), fed in file order as tensors become durable.

    Call `advance` after every change of what is durable; `entry` once every tensor is. A tensor's bytes must
    not change after it counts as durable (a block's region is written once, before its marker; the non-block
    tensors are written once, before their future completes).
    """

    def __init__(self, path: Path, shard: PlannedShard):
        self.path = Path(path)
        self.shard = shard
        self._digest = hashlib.sha256()
        self._next = 0  # the next tensor (file order) to hash
        self._hashed = 0  # bytes of the file hashed: the header, then each hashed tensor

    @property
    def done(self) -> bool:
        return self._next == len(self.shard.tensors)

    def advance(self, durable: Callable[[int | None], bool]) -> None:
        """Hash on through the tensors, in file order, up to the first whose block (None: the non-block tensors)
        is not `durable` yet."""
        tensors = self.shard.tensors
        end = self._hashed if self._hashed else len(self.shard.header)
        n = self._next
        while n < len(tensors) and durable(tensors[n].block_idx):
            end += tensors[n].nbytes
            n += 1
        if end == self._hashed:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            at = self._hashed
            while at < end:
                chunk = os.pread(fd, min(READ_BYTES, end - at), at)
                if not chunk:
                    raise OSError(f"{self.path} ends at byte {at}, before its planned size {self.shard.size}")
                self._digest.update(chunk)
                at += len(chunk)
        finally:
            os.close(fd)
        self._hashed, self._next = end, n

    def entry(self) -> dict:
        """{path, sha256, size} of the whole shard, as atomic_files.file_entry gives it.

        Raises:
            RuntimeError: a tensor is not hashed yet.
            OSError: the file is not the planned size.
        """
        if not self.done:
            raise RuntimeError(f"{self.shard.name}: tensor {self.shard.tensors[self._next].name} is not hashed yet")
        size = os.stat(self.path).st_size
        if size != self._hashed:
            raise OSError(f"{self.path} is {size} bytes, its plan {self._hashed}")
        return {"path": self.shard.name, "sha256": self._digest.hexdigest(), "size": size}
