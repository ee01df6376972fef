"""The shard plan: whole blocks per shard, non-block tensors last, and save_file's exact file layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rayquant.storage.safetensors_reader import DTYPES, read_safetensors_header
from rayquant.storage.shard_files import prepare_shard, write_shard_tensors
from rayquant.storage.shard_plan import PlannedTensor, ShardPlan, plan_shards

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _mixed_tensors() -> dict[str, tuple[torch.Tensor, int | None]]:
    """Every dtype a checkpoint may hold, in odd shapes (scalar, empty, 3-D), spread over 3 blocks and the tail."""
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.ids64": (torch.randint(-(2**62), 2**62, (3, 1), generator=g, dtype=torch.int64), 0),
        "model.layers.0.double": (torch.randn(2, 3, 5, generator=g, dtype=torch.float64), 0),
        "model.layers.0.mask": (torch.randint(0, 2, (17,), generator=g).bool(), 0),
        "model.layers.1.qweight": (torch.randint(-(2**31), 2**31 - 1, (5, 7), generator=g, dtype=torch.int32), 1),
        "model.layers.1.scales": (torch.rand(3, 7, generator=g).to(torch.float16), 1),
        "model.layers.1.norm": (torch.randn(7, generator=g).to(torch.bfloat16), 1),
        "model.layers.1.bytes": (torch.randint(0, 256, (13, 3), generator=g, dtype=torch.uint8), 1),
        "model.layers.2.shorts": (torch.randint(-(2**15), 2**15, (9,), generator=g, dtype=torch.int16), 2),
        "model.layers.2.signed_bytes": (torch.randint(-128, 128, (1, 11), generator=g, dtype=torch.int8), 2),
        "model.layers.2.scalar": (torch.tensor(3.25), 2),
        "model.layers.2.empty": (torch.zeros(0, 4, dtype=torch.float16), 2),
        "lm_head.weight": (torch.randn(11, 3, generator=g), None),
        "model.embed_tokens.weight": (torch.randn(11, 3, generator=g).to(torch.bfloat16), None),
        "model.norm.weight": (torch.randn(3, generator=g).to(torch.bfloat16), None),
    }


def _planned(tensors: dict[str, tuple[torch.Tensor, int | None]]) -> list[PlannedTensor]:
    return [PlannedTensor(name, _DTYPE_NAMES[t.dtype], tuple(t.shape), b) for name, (t, b) in tensors.items()]


def _u8_block(block_idx: int, nbytes: int) -> list[PlannedTensor]:
    """A block of nbytes in two uint8 tensors (sizes in bytes are then plain to read)."""
    return [PlannedTensor(f"model.layers.{block_idx}.a", "U8", (nbytes - nbytes // 3,), block_idx),
            PlannedTensor(f"model.layers.{block_idx}.b", "U8", (nbytes // 3,), block_idx)]


def _u8_tail(name: str, nbytes: int) -> PlannedTensor:
    return PlannedTensor(name, "U8", (nbytes,), None)


def _layout(plan: ShardPlan) -> list[tuple[tuple[int, ...], list[str]]]:
    """Each shard's blocks and its non-block tensor names."""
    return [(shard.blocks, [t.name for t in shard.block_tensors(None)]) for shard in plan.shards]


# --- the file layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("block_order", [(0, 1, 2), (2, 0, 1)])
def test_shard_written_block_by_block_is_byte_identical_to_save_file(tmp_path: Path, block_order):
    tensors = _mixed_tensors()
    plan = plan_shards(_planned(tensors))
    assert len(plan.shards) == 1
    shard = plan.shards[0]
    path = tmp_path / shard.name
    prepare_shard(path, shard)
    for b in (*block_order, None):  # the non-block tensors come last, at the finish
        write_shard_tensors(path, shard, {t.name: tensors[t.name][0] for t in shard.block_tensors(b)}, b)

    reference = tmp_path / "reference.safetensors"
    save_file({name: t for name, (t, _) in tensors.items()}, reference, metadata={"format": "pt"})
    assert path.read_bytes() == reference.read_bytes()


