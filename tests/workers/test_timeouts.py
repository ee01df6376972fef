"""The process group's rendezvous and collectives end within their timeouts, naming the rank that is
missing, and every socket they open listens on loopback only (real Gloo ranks as spawned processes)."""

import time
from datetime import timedelta

import psutil
import pytest
import torch
import torch.distributed as dist

from rayquant.workers.collectives import RendezvousTimeout, join_process_group
from tests.spawned_ranks import run_ranks

RENDEZVOUS_S = 3
COLLECTIVE_S = 2


def _rank_never_joins(rank: int, rendezvous: str, queue) -> None:
    """Rank 1 of 3 never comes; the others report what the rendezvous raised and after how long."""
    if rank == 1:
        queue.put((rank, None))
        return
    t = time.monotonic()
    try:
        join_process_group("gloo", rendezvous, rank, 3, rendezvous_timeout=timedelta(seconds=RENDEZVOUS_S))
    except RendezvousTimeout as err:
        queue.put((rank, (type(err).__name__, str(err), time.monotonic() - t)))
        return
    queue.put((rank, ("joined", "", time.monotonic() - t)))
    dist.destroy_process_group()


def test_a_rank_that_never_joins_fails_the_rendezvous_within_its_timeout_naming_the_rank() -> None:
    results = run_ranks(_rank_never_joins, 3, timeout=120)
    assert results[1] is None
    kind, message, seconds = results[0]
    assert kind == "RendezvousTimeout", (kind, message)
    assert "rank 0: worker rank(s) 1 of 3 did not join the process group within 3 s" in message
    assert "cluster.rendezvous_timeout_s" in message
    assert RENDEZVOUS_S - 0.5 <= seconds <= RENDEZVOUS_S + 5, seconds
    # rank 2 names rank 1 too, unless rank 0 (which serves the store) gave up first
    kind, message, seconds = results[2]
    assert kind == "RendezvousTimeout", (kind, message)
    assert ("rank 2: worker rank(s) 1 of 3 did not join" in message
            or "rank 2: rank 0's rendezvous store closed before every rank joined" in message), message
    assert seconds <= RENDEZVOUS_S + 5, seconds


def _listen_then_stall(rank: int, rendezvous: str, queue) -> None:
    """Both ranks join and sum once; rank 0 then lists its listening sockets and enters a collective
    that rank 1, stalled, never enters before the collective timeout."""
    join_process_group("gloo", rendezvous, rank, 2, rendezvous_timeout=timedelta(seconds=30),
                       collective_timeout=timedelta(seconds=COLLECTIVE_S))
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    listening = sorted({c.laddr.ip for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN})
    if rank == 1:
        time.sleep(COLLECTIVE_S + 3)  # well past rank 0's collective timeout
        queue.put((rank, (total.item(), listening, None)))
        return
    t = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        stalled = ("returned", time.monotonic() - t)
    except RuntimeError as err:
        stalled = (str(err).splitlines()[0], time.monotonic() - t)
    queue.put((rank, (total.item(), listening, stalled)))


@pytest.fixture(scope="module")
def stalled_pair() -> list:
    return run_ranks(_listen_then_stall, 2, timeout=120)


def test_every_socket_of_the_process_group_listens_on_loopback_only(stalled_pair) -> None:
    for rank, (total, listening, _) in enumerate(stalled_pair):
        assert total == 3.0  # the group works: 1 + 2
        assert listening == ["127.0.0.1"], (rank, listening)


def test_a_collective_whose_peer_never_enters_fails_within_the_collective_timeout(stalled_pair) -> None:
    message, seconds = stalled_pair[0][2]
    assert message != "returned"
    assert "timed out" in message.lower() or "timeout" in message.lower(), message
    assert seconds <= COLLECTIVE_S + 4, seconds
