"""Ranks of one torch.distributed group as spawned processes on loopback (Gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import pickle
import socket
from typing import Any, Callable

import torch.multiprocessing as mp


class ResultQueue:
    """The queue a rank puts its (rank, result) on: the result travels as plain pickled bytes.

    torch.multiprocessing's own queue sends a CPU tensor as a file descriptor of its shared storage,
    which closes when the sending process exits: a rank that puts its tensors and exits before the
    parent has unpickled them (a loaded machine schedules the parent late) fails the parent's get.
    Plain pickle copies every tensor's bytes into the message, so a result outlives its rank.
    """

    def __init__(self, queue: Any) -> None:
        self._queue = queue

    def put(self, item: Any) -> None:
        self._queue.put(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))

    def get(self, timeout: float) -> Any:
        return pickle.loads(self._queue.get(timeout=timeout))


def run_ranks(target: Callable[..., None], world: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Run target(rank, rendezvous, queue, *args) in `world` spawned processes; each must put
    (rank, result) on the queue. Returns the results in rank order, after every process exited cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        rendezvous = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    queue = ResultQueue(ctx.Queue())
    procs = [ctx.Process(target=target, args=(r, rendezvous, queue, *args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=timeout) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0, f"a rank exited with {p.exitcode}"
    finally:
        for p in procs:  # a rank still alive after a failure above would outlive the test run
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
