"""Publishing a remote output while the job runs: shards upload as they close, the manifest last.

The checkpoint is built in a local work directory as a local output would be; a `Publisher` hands each
shard to the sink as soon as it closes (one upload at a time on a thread of its own, so the blocks never
wait for the network), and after the manifest is written locally, uploads what is left and commits. The
job's tail after the last block is then the last shard's upload plus the small files.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import structlog

from rayquant.jobs.spec import JobSpec
from rayquant.storage import staging
from rayquant.storage.atomic_files import file_entry
from rayquant.storage.model_source import cache_root
from rayquant.storage.output_layout import MANIFEST_FILE
from rayquant.storage.sinks import Sink

log = structlog.get_logger()


def work_dir(spec: JobSpec, fingerprint: str) -> Path:
    """Where the output is built: output.uri itself if local; else output.work_dir or a folder of the cache."""
    if not spec.output.remote:
        return Path(spec.output.uri)
    if spec.output.work_dir is not None:
        return Path(spec.output.work_dir)
    # the spec already limits `name` to [A-Za-z0-9._-] (jobs/spec.py), so it is a safe folder name as it is
    return cache_root() / "outputs" / f"{spec.name[:60]}-{fingerprint[:16]}"


class Publisher:
    """Uploads a remote output's closed shards in the background; `publish` commits the finished output."""

    def __init__(self, sink: Sink, out_dir: Path):
        self.sink = sink
        self.out_dir = out_dir
        self._uploads: list[Future] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
        self.upload_seconds = 0.0  # summed over every upload of this run
        self.on_uploaded: Callable[[int], None] | None = None  # bytes of each shard uploaded (progress metrics)

    def shard_closed(self, name: str) -> None:
        """Start uploading a shard that just closed (its checksum was recorded when it closed)."""
        entry = staging.closed_shard_entry(self.out_dir, name)
        sha256 = (entry or file_entry(self.out_dir, name))["sha256"]
        self._uploads.append(self._pool.submit(self._upload, name, sha256))

    def _upload(self, name: str, sha256: str) -> None:
        t = time.perf_counter()
        self.sink.upload_file(self.out_dir / name, name, sha256)
        self.upload_seconds += time.perf_counter() - t
        if self.on_uploaded is not None:
            self.on_uploaded((self.out_dir / name).stat().st_size)

    def publish(self) -> float:
        """Wait for the shard uploads (their errors raise here), upload the rest and the manifest; remove the
        work directory. Returns the seconds this took (the job's publishing tail)."""
        t = time.perf_counter()
        try:
            for future in self._uploads:
                future.result()
        finally:
            self._pool.shutdown(wait=True)
        manifest = staging.read_json_object(self.out_dir / MANIFEST_FILE)
        files = [entry["path"] for entry in manifest["files"]]
        t_rest = time.perf_counter()
        self.sink.publish(self.out_dir, files, MANIFEST_FILE)
        self.upload_seconds += time.perf_counter() - t_rest
        tail = time.perf_counter() - t
        log.info("output_published", output=self.sink.uri, files=len(files) + 1, tail_seconds=round(tail, 2),
                 upload_seconds=round(self.upload_seconds, 2))
        shutil.rmtree(self.out_dir)  # the output lives at the sink now; the work directory was its copy
        return tail

    def close(self) -> None:
        """Stop accepting uploads; an upload under way finishes (S3 multipart and Hub pre-uploads are atomic)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
