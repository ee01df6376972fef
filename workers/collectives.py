"""Deterministic reductions between workers, in bounded memory.

NCCL's reduce may add ranks' contributions in an order that depends on the algorithm it picks, so a
Hessian sum is gathered on its owner and added there in rank order instead: the same bits for the same
world size, every run. Gathering whole matrices would hold W copies on the owner (8 × 11 GB for a
Llama-405B down_proj Hessian on 8 GPUs: more than the GPU has), so the sum travels in row chunks of at
most GATHER_CHUNK_BYTES per rank; the additions, element by element, are the same.
"""

import socket

import torch
import torch.distributed as dist
from torch import Tensor

GATHER_CHUNK_BYTES = 256 * 2**20  # per rank and chunk: the owner holds W of these at a time


def free_tcp_address(loopback: bool) -> str:
    """A free TCP address on this node for the process group's store (rank 0 picks it): 127.0.0.1 on
    a single node, else the node's own address."""
    host = "127.0.0.1" if loopback else socket.gethostbyname(socket.gethostname())
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def gather_sum(tensor: Tensor, owner: int, rank: int, world: int,
               chunk_bytes: int = GATHER_CHUNK_BYTES) -> Tensor | None:
    """Σ over ranks of `tensor` (same shape on every rank), added in rank order, on `owner`; None elsewhere.

    Every rank must call it with the same shape, owner and chunk_bytes (a collective)."""
    total = torch.empty_like(tensor, memory_format=torch.contiguous_format) if rank == owner else None
    flat, out = _as_rows(tensor), _as_rows(total) if total is not None else None
    for rows in _row_chunks(flat, chunk_bytes):
        _gather_add(flat[rows].contiguous(), out[rows] if out is not None else None, owner, rank, world)
    return total


def sum_to_all_(tensor: Tensor, rank: int, world: int, chunk_bytes: int = GATHER_CHUNK_BYTES) -> int:
    """Replace `tensor` (same shape on every rank, contiguous) in place by Σ over ranks, added in rank
    order: the same bits on every rank, and the same bits gather_sum gives its owner.

    Row chunk c is gathered on rank c mod W, added there in rank order and broadcast back, so the
    additions and the traffic spread over the ranks; in place, no rank holds a second full matrix.
    Every rank must call it with the same shape and chunk_bytes (a collective). Returns the bytes this
    rank received."""
    if not tensor.is_contiguous():
        raise ValueError("sum_to_all_ sums in place: pass a contiguous tensor")
    flat, received = _as_rows(tensor), 0
    for c, rows in enumerate(_row_chunks(flat, chunk_bytes)):
        root = c % world
        chunk = flat[rows]
        nbytes = chunk.numel() * chunk.element_size()
        _gather_add(chunk, chunk if rank == root else None, root, rank, world)
        received += (world - 1) * nbytes if rank == root else nbytes
        dist.broadcast(chunk, src=root)
    return received


def _as_rows(tensor: Tensor) -> Tensor:
    """[rows, rest] (a 1-D tensor is one column): a view of a contiguous tensor, which is what writes into it need."""
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(-1, 1)


def _row_chunks(flat: Tensor, chunk_bytes: int) -> list[slice]:
    """Slices of whole rows of the 2-D `flat`, each at most chunk_bytes (at least one row)."""
    rows = max(1, chunk_bytes // max(1, flat.shape[1] * flat.element_size()))
    return [slice(r, r + rows) for r in range(0, flat.shape[0], rows)]


def _gather_add(chunk: Tensor, dest: Tensor | None, root: int, rank: int, world: int) -> None:
    """Gather every rank's `chunk` on `root` and write their sum, added in rank order, into `dest` there
    (dest may be chunk itself: parts[0] is a copy)."""
    parts = [torch.empty_like(chunk) for _ in range(world)] if rank == root else None
    dist.gather(chunk, parts, dst=root)
    if rank == root:
        dest.copy_(parts[0])
        for p in parts[1:]:
            dest += p
