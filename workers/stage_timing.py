"""Per-stage seconds of the block a worker runs, and the stage it is in (for the progress bar)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from rayquant.workers import failpoints


class StageClock:
    """`with clock.timed("solve"):` charges the body's time to `seconds["solve"]`, added up over sub-stages.

    `now` is (block, stage) running; `current_stage` reads it from a second actor thread."""

    def __init__(self, device: torch.device, rank: int = 0):
        self.device = device
        self.rank = rank
        self.now: tuple[int | None, str] = (None, "starting")
        self.seconds: dict[str, float] = {}  # of the current block

    def start_block(self, block_idx: int) -> None:
        self.now, self.seconds = (block_idx, "load"), {}

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        self.now = (self.now[0], stage)
        failpoints.reach(self.rank, self.now[0], stage)
        t = self._clock()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + self._clock() - t

    def _clock(self) -> float:
        """Waits for queued GPU work, so each stage is charged its own time."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
