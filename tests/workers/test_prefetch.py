"""The next block's share read ahead: where it goes (a pure rule) and, on CUDA, that a share read into pinned
host memory reaches the GPU as the same bytes a direct read gives."""

from __future__ import annotations

import pytest
import torch

from rayquant.jobs.sizing import GIB, GPU_BYTES
from rayquant.storage.model_source import open_model_source
from rayquant.workers.block_load import read_share, share_bytes
from rayquant.workers.prefetch import Prefetch
from rayquant.workers.prefetch_placement import prefetch_placement
from rayquant.workers.rank_group import RankGroup

H100 = GPU_BYTES


@pytest.mark.parametrize("share_gib, gpu, host_gib, where", [
    (0.44, H100, 100, "device"),  # Llama-8B block
    (1.7, H100, 100, "device"),  # 70B
    (6.5, H100, 100, "device"),  # 405B: 8 % of the GPU
    (23.3, H100, 100, "host"),  # DeepSeek-V3's MoE block: beside the one computing it would not fit
    (23.3, H100, 40, None),  # more than half the host's available memory: read when its block loads
    (23.3, None, 1, "device"),  # a CPU worker: its device is the host
])
def test_large_shares_go_to_pinned_host_memory_and_small_ones_to_the_gpu(share_gib, gpu, host_gib, where):
    assert prefetch_placement(int(share_gib * GIB), gpu, int(host_gib * GIB)) == where


def _pinned_prefetch():
    """llama-tiny's block 1 on this GPU: (source, group, prefix, its share read directly, a Prefetch reading it
    into pinned host memory)."""
    source = open_model_source("synthetic://llama-tiny")
    group = RankGroup(0, 1, torch.device("cuda", torch.cuda.current_device()))
    prefix = "model.layers.1."
    direct = read_share(group, source, prefix)
    prefetch = Prefetch()
    prefetch.start(1, lambda _: read_share(group, source, prefix, pinned=True), group.device)
    return source, group, prefix, direct, prefetch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory and a copy stream need CUDA")
def test_a_share_prefetched_into_pinned_memory_reaches_the_gpu_bitwise():
    source, group, prefix, direct, prefetch = _pinned_prefetch()
    taken = prefetch.take(1)
    assert taken.keys() == direct.keys() and sum(t.nbytes for t in direct.values()) == share_bytes(group, source, prefix)
    for name, tensor in taken.items():
        assert tensor.is_cuda and torch.equal(tensor, direct[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory and a copy stream need CUDA")
def test_a_pinned_share_copied_up_ahead_is_taken_bitwise():
    _, _, _, direct, prefetch = _pinned_prefetch()
    pending = prefetch._pending[1]
    assert not any(t.is_cuda for t in pending.result().values())  # read into pinned host memory
    prefetch.copy_up()
    assert all(t.is_cuda for t in pending.result().values())  # on its way up before the block takes it
    taken = prefetch.take(1)
    assert taken.keys() == direct.keys()
    for name, tensor in taken.items():
        assert tensor.is_cuda and torch.equal(tensor, direct[name]), name


def test_copy_up_without_a_pinned_read_changes_nothing():
    prefetch = Prefetch()
    prefetch.copy_up()  # nothing pending
    prefetch.start(3, lambda b: {"w": torch.full((2,), float(b))}, torch.device("cpu"))
    prefetch._pending[1].result()
    prefetch.copy_up()  # a CPU worker's read: no stream, nothing to copy
    assert torch.equal(prefetch.take(3)["w"], torch.full((2,), 3.0))
