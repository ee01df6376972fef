"""A job's progress as the user sees it: a bar on a terminal, one `block_done` JSON line per block otherwise.

The bar (tqdm) shows block i/L, the stage rank 0 is in, seconds per block and the ETA; per-block
stage timings stay in run-stats.json and, off a terminal, in each `block_done` line.
"""

from __future__ import annotations

import structlog

log = structlog.get_logger()


class JobProgress:
    """One job's progress display; `close()` it (the bar must give the terminal line back)."""

    def __init__(self, name: str, n_blocks: int, first_block: int, terminal: bool):
        self.n_blocks = n_blocks
        self.bar = None
        self._done_here = 0  # blocks quantized by this run: replayed ones say nothing about speed
        self._quantized_seconds = 0.0
        if terminal:
            from tqdm import tqdm  # only a terminal needs it

            self.bar = tqdm(total=n_blocks, initial=first_block, desc=name, unit="block", dynamic_ncols=True,
                            bar_format="{desc}: {n_fmt}/{total_fmt} blocks{postfix} |{bar}| [{elapsed}<{remaining}]",
                            smoothing=0.3)

    @property
    def shows_stages(self) -> bool:
        """Whether polling the workers' current stage shows the user anything."""
        return self.bar is not None

    def stage(self, block_idx: int, stage: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"block {block_idx} {stage}{self._rate()}", refresh=True)

    def block_done(self, block_idx: int, seconds: float, replayed: bool, **fields) -> None:
        """Advance by one block; `fields` (stage seconds, bytes moved) go into the JSON line."""
        if not replayed:
            self._done_here += 1
            self._quantized_seconds += seconds
        left = self.n_blocks - block_idx - 1
        eta = left * self._quantized_seconds / self._done_here if self._done_here else None
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{'replayed' if replayed else 'done'}{self._rate()}", refresh=True)
            return
        log.info("block_done", progress=f"{block_idx + 1}/{self.n_blocks}", replayed=replayed,
                 seconds=round(seconds, 3), eta_s=None if eta is None else round(eta, 1), **fields)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _rate(self) -> str:
        if not self._done_here:
            return ""
        return f", {self._quantized_seconds / self._done_here:.2f} s/block"
