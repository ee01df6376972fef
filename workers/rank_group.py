"""This rank's view of the job's process group: the collectives the block stages call, error agreement,
and the bytes this rank received per stage.

Every rank calls the same collectives in the same order (Gloo on CPU, NCCL on GPU), so a rank that fails
between two of them must tell the others, or they wait forever in the next one: fallible work runs
inside `with agree_on_errors(group):`.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


class PeerFailed(Exception):
    """Another worker failed in this stage; its own error is the one to read."""


class RankGroup:
    """One rank of W in the initialized default process group; `received` counts bytes per stage."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.received: dict[str, int] = {}  # bytes this rank received per stage, for the current block

    def count(self, stage: str, nbytes: int) -> None:
        self.received[stage] = self.received.get(stage, 0) + nbytes

    def broadcast(self, tensor: torch.Tensor, src: int, stage: str) -> torch.Tensor:
        """`tensor` of rank `src` on every rank, sent as raw bytes (Gloo lacks some dtypes)."""
        if self.world == 1:
            return tensor
        if self.rank != src:
            self.count(stage, nbytes(tensor))
        t = tensor.contiguous().to(self.device)
        raw = t.reshape(-1).view(torch.uint8)
        dist.broadcast(raw, src=src)
        return raw.view(t.dtype).reshape(t.shape)

    def gather(self, tensor: torch.Tensor, dst: int) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (same shape everywhere) on rank `dst`, in rank order; None elsewhere."""
        parts = [torch.empty_like(tensor) for _ in range(self.world)] if self.rank == dst else None
        dist.gather(tensor, parts, dst=dst)
        return parts

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape everywhere), in rank order; not counted (a few numbers)."""
        if self.world == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor)
        return parts

    def all_gather_records(self, record: Any, stage: str) -> list[Any]:
        """Every rank's picklable `record`, in rank order (small records such as reports, not tensors)."""
        if self.world == 1:
            return [record]
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, record)
        self.count(stage, sum(len(pickle.dumps(p)) for r, p in enumerate(parts) if r != self.rank))
        return parts

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of the int64 `counts`, in place on every rank (integers: exact in any order)."""
        if self.world > 1:
            dist.all_reduce(counts)
        return counts


@contextmanager
def agree_on_errors(group: RankGroup) -> Iterator[None]:
    """Run the body, then let every rank learn whether any rank's body failed: a failing rank raises its
    own error, the others PeerFailed, and none waits forever in the next collective."""
    err = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below once the peers know
        err = e
    flag = torch.tensor([0 if err is None else 1], dtype=torch.int32, device=group.device)
    if group.world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if err is not None:
        raise err
    if flag.item():
        raise PeerFailed(f"rank {group.rank}: another worker failed in this stage; see its error")


def balance(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Assign items to ranks, largest first to the least-loaded (ties: lowest rank). Deterministic."""
    load = [0] * world
    out = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        out[name] = r
        load[r] += sizes[name]
    return out


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
