"""Load: a block's source tensors on every rank, each read by one rank and broadcast (DESIGN.md §5).

Each rank reads 1/W of the tensors (largest first, to the least-loaded rank, by bytes), usually while the
previous block computes (workers/prefetch.py); the rest arrives as raw bytes from the rank that read it.
"""

from __future__ import annotations

import torch

from rayquant.storage.model_source import ModelSource, read_source_tensor
from rayquant.storage.safetensors_reader import DTYPES, TensorInfo
from rayquant.workers.rank_group import RankGroup, balance


def read_share(group: RankGroup, source: ModelSource, prefix: str, pinned: bool = False) -> dict[str, torch.Tensor]:
    """This rank's 1/W of the tensors under `prefix` (one block's), on its device; `pinned` (a GPU worker's
    prefetch): each tensor, read and checked on the GPU one at a time, goes on to pinned host memory."""
    out = {}
    for name in _share(group, source, prefix):
        tensor = read_source_tensor(source, name, group.device)
        if pinned and tensor.is_cuda:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            tensor = host.copy_(tensor, non_blocking=True)  # the host allocator keeps `host` until copied
        out[name] = tensor
    return out


def share_bytes(group: RankGroup, source: ModelSource, prefix: str) -> int:
    """Bytes of this rank's share of the tensors under `prefix` (what read_share reads)."""
    return sum(info.nbytes for info in _share(group, source, prefix).values())


def broadcast_block(group: RankGroup, source: ModelSource, prefix: str,
                    mine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor under `prefix` on every rank, from this rank's share `mine` (read_share) and the others'."""
    infos, readers = _readers(group, source, prefix)
    out = {}
    for name in sorted(infos):
        info = infos[name]
        template = mine.get(name)
        if template is None:
            template = torch.empty(info.shape, dtype=DTYPES[info.dtype], device=group.device)
        out[name] = group.broadcast(template, src=readers[name], stage="load")
    return out


def _share(group: RankGroup, source: ModelSource, prefix: str) -> dict[str, TensorInfo]:
    """The tensors under `prefix` this rank reads."""
    infos, readers = _readers(group, source, prefix)
    return {name: infos[name] for name, reader in readers.items() if reader == group.rank}


def _readers(group: RankGroup, source: ModelSource, prefix: str) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    """The tensors under `prefix` and the rank that reads each."""
    infos = {n: i for n, i in source.tensors.items() if n.startswith(prefix)}
    return infos, balance({n: i.end - i.start for n, i in infos.items()}, group.world)
