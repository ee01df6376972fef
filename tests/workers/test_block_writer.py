"""The background block writer on real shard files: durable bytes, order, errors, reading back."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from rayquant.storage.output_layout import STAGING
from rayquant.storage.safetensors_reader import DTYPES
from rayquant.storage.shard_files import TensorsNotAsPlanned
from rayquant.storage.shard_plan import PlannedTensor, plan_shards
from rayquant.storage.staging import begin_staging, close_shard, open_shard_path
from rayquant.workers.block_writer import BlockWriter, OutputTarget, read_durable_block

# a writer that never reports a block would hang wait_durable forever
pytestmark = pytest.mark.timeout(30)

N_BLOCKS = 3
FINGERPRINT = "c" * 64
SPEC = {"name": "writer-test"}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _block(b: int) -> dict[str, torch.Tensor]:
    """A packed block as rank 0 hands it to the writer."""
    g = torch.Generator().manual_seed(10 + b)
    p = f"model.layers.{b}.mlp.down_proj"
    return {
        f"{p}.qweight": torch.randint(-(2**31), 2**31 - 1, (8, 16), generator=g, dtype=torch.int32),
        f"{p}.scales": torch.rand(4, 16, generator=g).to(torch.float16),
        f"model.layers.{b}.post_attention_layernorm.weight": torch.randn(16, generator=g).to(torch.bfloat16),
    }


@pytest.fixture
def target(tmp_path: Path) -> OutputTarget:
    """Blocks 0 and 1 share a shard, block 2 has its own; the staging area exists as the driver leaves it."""
    planned = [PlannedTensor(n, _DTYPE_NAMES[t.dtype], tuple(t.shape), b) for b in range(N_BLOCKS)
               for n, t in _block(b).items()]
    block_bytes = sum(t.nbytes for t in planned) // N_BLOCKS
    plan = plan_shards(planned, max_shard_bytes=2 * block_bytes)
    assert [shard.blocks for shard in plan.shards] == [(0, 1), (2,)]
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    return OutputTarget(str(out), plan)


def _ready(tensors: dict[str, torch.Tensor]) -> Future:
    """What rank 0 submits: a pending host copy, here already complete."""
    future: Future = Future()
    future.set_result(tensors)
    return future


def _bytes_in_file(target: OutputTarget, b: int) -> dict[str, bytes]:
    """Each of block b's planned ranges as it is in the shard file now."""
    shard = target.plan.shard_of_block(b)
    data = open_shard_path(Path(target.out_dir), shard).read_bytes()
    return {t.name: data[shard.file_offsets[t.name]:shard.file_offsets[t.name] + t.nbytes]
            for t in shard.block_tensors(b)}


def _nothing_written(target: OutputTarget, b: int) -> bool:
    """Block b has no byte on disk: its shard is not created yet, or its ranges are still the file's hole."""
    shard = target.plan.shard_of_block(b)
    if not open_shard_path(Path(target.out_dir), shard).exists():
        return True
    return all(data == bytes(len(data)) for data in _bytes_in_file(target, b).values())


