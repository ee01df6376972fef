"""A job's progress as the user sees it: a bar on a terminal, one `block_done` JSON line per block otherwise,
a status record for `rayquant status`, and Ray metrics when the job runs on Ray.

The bar (tqdm) shows block i/L, the stage rank 0 is in, seconds per block and the ETA; per-block
stage timings stay in run-stats.json and, off a terminal, in each `block_done` line.

The status record (`status_dir/status.json`, `status_dir` = the output's staging area) is the job's own
account of where it is: blocks done of how many, the block and stage rank 0 is in, seconds per block and
the ETA. It is replaced atomically on every change, so a reader never sees half of it; it lives as long
as the staging area (the finished output's manifest then says how many blocks it has). `rayquant status`
reads it where the output's folder is visible: on the machine that runs the job or on a shared mount.

Metrics (`ray.util.metrics`, exported by each Ray node's metrics agent to Prometheus) are recorded only
when this process is connected to Ray; they cost a call per block and per stage change.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

log = structlog.get_logger()

STATUS_FILE = "status.json"  # in the output's staging area


@dataclass(frozen=True)
class ProgressRecord:
    """What status.json holds: where the job is, by its own count."""

    job: str  # the spec's name
    n_blocks: int
    blocks_done: int  # blocks 0..blocks_done-1 are quantized or replayed
    block: int | None  # the block rank 0 is in; None once every block is done
    stage: str  # rank 0's stage in `block` ("starting", "load", ... "finishing")
    seconds_per_block: float | None  # mean over the blocks this run quantized (replayed ones excluded)
    eta_s: float | None  # seconds_per_block x blocks left
    updated: float  # unix time of this record


class JobProgress:
    """One job's progress display; `close()` it (the bar must give the terminal line back).

    `status_dir`: where status.json goes (None: no record).
    """

    def __init__(self, name: str, n_blocks: int, first_block: int, terminal: bool, status_dir: Path | None = None):
        self.name = name
        self.n_blocks = n_blocks
        self.bar = None
        self._done_here = 0  # blocks quantized by this run: replayed ones say nothing about speed
        self._quantized_seconds = 0.0
        self._status_dir = Path(status_dir) if status_dir is not None else None
        self._blocks_done = first_block
        self._where: tuple[int | None, str] = (first_block if first_block < n_blocks else None, "starting")
        self._metrics = _RayMetrics.if_connected(name)
        if terminal:
            from tqdm import tqdm  # only a terminal needs it

            self.bar = tqdm(total=n_blocks, initial=first_block, desc=name, unit="block", dynamic_ncols=True,
                            bar_format="{desc}: {n_fmt}/{total_fmt} blocks{postfix} |{bar}| [{elapsed}<{remaining}]",
                            smoothing=0.3)
        self._write_record()

    @property
    def shows_stages(self) -> bool:
        """Whether polling the workers' current stage shows the user anything."""
        return self.bar is not None or self._status_dir is not None

    def stage(self, block_idx: int, stage: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"block {block_idx} {stage}{self._rate()}", refresh=True)
        if (block_idx, stage) != self._where:
            self._where = (block_idx, stage)
            self._write_record()

    def block_done(self, block_idx: int, seconds: float, replayed: bool, **fields) -> None:
        """Advance by one block; `fields` (stage seconds, bytes moved) go into the JSON line."""
        if not replayed:
            self._done_here += 1
            self._quantized_seconds += seconds
        self._blocks_done = block_idx + 1
        following = block_idx + 1 if block_idx + 1 < self.n_blocks else None
        self._where = (following, "load" if following is not None else "finishing")
        eta = self._eta()
        self._write_record()
        if self._metrics is not None:
            self._metrics.block_done(fields.get("stages", {}), eta)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{'replayed' if replayed else 'done'}{self._rate()}", refresh=True)
            return
        log.info("block_done", progress=f"{block_idx + 1}/{self.n_blocks}", replayed=replayed,
                 seconds=round(seconds, 3), eta_s=None if eta is None else round(eta, 1), **fields)

    def rewind(self) -> None:
        """Workers were replaced: the job replays from block 0 (the rate so far stays for the ETA)."""
        self._blocks_done = 0
        self._where = (0, "recovering")
        if self.bar is not None:
            self.bar.reset()
        self._write_record()

    def uploaded(self, n_bytes: int) -> None:
        """A sink finished uploading `n_bytes` of the output (the metric only)."""
        if self._metrics is not None and n_bytes > 0:  # a Counter refuses zero
            self._metrics.uploaded(n_bytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def record(self) -> ProgressRecord:
        per_block = self._quantized_seconds / self._done_here if self._done_here else None
        eta = self._eta()
        return ProgressRecord(job=self.name, n_blocks=self.n_blocks, blocks_done=self._blocks_done,
                              block=self._where[0], stage=self._where[1],
                              seconds_per_block=None if per_block is None else round(per_block, 3),
                              eta_s=None if eta is None else round(eta, 1), updated=round(time.time(), 3))

    def _eta(self) -> float | None:
        if not self._done_here:
            return None
        return (self.n_blocks - self._blocks_done) * self._quantized_seconds / self._done_here

    def _write_record(self) -> None:
        if self._status_dir is None or not self._status_dir.is_dir():
            return  # the staging area is gone (finished or discarded): nothing to report into
        from rayquant.storage.atomic_files import json_writer, write_atomic

        write_atomic(self._status_dir, self._status_dir / STATUS_FILE, json_writer(asdict(self.record())))

    def _rate(self) -> str:
        if not self._done_here:
            return ""
        return f", {self._quantized_seconds / self._done_here:.2f} s/block"


class _RayMetrics:
    """The job's Ray metrics, tagged with the spec's name: blocks done, seconds per stage, ETA, bytes uploaded."""

    def __init__(self, name: str):
        from ray.util.metrics import Counter, Gauge

        tags = {"job": name}
        self.blocks = Counter("rayquant_blocks_done", "transformer blocks quantized or replayed", tag_keys=("job",))
        self.stage_seconds = Gauge("rayquant_stage_seconds", "seconds of the last block's stage",
                                   tag_keys=("job", "stage"))
        self.eta = Gauge("rayquant_eta_seconds", "estimated seconds until the last block is done", tag_keys=("job",))
        self.bytes_uploaded = Counter("rayquant_bytes_uploaded",
                                      "shard bytes uploaded to an s3:// or hf:// output (not the small files)",
                                      tag_keys=("job",))
        for metric in (self.blocks, self.stage_seconds, self.eta, self.bytes_uploaded):
            metric.set_default_tags(tags)

    @classmethod
    def if_connected(cls, name: str) -> _RayMetrics | None:
        """Metrics only in a process connected to Ray: elsewhere there is no agent to export them."""
        import sys

        ray = sys.modules.get("ray")  # never imported here for it: a job without Ray has no metrics
        if ray is None or not ray.is_initialized():
            return None
        return cls(name)

    def block_done(self, stage_seconds: dict[str, float], eta: float | None) -> None:
        self.blocks.inc()
        for stage, seconds in stage_seconds.items():
            self.stage_seconds.set(seconds, tags={"stage": stage})
        if eta is not None:
            self.eta.set(eta)

    def uploaded(self, n_bytes: int) -> None:
        self.bytes_uploaded.inc(n_bytes)
