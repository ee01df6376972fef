"""Planned shard files on disk: created at full size, filled in place, rewritten after a crash."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rayquant.storage.safetensors_reader import DTYPES
from rayquant.storage.shard_files import (
    TensorsNotAsPlanned,
    prepare_shard,
    read_shard_tensors,
    shard_is_intact,
    write_shard_tensors,
)
from rayquant.storage.shard_plan import PlannedShard, PlannedTensor, plan_shards

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _tensors() -> dict[str, tuple[torch.Tensor, int | None]]:
    """Two blocks of packed-looking tensors and two non-block tensors, with their block."""
    g = torch.Generator().manual_seed(1)
    tensors: dict[str, tuple[torch.Tensor, int | None]] = {}
    for b in range(2):
        p = f"model.layers.{b}.self_attn.q_proj"
        tensors[f"{p}.qweight"] = (torch.randint(-(2**31), 2**31 - 1, (8, 32), generator=g, dtype=torch.int32), b)
        tensors[f"{p}.scales"] = (torch.rand(4, 32, generator=g).to(torch.float16), b)
        tensors[f"{p}.g_idx"] = (torch.arange(64, dtype=torch.int32) // 16, b)
        tensors[f"model.layers.{b}.input_layernorm.weight"] = (torch.randn(32, generator=g).to(torch.bfloat16), b)
    tensors["model.embed_tokens.weight"] = (torch.randn(16, 32, generator=g).to(torch.bfloat16), None)
    tensors["model.norm.weight"] = (torch.randn(32, generator=g), None)
    return tensors


def _shard() -> PlannedShard:
    plan = plan_shards([PlannedTensor(n, _DTYPE_NAMES[t.dtype], tuple(t.shape), b) for n, (t, b) in _tensors().items()])
    assert len(plan.shards) == 1
    return plan.shards[0]


def _of(block_idx: int | None) -> dict[str, torch.Tensor]:
    return {name: t for name, (t, b) in _tensors().items() if b == block_idx}


def _write_all(path: Path, shard: PlannedShard) -> None:
    prepare_shard(path, shard)
    for b in (0, 1, None):
        write_shard_tensors(path, shard, _of(b), b)


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --- crash and rewrite --------------------------------------------------------------------------


def test_block_write_cut_short_and_written_again_gives_the_uninterrupted_bytes(tmp_path: Path):
    shard = _shard()
    reference = tmp_path / "reference" / shard.name
    reference.parent.mkdir()
    _write_all(reference, shard)

    path = tmp_path / "crashed" / shard.name
    path.parent.mkdir()
    prepare_shard(path, shard)
    write_shard_tensors(path, shard, _of(0), 0)
    # the crash mid-block 1: the first half of one tensor landed, another tensor's range holds garbage
    fd = os.open(path, os.O_WRONLY)
    try:
        qweight = _raw(_of(1)["model.layers.1.self_attn.q_proj.qweight"])
        os.pwrite(fd, qweight[:len(qweight) // 2], shard.file_offsets["model.layers.1.self_attn.q_proj.qweight"])
        scales = shard.file_offsets["model.layers.1.self_attn.q_proj.scales"]
        os.pwrite(fd, bytes(range(256)), scales)
    finally:
        os.close(fd)
    assert path.read_bytes() != reference.read_bytes()

    # the resumed job: block 1's marker was never written, so block 1 is written again
    assert shard_is_intact(path, shard)
    prepare_shard(path, shard)
    write_shard_tensors(path, shard, _of(1), 1)
    write_shard_tensors(path, shard, _of(None), None)
    assert path.read_bytes() == reference.read_bytes()


def test_prepare_shard_creates_the_file_at_its_planned_size_with_its_header(tmp_path: Path):
    shard = _shard()
    path = tmp_path / shard.name
    assert not shard_is_intact(path, shard)
    prepare_shard(path, shard)
    assert shard_is_intact(path, shard)
    assert path.read_bytes() == shard.header + bytes(shard.size - len(shard.header))
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard.name]  # no temporary file left


def test_prepare_shard_keeps_the_data_of_an_intact_file(tmp_path: Path):
    shard = _shard()
    path = tmp_path / shard.name
    prepare_shard(path, shard)
    write_shard_tensors(path, shard, _of(0), 0)
    written = path.read_bytes()
    prepare_shard(path, shard)
    assert path.read_bytes() == written
    assert torch.equal(read_shard_tensors(path, ["model.layers.0.self_attn.q_proj.qweight"])[
        "model.layers.0.self_attn.q_proj.qweight"], _of(0)["model.layers.0.self_attn.q_proj.qweight"])


def _truncated(path: Path, shard: PlannedShard) -> None:
    os.truncate(path, shard.size - 1)


def _extended(path: Path, shard: PlannedShard) -> None:
    with path.open("ab") as f:
        f.write(b"\0" * 8)


def _other_header(path: Path, shard: PlannedShard) -> None:
    # same length, one byte of the JSON header changed (a shape digit, a name letter: whatever is there)
    data = bytearray(path.read_bytes())
    data[len(shard.header) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncated, _extended, _other_header])
def test_prepare_shard_recreates_a_file_of_the_wrong_size_or_header(tmp_path: Path, damage):
    shard = _shard()
    path = tmp_path / shard.name
    prepare_shard(path, shard)
    write_shard_tensors(path, shard, _of(0), 0)
    damage(path, shard)
    assert not shard_is_intact(path, shard)
    prepare_shard(path, shard)
    assert shard_is_intact(path, shard)
    # recreated: the planned header, the data a hole again (block 0 must be written anew)
    assert path.read_bytes() == shard.header + bytes(shard.size - len(shard.header))


# --- what is written must be what was planned ---------------------------------------------------


def test_block_missing_a_planned_tensor_is_refused_naming_it(tmp_path: Path):
    shard = _shard()
    path = tmp_path / shard.name
    prepare_shard(path, shard)
    tensors = _of(1)
    del tensors["model.layers.1.self_attn.q_proj.scales"]
    with pytest.raises(TensorsNotAsPlanned) as err:
        write_shard_tensors(path, shard, tensors, 1)
    message = str(err.value)
    assert message.startswith("block 1: tensors differ from the shard plan")
    assert "missing ['model.layers.1.self_attn.q_proj.scales'], unplanned []" in message
    assert "report it with the model's config.json" in message
    # refused before any byte is written
    assert path.read_bytes() == shard.header + bytes(shard.size - len(shard.header))


def test_unplanned_tensor_is_refused_naming_it(tmp_path: Path):
    shard = _shard()
    path = tmp_path / shard.name
    prepare_shard(path, shard)
    tensors = {**_of(0), "model.layers.0.self_attn.q_proj.qzeros": torch.zeros(4, 4, dtype=torch.int32)}
    with pytest.raises(TensorsNotAsPlanned) as err:
        write_shard_tensors(path, shard, tensors, 0)
    assert "missing [], unplanned ['model.layers.0.self_attn.q_proj.qzeros']" in str(err.value)
    # a block's tensors written as another block's are unplanned there too
    with pytest.raises(TensorsNotAsPlanned) as err:
        write_shard_tensors(path, shard, _of(0), None)
    assert str(err.value).startswith("non-block tensors: tensors differ from the shard plan")
    assert "unplanned ['model.layers.0.input_layernorm.weight'" in str(err.value)


def test_tensor_of_another_shape_or_dtype_is_refused_naming_it(tmp_path: Path):
    shard = _shard()
    path = tmp_path / shard.name
    prepare_shard(path, shard)
    name = "model.layers.0.self_attn.q_proj.g_idx"
    wrong_shape = {**_of(0), name: torch.zeros(63, dtype=torch.int32)}
    with pytest.raises(TensorsNotAsPlanned) as err:
        write_shard_tensors(path, shard, wrong_shape, 0)
    assert f"other dtype/shape [('{name}', (torch.int32, (63,)), (torch.int32, (64,)))]" in str(err.value)
    wrong_dtype = {**_of(0), name: torch.zeros(64, dtype=torch.int64)}
    with pytest.raises(TensorsNotAsPlanned) as err:
        write_shard_tensors(path, shard, wrong_dtype, 0)
    assert f"other dtype/shape [('{name}', (torch.int64, (64,)), (torch.int32, (64,)))]" in str(err.value)
    assert path.read_bytes() == shard.header + bytes(shard.size - len(shard.header))


# --- reading back -------------------------------------------------------------------------------


def test_read_shard_tensors_round_trips_values_in_the_order_asked(tmp_path: Path):
    shard = _shard()
    path = tmp_path / shard.name
    _write_all(path, shard)
    names = ["model.norm.weight", "model.layers.1.input_layernorm.weight", "model.layers.0.self_attn.q_proj.qweight",
             "model.layers.1.self_attn.q_proj.scales", "model.embed_tokens.weight"]
    read = read_shard_tensors(path, names)
    assert list(read) == names
    for name in names:
        expected = _tensors()[name][0]
        assert read[name].dtype == expected.dtype and torch.equal(read[name], expected), name