def _raw(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {name: t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for name, t in tensors.items()}


def test_block_is_in_its_shard_once_wait_durable_returns(target: OutputTarget):
    writer = BlockWriter(target)
    writer.submit(0, _ready(_block(0)))
    seconds = writer.wait_durable(0)
    assert isinstance(seconds, float) and seconds >= 0
    assert _bytes_in_file(target, 0) == _raw(_block(0))
    shard = target.plan.shard_of_block(0)
    assert open_shard_path(Path(target.out_dir), shard) == Path(target.out_dir) / STAGING / shard.name
    # block 1 of the same shard is not written yet: its ranges are still the file's hole
    assert _nothing_written(target, 1) and open_shard_path(Path(target.out_dir), shard).exists()


class _Gated:
    """A host copy that finishes only when the test opens the gate; records when the writer asked for it."""

    def __init__(self, block_idx: int, asked: list[int], gate: threading.Event | None = None):
        self.block_idx, self.asked, self.gate = block_idx, asked, gate

    def result(self) -> dict[str, torch.Tensor]:
        self.asked.append(self.block_idx)
        if self.gate is not None:
            self.gate.wait()
        return _block(self.block_idx)


def test_two_blocks_in_flight_are_written_in_submission_order(target: OutputTarget):
    writer = BlockWriter(target)
    asked: list[int] = []
    gate = threading.Event()
    writer.submit(0, _Gated(0, asked, gate))
    writer.submit(1, _Gated(1, asked))  # queued while block 0's copy is still pending
    time.sleep(0.2)  # room for a writer that wrongly skipped ahead to do so
    assert asked == [0]
    assert _nothing_written(target, 1)

    gate.set()
    assert writer.wait_durable(1) >= 0
    # block 1 durable means block 0, submitted first, is durable too
    assert asked == [0, 1]
    assert _bytes_in_file(target, 0) == _raw(_block(0))
    assert _bytes_in_file(target, 1) == _raw(_block(1))
    assert writer.wait_durable(0) >= 0


def test_submit_waits_while_one_block_is_written_and_another_queued(target: OutputTarget):
    writer = BlockWriter(target)
    asked: list[int] = []
    gate = threading.Event()
    writer.submit(0, _Gated(0, asked, gate))
    writer.submit(1, _Gated(1, asked))
    third = threading.Thread(target=writer.submit, args=(2, _Gated(2, asked)))
    third.start()
    third.join(timeout=0.2)
    assert third.is_alive()  # the host memory held for writing stays bounded at two blocks
    gate.set()
    third.join(timeout=10)
    assert not third.is_alive()
    assert [writer.wait_durable(b) >= 0 for b in range(N_BLOCKS)] == [True] * N_BLOCKS
    assert asked == [0, 1, 2]
    assert [_bytes_in_file(target, b) for b in range(N_BLOCKS)] == [_raw(_block(b)) for b in range(N_BLOCKS)]


def test_wrong_shape_is_raised_by_wait_durable_and_later_blocks_are_still_written(target: OutputTarget):
    writer = BlockWriter(target)
    bad = {**_block(0), "model.layers.0.mlp.down_proj.scales": torch.zeros(4, 15, dtype=torch.float16)}
    writer.submit(0, _ready(bad))
    writer.submit(1, _ready(_block(1)))
    with pytest.raises(TensorsNotAsPlanned) as err:
        writer.wait_durable(0)
    assert str(err.value).startswith("block 0: tensors differ from the shard plan")
    assert "model.layers.0.mlp.down_proj.scales" in str(err.value)
    assert writer.wait_durable(1) >= 0
    assert _bytes_in_file(target, 1) == _raw(_block(1))
    assert _nothing_written(target, 0)


def test_removed_output_directory_is_raised_by_wait_durable_and_the_writer_serves_on(target: OutputTarget):
    writer = BlockWriter(target)
    shutil.rmtree(target.out_dir)
    writer.submit(2, _ready(_block(2)))
    with pytest.raises(FileNotFoundError) as err:
        writer.wait_durable(2)
    assert STAGING in str(err.value)
    # the job's staging area is back (a resumed job): the same writer writes the block
    begin_staging(Path(target.out_dir), FINGERPRINT, SPEC)
    writer.submit(2, _ready(_block(2)))
    assert writer.wait_durable(2) >= 0
    assert _bytes_in_file(target, 2) == _raw(_block(2))


def test_read_durable_block_returns_what_was_written_before_and_after_its_shard_closes(target: OutputTarget):
    writer = BlockWriter(target)
    for b in range(N_BLOCKS):
        writer.submit(b, _ready(_block(b)))
    for b in range(N_BLOCKS):
        writer.wait_durable(b)

    def check_all_blocks() -> None:
        for b in range(N_BLOCKS):
            read = read_durable_block(target, b)
            assert sorted(read) == sorted(_block(b))
            for name, tensor in _block(b).items():
                assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name

    check_all_blocks()
    for shard in target.plan.shards:
        close_shard(Path(target.out_dir), shard)
    assert not any(p.name.endswith(".safetensors") for p in (Path(target.out_dir) / STAGING).iterdir())
    check_all_blocks()


def test_replaying_a_block_without_an_output_names_the_setting():
    with pytest.raises(ValueError) as err:
        read_durable_block(None, 0)
    assert "set_output(...) first" in str(err.value)
