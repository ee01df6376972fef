"""jobs/shard_closer.py on a real staged output: each shard closes once its tensors are durable, with the
checksum a close at the end would record."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest

from rayquant.jobs.shard_closer import ShardCloser
from rayquant.storage.atomic_files import file_entry
from rayquant.storage.shard_files import write_shard_tensors
from rayquant.storage.staging import (begin_staging, closed_shard_entry, mark_block_done, open_shard_path,
                                      prepare_shards, write_non_block_tensors)
from tests.storage.staged_output import (FINGERPRINT, N_BLOCKS, SMALL_SHARDS, SPEC, block_layers, block_part,
                                         block_stats, make_source, plan_of)


def _staged(tmp_path: Path):
    source = make_source(tmp_path / "model")
    plan = plan_of(source, SMALL_SHARDS)  # shards: blocks 0-1, block 2, then two of non-block tensors only
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    prepare_shards(out, plan)
    return source, plan, out


def _write_block(out: Path, plan, b: int) -> None:
    shard = plan.shard_of_block(b)
    write_shard_tensors(open_shard_path(out, shard), shard, block_part(b), b)
    mark_block_done(out, b, layers=block_layers(b), stats=block_stats(b))


def _closed(out: Path) -> set[str]:
    return {p.name for p in out.glob("model-*.safetensors")}


def test_each_shard_closes_when_its_tensors_are_durable(tmp_path: Path):
    source, plan, out = _staged(tmp_path)
    names = [s.name for s in plan.shards]
    closer = ShardCloser(out, None)
    non_block = Future()
    closer.begin(plan, 0, non_block)
    closer.drain()
    assert _closed(out) == set()

    write_non_block_tensors(out, source, plan)
    non_block.set_result(None)  # the non-block shards close now, before any block
    closer.drain()
    assert _closed(out) == set(names[2:])

    _write_block(out, plan, 0)
    closer.block_durable(0)
    closer.drain()
    assert _closed(out) == set(names[2:])  # block 1 shares the first shard
    for b in range(1, N_BLOCKS):
        _write_block(out, plan, b)
        closer.block_durable(b)
        closer.drain()
        assert names[b - 1] in _closed(out)
    closer.finish().result()
    closer.shutdown()
    assert all(closed_shard_entry(out, name) == file_entry(out, name) for name in names)


def test_a_resumed_run_closes_the_shards_of_earlier_blocks_and_a_failed_write_fails_the_finish(tmp_path: Path):
    source, plan, out = _staged(tmp_path)
    for b in (0, 1):  # an earlier run's durable blocks
        _write_block(out, plan, b)
    closer = ShardCloser(out, None)
    failed = Future()
    failed.set_exception(OSError("No space left on device"))
    closer.begin(plan, 2, failed)
    closer.drain()
    assert _closed(out) == {plan.shards[0].name}
    assert closed_shard_entry(out, plan.shards[0].name) == file_entry(out, plan.shards[0].name)

    _write_block(out, plan, 2)
    closer.block_durable(2)
    with pytest.raises(OSError, match="No space left"):
        closer.finish().result()
    closer.shutdown()
    assert _closed(out) == {plan.shards[0].name, plan.shards[1].name}  # the non-block shards stay open
