"""Planned shard files on disk: created with their final header and size, filled in place.

A shard is created under a temporary name with its planned header and its full length (the data
still a hole), fsynced and renamed into place; each block's tensors are then written at their planned
offsets and fsynced. A write cut short by a crash is simply written again at the same offsets by the
resumed job (its marker was never written), so nothing is ever appended and the bytes come out the
same. Readers of a closed shard see an ordinary safetensors file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from rayquant.storage.atomic_files import write_atomic
from rayquant.storage.safetensors_reader import DTYPES, read_tensor, read_safetensors_header
from rayquant.storage.shard_plan import PlannedShard, PlannedTensor

_WRITE_CHUNK = 256 * 2**20  # bytes per pwrite: bounds the kernel's dirty pages per call


class TensorsNotAsPlanned(Exception):
    """A block's tensors differ from the shard plan made before block 0 (a bug: report it)."""


def shard_is_intact(path: Path, shard: PlannedShard) -> bool:
    """The file exists with the planned length and header (its data may still be partly unwritten)."""
    try:
        if path.stat().st_size != shard.size:
            return False
        with path.open("rb") as f:
            return f.read(len(shard.header)) == shard.header
    except FileNotFoundError:
        return False


def prepare_shard(path: Path, shard: PlannedShard) -> None:
    """Create the shard file at its planned size with its header, unless an intact one is there."""
    if shard_is_intact(path, shard):
        return

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            f.write(shard.header)
            f.truncate(shard.size)

    write_atomic(path.parent, path, write)


def write_shard_tensors(path: Path, shard: PlannedShard, tensors: dict[str, Tensor], block_idx: int | None) -> None:
    """Write block block_idx's tensors (None: the non-block tensors) at their offsets, then fsync.

    Raises:
        TensorsNotAsPlanned: the names, dtypes or shapes differ from the plan.
    """
    planned = shard.block_tensors(block_idx)
    check_planned(planned, tensors, what=f"block {block_idx}" if block_idx is not None else "non-block tensors")
    fd = os.open(path, os.O_WRONLY)
    try:
        for tensor in planned:
            _pwrite_all(fd, _as_bytes(tensors[tensor.name]), shard.file_offsets[tensor.name])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_shard_tensors(path: Path, names: list[str] | tuple[str, ...]) -> dict[str, Tensor]:
    """The named tensors of a shard file (ranged reads), in the given order."""
    header = read_safetensors_header(path)
    return {name: read_tensor(header[name], name) for name in names}


def check_planned(planned: tuple[PlannedTensor, ...], tensors: dict[str, Tensor], what: str) -> None:
    """Raises TensorsNotAsPlanned unless `tensors` has exactly the planned names, dtypes and shapes."""
    want = {t.name: (DTYPES[t.dtype], t.shape) for t in planned}
    got = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    if want != got:
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        differ = sorted(n for n in want.keys() & got.keys() if want[n] != got[n])
        raise TensorsNotAsPlanned(
            f"{what}: tensors differ from the shard plan (missing {missing[:3]}, unplanned {extra[:3]}, "
            f"other dtype/shape {[(n, got[n], want[n]) for n in differ[:3]]}); this is a rayquant bug: "
            f"report it with the model's config.json"
        )


def _as_bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + _WRITE_CHUNK], offset + done)
