"""storage/shard_hashing.py on real shard files: the hash taken while the shard fills is the file's sha256."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rayquant.storage.atomic_files import file_entry
from rayquant.storage.model_source import ModelSource, read_source_tensor
from rayquant.storage.shard_files import prepare_shard, write_shard_tensors
from rayquant.storage.shard_hashing import ShardHasher

from .staged_output import block_part, plan_of


def _one_shard(source: ModelSource, path: Path):
    (shard,) = plan_of(source).shards  # blocks 0-2 and the non-block tensors, in save_file's order
    prepare_shard(path, shard)
    return shard


def test_hashing_as_blocks_land_out_of_order_reads_each_byte_once_and_gives_the_files_sha256(
        source: ModelSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "model-00001-of-00001.safetensors"
    shard = _one_shard(source, path)
    reads = []
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: reads.append((at, n)) or pread(fd, n, at))
    hasher = ShardHasher(path, shard)
    durable: set[int | None] = set()

    for b in (1, 0, 2):  # the order blocks may finish in; each then counts as durable
        write_shard_tensors(path, shard, block_part(b), b)
        durable.add(b)
        hasher.advance(durable.__contains__)
        assert not hasher.done  # the non-block tensors are not written yet
    before_tail = sum(n for _, n in reads)
    write_shard_tensors(path, shard, {t.name: read_source_tensor(source, t.name) for t in shard.block_tensors(None)},
                        None)
    durable.add(None)
    hasher.advance(durable.__contains__)

    assert hasher.done and hasher.entry() == file_entry(tmp_path, path.name)
    assert 0 < before_tail < shard.size  # most of it was hashed while blocks landed, the rest after
    covered = sorted(reads)
    assert covered[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(covered, covered[1:]))  # each byte once
    assert sum(n for _, n in reads) == shard.size


def test_an_unfinished_hash_and_a_short_file_are_refused(source: ModelSource, tmp_path: Path):
    path = tmp_path / "model-00001-of-00001.safetensors"
    shard = _one_shard(source, path)
    hasher = ShardHasher(path, shard)
    hasher.advance(lambda b: b == 0)
    with pytest.raises(RuntimeError, match="is not hashed yet"):
        hasher.entry()

    os.truncate(path, shard.size - 10)  # cut short under the hasher: it names the file and the byte
    with pytest.raises(OSError, match=f"ends at byte {shard.size - 10}"):
        ShardHasher(path, shard).advance(lambda b: True)
