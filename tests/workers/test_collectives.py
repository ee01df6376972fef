"""gather_sum across real Gloo processes on loopback: rank-order sums in bounded chunks."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayquant.workers.collectives import gather_sum

WORLD = 3
SHAPES = [(37, 11), (50,), (6, 5, 4)]


def _inputs(rank: int, shape: tuple) -> torch.Tensor:
    """Values across 12 decades, so any other order of the additions changes the bits."""
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(*shape, generator=gen) * 10.0 ** torch.randint(-6, 6, shape, generator=gen)


def _rank_main(rank: int, rendezvous: str, queue) -> None:
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    try:
        results = {}
        for shape in SHAPES:
            for chunk_bytes in (1, 5 * 11 * 4, 1 << 30):  # a row per chunk, 5 rows, everything at once
                results[(shape, chunk_bytes)] = gather_sum(_inputs(rank, shape), owner=1, rank=rank, world=WORLD,
                                                           chunk_bytes=chunk_bytes)
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def test_gather_sum_adds_in_rank_order_on_the_owner_whatever_the_chunk_size() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        rendezvous = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, rendezvous, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for shape in SHAPES:
        expected = _inputs(0, shape) + _inputs(1, shape) + _inputs(2, shape)
        reversed_order = _inputs(2, shape) + _inputs(1, shape) + _inputs(0, shape)
        assert not torch.equal(expected, reversed_order)  # the order is visible in the bits
        for chunk_bytes in (1, 5 * 11 * 4, 1 << 30):
            assert results[0][(shape, chunk_bytes)] is None and results[2][(shape, chunk_bytes)] is None
            assert torch.equal(results[1][(shape, chunk_bytes)], expected), (shape, chunk_bytes)
