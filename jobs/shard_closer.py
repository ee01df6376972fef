"""Closing each shard as soon as every tensor of it is durable: checksum, final name, upload.

The checksum is taken while the shard fills (storage/shard_hashing.py): each block marked durable moves
its shard's hash on, on the closer's own thread, while the next block computes. A shard of non-block
tensors only (embeddings and head too large to join the last block shard) closes once they are
written, during the blocks; the rest close after their last block, or at the finish.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from rayquant.jobs.publishing import Publisher
from rayquant.storage import staging
from rayquant.storage.output_layout import STAGING
from rayquant.storage.shard_hashing import ShardHasher
from rayquant.storage.shard_plan import PlannedShard, ShardPlan


class ShardCloser:
    """Hashes and closes the plan's shards on a thread of its own; every method but `drain` returns at once.

    `begin` at each start of the workers (after a recovery too), `block_durable` after each block's marker,
    `finish` after the last block: its future ends when every shard is closed, and raises the first error
    of any earlier hashing or closing (or of the non-block tensors' write).
    """

    def __init__(self, out_dir: Path, publisher: Publisher | None):
        self.out_dir = Path(out_dir)
        self.publisher = publisher
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="close-shard")
        self._plan: ShardPlan | None = None
        self._hashers: dict[str, ShardHasher] = {}  # the shards not closed yet
        self._durable: set[int] = set()
        self._non_block: Future | None = None
        self._error: BaseException | None = None

    def begin(self, plan: ShardPlan, resume: int, non_block: Future) -> None:
        """Blocks below `resume` are durable; `non_block` is the write of the non-block tensors."""
        self._submit(self._begin, plan, resume, non_block)
        # a shard of non-block tensors alone closes once they are written; one with blocks waits for them
        non_block.add_done_callback(lambda _: self._submit(self._close_ready, False))

    def block_durable(self, block_idx: int) -> None:
        self._submit(self._block_durable, block_idx)

    def finish(self) -> Future:
        return self._pool.submit(self._finish)

    def drain(self) -> None:
        """Wait until the work queued so far has ended (its errors surface at `finish`)."""
        self._pool.submit(lambda: None).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, fn, *args) -> None:
        try:
            self._pool.submit(self._guarded, fn, *args)
        except RuntimeError:  # shut down: the job is ending, nothing more to close
            pass

    def _guarded(self, fn, *args) -> None:
        if self._error is not None:
            return
        try:
            fn(*args)
        except BaseException as err:  # noqa: BLE001 - kept for finish(), which raises it in the driver
            self._error = err

    def _begin(self, plan: ShardPlan, resume: int, non_block: Future) -> None:
        self._plan, self._non_block = plan, non_block
        self._durable = set(range(resume))
        self._hashers = {s.name: ShardHasher(self.out_dir / STAGING / s.name, s) for s in plan.shards
                         if not (self.out_dir / s.name).is_file()}  # closed by an earlier run
        self._close_ready(True)

    def _block_durable(self, block_idx: int) -> None:
        self._durable.add(block_idx)
        self._close_ready(True)

    def _close_ready(self, with_blocks: bool) -> None:
        """Hash on, and close every shard now whole. `with_blocks` False (the non-block write just ended, maybe
        while replacement workers read earlier blocks back from their shards): only shards without blocks."""
        for name, hasher in list(self._hashers.items()):
            if with_blocks or not hasher.shard.blocks:
                hasher.advance(self._is_durable)
                if hasher.done:
                    self._close(hasher)

    def _is_durable(self, block_idx: int | None) -> bool:
        if block_idx is None:
            return self._non_block is not None and self._non_block.done() and self._non_block.exception() is None
        return block_idx in self._durable

    def _close(self, hasher: ShardHasher) -> None:
        del self._hashers[hasher.shard.name]
        close_and_hand_over(self.out_dir, hasher.shard, self.publisher, hasher.entry())

    def _finish(self) -> None:
        if self._error is not None:
            raise self._error
        self._non_block.result()  # its error raised here
        self._close_ready(True)
        if self._hashers:  # every block was marked durable by now: a bug if not
            raise RuntimeError(f"shards left open after the last block: {sorted(self._hashers)}")


def close_and_hand_over(out_dir: Path, shard: PlannedShard, publisher: Publisher | None, entry: dict) -> None:
    """Close one shard under `entry`, the checksum taken while it filled; a remote output starts uploading it."""
    staging.close_shard(out_dir, shard, entry)
    if publisher is not None:
        publisher.shard_closed(shard.name)
