"""Where the next block's share is read to while the current block computes: a pure rule, no torch
(`jobs/sizing.py` plans with it too).

On the GPU a prefetched share sits beside the whole block being quantized. Dense blocks are a small part of
a GPU (405B's 6.5 GB of an 80 GB H100); an MoE block is not (DeepSeek-V3's 23 GB of experts), and beside the
block holding its own experts, Hessians and padded batches it is what runs the GPU out of memory. Such a share
is read into pinned host memory instead and copied to the GPU once the block computing has freed its source
weights (during its advance, workers/prefetch.py; ~0.45 s for 23 GB), not beside its stages.
"""

from __future__ import annotations

ON_GPU_SHARE = 0.1  # of the GPU's memory: a share up to this is prefetched onto the GPU
HOST_SHARE = 0.5  # of the host's available memory: past it the share is not prefetched (read when it loads)


def on_device(share_bytes: int, gpu_bytes: int | None) -> bool:
    """Whether the share is prefetched onto the worker's device: always on a CPU worker (`gpu_bytes` None),
    on a GPU when it is small beside it."""
    return gpu_bytes is None or share_bytes <= ON_GPU_SHARE * gpu_bytes


def prefetch_placement(share_bytes: int, gpu_bytes: int | None, host_available: int) -> str | None:
    """"device" (`on_device`), "host" (pinned memory of a GPU worker) or None (no prefetch: the share would take
    too much of the host's available memory)."""
    if on_device(share_bytes, gpu_bytes):
        return "device"
    return "host" if share_bytes <= HOST_SHARE * host_available else None
