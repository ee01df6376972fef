"""gather_sum and sum_to_all_ across real Gloo processes on loopback: rank-order sums in bounded chunks."""

import pytest
import torch
import torch.distributed as dist

from rayquant.workers.collectives import gather_sum, sum_to_all_
from tests.spawned_ranks import run_ranks

WORLD = 3
SHAPES = [(37, 11), (50,), (6, 5, 4)]
CHUNKS = (1, 5 * 11 * 4, 1 << 30)  # a row per chunk, 5 rows, everything at once


def _inputs(rank: int, shape: tuple) -> torch.Tensor:
    """Values across 12 decades, so any other order of the additions changes the bits."""
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(*shape, generator=gen) * 10.0 ** torch.randint(-6, 6, shape, generator=gen)


def _rank_main(rank: int, rendezvous: str, queue) -> None:
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    try:
        results = {}
        for shape in SHAPES:
            for chunk_bytes in CHUNKS:
                results[(shape, chunk_bytes)] = gather_sum(_inputs(rank, shape), owner=1, rank=rank, world=WORLD,
                                                           chunk_bytes=chunk_bytes)
                summed = _inputs(rank, shape)
                received = sum_to_all_(summed, rank=rank, world=WORLD, chunk_bytes=chunk_bytes)
                results[("all", shape, chunk_bytes)] = (summed, received)
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results() -> dict[int, dict]:
    """Each rank's results of every collective call, from one set of spawned processes."""
    return dict(enumerate(run_ranks(_rank_main, WORLD, timeout=120)))


def _rank_order_sum(shape: tuple) -> torch.Tensor:
    return _inputs(0, shape) + _inputs(1, shape) + _inputs(2, shape)


def test_gather_sum_adds_in_rank_order_on_the_owner_whatever_the_chunk_size(results) -> None:
    for shape in SHAPES:
        expected = _rank_order_sum(shape)
        reversed_order = _inputs(2, shape) + _inputs(1, shape) + _inputs(0, shape)
        assert not torch.equal(expected, reversed_order)  # the order is visible in the bits
        for chunk_bytes in CHUNKS:
            assert results[0][(shape, chunk_bytes)] is None and results[2][(shape, chunk_bytes)] is None
            assert torch.equal(results[1][(shape, chunk_bytes)], expected), (shape, chunk_bytes)


def test_sum_to_all_gives_every_rank_the_rank_order_sum_whatever_the_chunk_size(results) -> None:
    for shape in SHAPES:
        expected = _rank_order_sum(shape)
        nbytes = expected.numel() * expected.element_size()
        for chunk_bytes in CHUNKS:
            for rank in range(WORLD):
                summed, received = results[rank][("all", shape, chunk_bytes)]
                assert torch.equal(summed, expected), (shape, chunk_bytes, rank)  # the same bits as gather_sum
            # each chunk: W - 1 parts into its root, then the sum out to the W - 1 others
            assert sum(results[r][("all", shape, chunk_bytes)][1] for r in range(WORLD)) == 2 * (WORLD - 1) * nbytes
    # the root rotates with the chunk: a row per chunk, rank r adds rows r, r + W, … and receives their
    # W - 1 parts, and one sum for every other row
    row_bytes = 11 * 4
    for rank in range(WORLD):
        rooted = len(range(rank, 37, WORLD))
        expected_bytes = row_bytes * ((WORLD - 1) * rooted + 37 - rooted)
        assert results[rank][("all", (37, 11), 1)][1] == expected_bytes, rank
