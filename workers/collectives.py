"""Deterministic reductions between workers, in bounded memory.

NCCL's reduce may add ranks' contributions in an order that depends on the algorithm it picks, so a
Hessian sum is gathered on its owner and added there in rank order instead: the same bits for the same
world size, every run. Gathering whole matrices would hold W copies on the owner (8 × 11 GB for a
Llama-405B down_proj Hessian on 8 GPUs: more than the GPU has), so the sum travels in row chunks of at
most GATHER_CHUNK_BYTES per rank; the additions, element by element, are the same.
"""

import os
import socket
import time
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist
from torch import Tensor

GATHER_CHUNK_BYTES = 256 * 2**20  # per rank and chunk: the owner holds W of these at a time
# cluster.rendezvous_timeout_s and cluster.collective_timeout_s at their defaults (jobs/spec.py)
RENDEZVOUS_TIMEOUT = timedelta(seconds=60)
COLLECTIVE_TIMEOUT = timedelta(seconds=1800)


class RendezvousTimeout(Exception):
    """A rank did not reach the process group's rendezvous in time."""


def free_tcp_address(loopback: bool) -> str:
    """A free TCP address on this node for the process group's store (rank 0 picks it): 127.0.0.1 on
    a single node, else the node's own cluster address (Ray's, not whatever the hostname resolves to)."""
    if loopback:
        host = "127.0.0.1"
    else:
        import ray  # only a worker on a Ray cluster gets here

        host = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def join_process_group(backend: str, rendezvous: str, rank: int, world: int,
                       rendezvous_timeout: timedelta = RENDEZVOUS_TIMEOUT,
                       collective_timeout: timedelta = COLLECTIVE_TIMEOUT) -> None:
    """Initialize the default process group at `rendezvous` (tcp://host:port of free_tcp_address): every
    socket of it, rank 0's store and the backend's own, listens on `host` only.

    Every rank waits at most `rendezvous_timeout` for all `world` ranks; a collective waits at most
    `collective_timeout` for its peers.

    Raises:
        RendezvousTimeout: naming the ranks that did not arrive (or rank 0's store that never opened).
    """
    host, port = _host_port(rendezvous)
    _bind_backend_to(host)
    deadline = time.monotonic() + rendezvous_timeout.total_seconds()
    store = _open_store(host, port, rank, world, rendezvous_timeout)
    _wait_for_ranks(store, rank, world, deadline, rendezvous_timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=collective_timeout)


def _host_port(rendezvous: str) -> tuple[str, int]:
    host, _, port = rendezvous.removeprefix("tcp://").rpartition(":")
    return host, int(port)


def _bind_backend_to(host: str) -> None:
    """Gloo's (and on loopback NCCL's bootstrap) sockets on the interface holding `host`: by default Gloo
    binds whatever the hostname resolves to. A variable the user set wins (a cluster's fabric)."""
    interface = next((name for name, addrs in psutil.net_if_addrs().items()
                      if any(a.address == host for a in addrs)), None)
    if interface is None:
        return  # an address no interface holds (NAT): the backend's own choice
    os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    if host == "127.0.0.1":  # a single node: NCCL's bootstrap stays on loopback too
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)


def _open_store(host: str, port: int, rank: int, world: int, timeout: timedelta) -> dist.TCPStore:
    """Rank 0 serves the store on `host` only (TCPStore alone would listen on every interface);
    the others connect to it, retrying until `timeout`."""
    if rank == 0:
        listener = socket.socket()
        listener.bind((host, port))
        listener.listen()
        # the store owns the listening socket from here: detach, so its closing is the store's
        return dist.TCPStore(host, port, world, True, timeout, wait_for_workers=False,
                             master_listen_fd=listener.detach())
    try:
        return dist.TCPStore(host, port, world, False, timeout)
    except dist.DistError as err:
        raise RendezvousTimeout(
            f"rank {rank}: rank 0's rendezvous at {host}:{port} did not answer within "
            f"{timeout.total_seconds():g} s; see rank 0's error, or raise cluster.rendezvous_timeout_s "
            f"if workers start slowly") from err


def _wait_for_ranks(store: dist.TCPStore, rank: int, world: int, deadline: float, timeout: timedelta) -> None:
    """Mark this rank arrived, then wait until every rank has: a rank that never arrives is named."""
    store.set(_arrived(rank), "1")
    keys = [_arrived(r) for r in range(world)]
    try:
        store.wait(keys, timedelta(seconds=max(0.0, deadline - time.monotonic())))
    except dist.DistError as err:
        missing = _missing_ranks(store, world)
        if not missing:
            raise RendezvousTimeout(f"rank {rank}: rank 0's rendezvous store closed before every rank joined; "
                                    f"see rank 0's error") from err
        raise RendezvousTimeout(
            f"rank {rank}: worker rank(s) {', '.join(map(str, missing))} of {world} did not join the process "
            f"group within {timeout.total_seconds():g} s; see their errors, or raise "
            f"cluster.rendezvous_timeout_s if workers start slowly") from err


def _missing_ranks(store: dist.TCPStore, world: int) -> list[int]:
    """The ranks that never marked their arrival; [] when rank 0's store itself is gone."""
    try:
        return [r for r in range(world) if not store.check([_arrived(r)])]
    except dist.DistError:
        return []


def _arrived(rank: int) -> str:
    return f"rayquant/arrived/{rank}"


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
