"""Reads the next block's tensors on a background thread while the current block computes.

Reads (file ranges, or weights drawn on read) release the GIL, so they overlap the block's
compute. On CUDA the copies to the device run on a side stream; the block that uses them waits for
that stream first, so compute never sees half-copied weights. A share read into pinned host memory (a
large MoE block beside the one computing: workers/prefetch_placement.py) is copied to the GPU on the
side stream once the block computing has let go of its source weights (`copy_up`, during its advance),
or when its block takes it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch

Tensors = dict[str, torch.Tensor]


class Prefetch:
    """At most one block read ahead; `take` hands it over or says there is none."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pending: tuple[int, Future, torch.cuda.Stream | None] | None = None

    def start(self, block_idx: int, read: Callable[[int], Tensors], device: torch.device) -> None:
        """Begin read(block_idx) in the background (drops an unused earlier read)."""
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None

        def run() -> Tensors:
            with torch.cuda.device(device) if stream is not None else nullcontext():
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    return read(block_idx)

        self._pending = (block_idx, self._pool.submit(run), stream)

    def copy_up(self) -> None:
        """Start copying a share read into pinned host memory to the GPU on the prefetch stream, if its read is
        done (never waits for it): the copy then runs beside the current block's advance (23 GB: ~0.45 s)."""
        if self._pending is None or self._pending[2] is None or not self._pending[1].done():
            return
        _, future, stream = self._pending
        if future.exception() is not None:
            return  # take() re-raises it
        tensors = future.result()
        with torch.cuda.stream(stream):
            for name, t in tensors.items():
                if not t.is_cuda:
                    tensors[name] = t.to(stream.device, non_blocking=True)

    def take(self, block_idx: int) -> Tensors | None:
        """The prefetched tensors of block_idx (re-raising the read's error), or None if not prefetched."""
        if self._pending is None or self._pending[0] != block_idx:
            return None
        _, future, stream = self._pending
        self._pending = None
        tensors = future.result()
        if stream is not None:
            current = torch.cuda.current_stream(stream.device)
            current.wait_stream(stream)
            for name, t in tensors.items():
                if t.is_cuda:
                    t.record_stream(current)  # freed by the allocator only after the block's kernels use it
                else:  # read into pinned host memory (prefetch_placement): to the GPU now there is room
                    tensors[name] = t.to(stream.device, non_blocking=True)
        return tensors
