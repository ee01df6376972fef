"""Ranks of one torch.distributed group as spawned processes on loopback (Gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import socket
from typing import Any, Callable

import torch.multiprocessing as mp


def run_ranks(target: Callable[..., None], world: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Run target(rank, rendezvous, queue, *args) in `world` spawned processes; each must put
    (rank, result) on the queue. Returns the results in rank order, after every process exited cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        rendezvous = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, rendezvous, queue, *args)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"a rank exited with {p.exitcode}"
    return [results[r] for r in range(world)]