def test_planned_offsets_and_size_are_those_of_save_files_header(tmp_path: Path):
    tensors = _mixed_tensors()
    shard = plan_shards(_planned(tensors)).shards[0]
    reference = tmp_path / "reference.safetensors"
    save_file({name: t for name, (t, _) in tensors.items()}, reference, metadata={"format": "pt"})
    header = read_safetensors_header(reference)
    assert shard.file_offsets == {name: info.start for name, info in header.items()}
    assert shard.size == reference.stat().st_size
    assert shard.header == reference.read_bytes()[:len(shard.header)]
    # save_file pads the JSON header with spaces so the data (and with it every tensor) is 8-byte aligned
    assert len(shard.header) % 8 == 0


def test_planned_tensor_bytes_are_elements_times_item_size():
    assert PlannedTensor("x", "BF16", (3, 5), 0).nbytes == 30
    assert PlannedTensor("x", "I64", (2, 3), None).nbytes == 48
    assert PlannedTensor("x", "BOOL", (17,), 1).nbytes == 17
    assert PlannedTensor("x", "F32", (), 1).nbytes == 4
    assert PlannedTensor("x", "F16", (0, 4), 1).nbytes == 0


# --- grouping blocks into shards ----------------------------------------------------------------


def test_whole_blocks_fill_a_shard_up_to_max_shard_bytes_inclusive():
    tensors = [t for b in range(5) for t in _u8_block(b, 100)]
    plan = plan_shards(tensors, max_shard_bytes=200)
    assert [shard.blocks for shard in plan.shards] == [(0, 1), (2, 3), (4,)]
    plan = plan_shards(tensors, max_shard_bytes=299)
    assert [shard.blocks for shard in plan.shards] == [(0, 1), (2, 3), (4,)]
    plan = plan_shards(tensors, max_shard_bytes=199)
    assert [shard.blocks for shard in plan.shards] == [(0,), (1,), (2,), (3,), (4,)]


def test_block_tensors_are_never_split_across_shards():
    # the limit falls inside every block: each block stays whole in one shard
    tensors = [t for b in range(4) for t in _u8_block(b, 90)]
    plan = plan_shards(tensors, max_shard_bytes=150)
    weight_map = plan.weight_map()
    for b in range(4):
        assert weight_map[f"model.layers.{b}.a"] == weight_map[f"model.layers.{b}.b"] == plan.shard_of_block(b).name
    assert [shard.blocks for shard in plan.shards] == [(0,), (1,), (2,), (3,)]


def test_block_larger_than_max_shard_bytes_gets_a_shard_of_its_own():
    tensors = _u8_block(0, 100) + _u8_block(1, 500) + _u8_block(2, 100) + _u8_block(3, 100)
    plan = plan_shards(tensors, max_shard_bytes=250)
    assert [shard.blocks for shard in plan.shards] == [(0,), (1,), (2, 3)]
    assert plan.shards[1].size - len(plan.shards[1].header) == 500


def test_blocks_are_grouped_in_block_order_whatever_the_input_order():
    tensors = [t for b in (3, 0, 2, 1) for t in _u8_block(b, 100)]
    plan = plan_shards(tensors, max_shard_bytes=200)
    assert [shard.blocks for shard in plan.shards] == [(0, 1), (2, 3)]


# --- non-block tensors --------------------------------------------------------------------------


def test_non_block_tensors_join_the_last_block_shard_when_they_fit():
    tensors = [t for b in range(3) for t in _u8_block(b, 100)] + [_u8_tail("model.norm.weight", 40),
                                                                  _u8_tail("lm_head.weight", 60)]
    plan = plan_shards(tensors, max_shard_bytes=200)
    assert _layout(plan) == [((0, 1), []), ((2,), ["lm_head.weight", "model.norm.weight"])]
    assert [shard.has_tail for shard in plan.shards] == [False, True]


