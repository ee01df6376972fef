"""The output's shard layout, planned before block 0 from the tensors' names, dtypes and shapes.

Packed sizes follow from a linear's shape, bits and group size, so every shard's safetensors header,
and with it every tensor's byte range, is fixed before any block is solved. A worker then writes a
block's tensors straight into their final shard at those offsets, once; nothing is re-read or copied.

Each shard holds whole blocks, in block order, up to max_shard_bytes; the non-block tensors
(embeddings, final norm, head) join the last block shard when they fit, else get shards of their own.
Inside a shard, tensors are laid out exactly as `safetensors.torch.save_file` lays them out (dtype
by descending alignment, then name; compact JSON header padded with spaces to 8 bytes), so a shard
is byte-identical to save_file's file of the same tensors, and every tensor is aligned.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from functools import cached_property

from rayquant.storage.safetensors_reader import DTYPES

# safetensors' Dtype enum in declaration order; save_file sorts tensors by it, descending
_SAFETENSORS_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                            "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
_METADATA = {"format": "pt"}
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # name in the checkpoint
    dtype: str  # safetensors dtype string ("I32", "F16", "BF16", ...)
    shape: tuple[int, ...]
    block_idx: int | None  # the block that produces it; None: copied from the source at the end

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def block_of_tensor(name: str, blocks_path: str, n_blocks: int) -> int | None:
    """The block a checkpoint tensor belongs to: the index after `blocks_path.` (3 for
    model.layers.3.mlp.down_proj.weight under model.layers); None for the non-block tensors (embeddings, final
    norm, head) and for an index past n_blocks (a layer outside the decoder, e.g. DeepSeek-V3's MTP layer)."""
    head = blocks_path + "."
    if not name.startswith(head):
        return None
    index = name[len(head):].split(".", 1)[0]
    return int(index) if index.isdigit() and int(index) < n_blocks else None


@dataclass(frozen=True)
class PlannedShard:
    name: str  # model-0000i-of-0000N.safetensors
    tensors: tuple[PlannedTensor, ...]  # in file order

    @cached_property
    def header(self) -> bytes:
        """The file's first bytes: u64 header length + the JSON header, as save_file writes them."""
        entries: dict[str, object] = {"__metadata__": _METADATA}
        for tensor, (begin, end) in zip(self.tensors, self._data_offsets, strict=True):
            entries[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [begin, end]}
        text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text

    @cached_property
    def _data_offsets(self) -> list[tuple[int, int]]:
        offsets, at = [], 0
        for tensor in self.tensors:
            offsets.append((at, at + tensor.nbytes))
            at += tensor.nbytes
        return offsets

    @cached_property
    def file_offsets(self) -> dict[str, int]:
        """Absolute byte offset of each tensor's first byte in the file."""
        start = len(self.header)
        return {t.name: start + begin for t, (begin, _) in zip(self.tensors, self._data_offsets, strict=True)}

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(sorted({t.block_idx for t in self.tensors if t.block_idx is not None}))

    @property
    def has_tail(self) -> bool:
        """Holds non-block tensors, written after the last block."""
        return any(t.block_idx is None for t in self.tensors)

    def block_tensors(self, block_idx: int | None) -> tuple[PlannedTensor, ...]:
        return tuple(t for t in self.tensors if t.block_idx == block_idx)


@dataclass(frozen=True)
class ShardPlan:
    shards: tuple[PlannedShard, ...]

    def shard_of_block(self, block_idx: int) -> PlannedShard:
        for shard in self.shards:
            if block_idx in shard.blocks:
                return shard
        raise KeyError(f"block {block_idx} is in no shard of the plan")

    def closes_with(self, block_idx: int) -> PlannedShard | None:
        """The shard that is complete once block_idx is durable (its last block, no tail tensors)."""
        shard = self.shard_of_block(block_idx)
        return shard if shard.blocks[-1] == block_idx and not shard.has_tail else None

    def weight_map(self) -> dict[str, str]:
        return {t.name: shard.name for shard in self.shards for t in shard.tensors}

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.nbytes for shard in self.shards for t in shard.tensors)


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ShardPlan:
    """Group whole blocks into shards of at most max_shard_bytes (a larger block gets one of its own),
    then place the non-block tensors; names are numbered in that order."""
    by_block: dict[int, list[PlannedTensor]] = {}
    tail: list[PlannedTensor] = []
    for tensor in tensors:
        (tail if tensor.block_idx is None else by_block.setdefault(tensor.block_idx, [])).append(tensor)
    groups: list[list[PlannedTensor]] = []
    size = 0
    for block_idx in sorted(by_block):
        block = by_block[block_idx]
        nbytes = sum(t.nbytes for t in block)
        if not groups or size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].extend(block)
        size += nbytes
    for tensor in tail:
        if not groups or size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    n = len(groups)
    return ShardPlan(tuple(PlannedShard(f"model-{i:05d}-of-{n:05d}.safetensors", tuple(sorted(group, key=_file_order)))
                           for i, group in enumerate(groups, start=1)))


def _file_order(tensor: PlannedTensor) -> tuple[int, str]:
    return -_SAFETENSORS_DTYPE_ORDER.index(tensor.dtype), tensor.name
