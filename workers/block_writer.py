"""Writes quantized blocks into their planned shards on a background thread, so block b+1 computes
while block b goes to disk.

At most two blocks are in flight (one being written, one queued): `submit` waits for room, which
bounds the host memory held for writing. `wait_durable(b)` returns once block b's bytes are fsynced;
only then may its marker be written, so a resumed job never trusts bytes that are not on disk.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch import Tensor

from rayquant.storage.staging import open_shard_path
from rayquant.storage.shard_files import prepare_shard, read_shard_tensors, write_shard_tensors
from rayquant.storage.shard_plan import ShardPlan
from rayquant.workers import failpoints

QUEUED_BLOCKS = 1  # blocks waiting while another is written


@dataclass(frozen=True)
class OutputTarget:
    """Where the worker holding a block's packed tensors writes them: a directory every worker sees."""

    out_dir: str  # the job's local output (embedded Ray, or a mount shared by every node)
    plan: ShardPlan


class PendingTensors(Protocol):
    def result(self) -> dict[str, Tensor]: ...


class BlockWriter:
    """One writer thread per worker; `submit` blocks while QUEUED_BLOCKS wait already."""

    def __init__(self, target: OutputTarget):
        self.target = target
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUED_BLOCKS)
        self._done: dict[int, float | BaseException] = {}  # block -> write seconds, or the write's error
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="block-writer", daemon=True)
        self._thread.start()

    def submit(self, block_idx: int, tensors: PendingTensors) -> None:
        self._queue.put((block_idx, tensors))

    def wait_durable(self, block_idx: int) -> float:
        """Seconds block block_idx took to write, once it is fsynced; re-raises the write's error."""
        with self._cond:
            self._cond.wait_for(lambda: block_idx in self._done)
            outcome = self._done.pop(block_idx)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _run(self) -> None:
        while True:
            block_idx, pending = self._queue.get()
            t = time.perf_counter()
            try:
                self._write(block_idx, pending.result())
                outcome: float | BaseException = time.perf_counter() - t
            except BaseException as e:  # noqa: BLE001 - handed to wait_durable's caller
                outcome = e
            with self._cond:
                self._done[block_idx] = outcome
                self._cond.notify_all()

    def _write(self, block_idx: int, tensors: dict[str, Tensor]) -> None:
        shard = self.target.plan.shard_of_block(block_idx)
        path = open_shard_path(Path(self.target.out_dir), shard)
        prepare_shard(path, shard)
        failpoints.reach(0, block_idx, "persist")
        write_shard_tensors(path, shard, tensors, block_idx)
        failpoints.reach(0, block_idx, "persisted")  # on disk, its marker not yet written


def read_durable_block(target: OutputTarget | None, block_idx: int) -> dict[str, Tensor]:
    """A durable block's tensors, read back from its shard (resume replays the blocks before it)."""
    if target is None:
        raise ValueError("replaying a block needs the output its shards were written to: set_output(...) first")
    shard = target.plan.shard_of_block(block_idx)
    path = open_shard_path(Path(target.out_dir), shard)
    return read_shard_tensors(path, [t.name for t in shard.block_tensors(block_idx)])