def test_non_block_tensors_that_do_not_fit_get_shards_of_their_own():
    tensors = [t for b in range(3) for t in _u8_block(b, 100)] + [
        _u8_tail("model.embed_tokens.weight", 150), _u8_tail("lm_head.weight", 150), _u8_tail("model.norm.weight", 40),
    ]
    plan = plan_shards(tensors, max_shard_bytes=200)
    assert _layout(plan) == [((0, 1), []), ((2,), []), ((), ["model.embed_tokens.weight"]),
                             ((), ["lm_head.weight", "model.norm.weight"])]
    # a non-block tensor larger than the limit also gets a shard of its own
    tensors = _u8_block(0, 100) + [_u8_tail("model.embed_tokens.weight", 900), _u8_tail("model.norm.weight", 40)]
    plan = plan_shards(tensors, max_shard_bytes=200)
    assert _layout(plan) == [((0,), []), ((), ["model.embed_tokens.weight"]), ((), ["model.norm.weight"])]


def test_shards_are_named_in_order_with_their_count():
    tensors = [t for b in range(3) for t in _u8_block(b, 100)] + [_u8_tail("lm_head.weight", 150)]
    plan = plan_shards(tensors, max_shard_bytes=100)
    assert [shard.name for shard in plan.shards] == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    plan = plan_shards(tensors)
    assert [shard.name for shard in plan.shards] == ["model-00001-of-00001.safetensors"]


def test_weight_map_and_total_bytes_cover_every_planned_tensor_once():
    tensors = [t for b in range(3) for t in _u8_block(b, 100)] + [_u8_tail("lm_head.weight", 150),
                                                                  _u8_tail("model.norm.weight", 7)]
    plan = plan_shards(tensors, max_shard_bytes=200)
    weight_map = plan.weight_map()
    assert sorted(weight_map) == sorted(t.name for t in tensors)
    assert sum(len(shard.tensors) for shard in plan.shards) == len(tensors)
    for shard in plan.shards:
        assert all(weight_map[t.name] == shard.name for t in shard.tensors)
    assert plan.total_tensor_bytes == 3 * 100 + 150 + 7


# --- shard_of_block and closes_with -------------------------------------------------------------


def test_closes_with_names_a_shard_only_at_its_last_block():
    tensors = [t for b in range(5) for t in _u8_block(b, 100)] + [_u8_tail("lm_head.weight", 300)]
    plan = plan_shards(tensors, max_shard_bytes=200)
    assert _layout(plan) == [((0, 1), []), ((2, 3), []), ((4,), []), ((), ["lm_head.weight"])]
    assert [plan.closes_with(b) for b in range(5)] == [None, plan.shards[0], None, plan.shards[1], plan.shards[2]]
    assert [plan.shard_of_block(b).name for b in range(5)] == [plan.shards[i].name for i in (0, 0, 1, 1, 2)]


def test_closes_with_never_names_a_shard_holding_non_block_tensors():
    tensors = [t for b in range(3) for t in _u8_block(b, 100)] + [_u8_tail("model.norm.weight", 50)]
    plan = plan_shards(tensors, max_shard_bytes=200)
    assert _layout(plan) == [((0, 1), []), ((2,), ["model.norm.weight"])]
    assert plan.closes_with(1) is plan.shards[0]
    assert plan.closes_with(2) is None  # closed by the finish, after the non-block tensors
    single = plan_shards(tensors)
    assert [single.closes_with(b) for b in range(3)] == [None, None, None]


def test_shard_of_a_block_outside_the_plan_is_a_key_error():
    plan = plan_shards(_u8_block(0, 100))
    with pytest.raises(KeyError) as err:
        plan.shard_of_block(7)
    assert "block 7 is in no shard of the plan" in str(err.value)
