"""A job's staging area: what the output directory holds, the shards until they close, markers, resume.

The layout is storage/output_layout.py's. A block's marker is written once its bytes are durable in
its shard: the resume point is the first block without one. A shard closes (moves to its final name,
its checksum recorded for the manifest) once its last block is durable. Every small file is written to
a temporary name, fsynced and renamed into place; shards are created at their full size and filled at
planned offsets, so a crash leaves a block's marker absent and the resumed job writes the same bytes
again. storage/finished_checkpoint.py finishes the checkpoint and removes the staging area.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from rayquant.storage.atomic_files import TMP_PREFIX, file_entry, fsync_dir, json_writer, write_atomic
from rayquant.storage.job_records import BlockMarker, BlockStats, LayerReport, MalformedRecord
from rayquant.storage.model_source import ModelSource, read_source_tensor
from rayquant.storage.output_claims import CONTROL_FILES
from rayquant.storage.output_layout import JOB_FILE, MANIFEST_FILE, SHARD_GLOB, STAGING
from rayquant.storage.shard_files import prepare_shard, shard_is_intact, write_shard_tensors
from rayquant.storage.shard_plan import PlannedShard, ShardPlan

_FIX_CONFLICT = "choose another output.uri or delete the directory"
_FIX_DAMAGED = "delete the output directory and rerun the job"

log = structlog.get_logger()


class NotEnoughDisk(Exception):
    """The output's filesystem has less free space than the blocks still to be written need."""


DISK_MARGIN = 1.05  # planned bytes x this + DISK_SLACK_BYTES: the small files, markers, filesystem rounding
DISK_SLACK_BYTES = 64 * 2**20


def check_free_space(out_dir: Path, plan: ShardPlan, resume: int) -> None:
    """Before block `resume`: room for what the plan still writes (shards are created sparse and fill up).

    Raises:
        NotEnoughDisk: naming the filesystem's free bytes, what the job needs and what to do.
    """
    n_blocks = sum(len(shard.blocks) for shard in plan.shards)
    left = plan.total_tensor_bytes * (n_blocks - resume) / max(n_blocks, 1)
    need = int(left * DISK_MARGIN) + DISK_SLACK_BYTES
    where = Path(out_dir)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise NotEnoughDisk(
            f"output {out_dir}: {free / 2**30:.2f} GiB free on its filesystem, the job still writes "
            f"{need / 2**30:.2f} GiB (blocks {resume}..{n_blocks - 1}, with a {DISK_MARGIN:g}x margin); free space "
            f"or choose output.uri (or output.work_dir) on a larger disk, then run the same command again")


class OutputConflict(Exception):
    """output.uri names a directory that holds something other than this job's output."""


class OutputDamaged(Exception):
    """output.uri holds this job's finished checkpoint, but a file the manifest lists is missing or changed."""


class StagingIncomplete(Exception):
    """The staging area lacks what the next step needs (job.json or a block marker), or holds it damaged."""


@dataclass(frozen=True)
class OutputState:
    complete: bool  # the directory holds this job's finished checkpoint
    done_blocks: int  # blocks 0..done_blocks-1 have markers (resume from block done_blocks)


def inspect_output(out_dir: Path, job_fingerprint: str, verify: Literal["sizes", "hashes"] = "hashes") -> OutputState:
    """What out_dir holds for this job: nothing yet, a resumable staging area, or the finished checkpoint.

    A finished checkpoint counts only once every file its manifest lists is there with the recorded size
    (`verify="hashes"`: and sha256). Writes nothing, except that it removes a staging area left behind
    after the manifest (the job stopped between its commit and its clean-up).

    Raises:
        OutputConflict: out_dir holds other files, or the output or staging area of another job.
        OutputDamaged: out_dir holds this job's finished checkpoint with a file missing or changed.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return OutputState(complete=False, done_blocks=0)
    if not out_dir.is_dir():
        raise OutputConflict(f"output.uri {out_dir} is a file, not a directory; {_FIX_CONFLICT}")

    manifest_path = out_dir / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = read_json_object(manifest_path)
        fingerprint = manifest.get("job_fingerprint") if manifest is not None else None
        if fingerprint is None:
            raise OutputConflict(
                f"output.uri {out_dir} holds a {MANIFEST_FILE} that rayquant did not write; {_FIX_CONFLICT}"
            )
        if fingerprint != job_fingerprint:
            raise OutputConflict(
                f"output.uri {out_dir} holds the finished checkpoint of another job (fingerprint "
                f"{str(fingerprint)[:12]}, this job {job_fingerprint[:12]}); {_FIX_CONFLICT}"
            )
        check_finished_files(out_dir, manifest, verify)
        _remove_leftover_staging(out_dir)
        return OutputState(complete=True, done_blocks=int(manifest.get("n_blocks", 0)))

    staging = out_dir / STAGING
    job = read_json_object(staging / JOB_FILE)
    if job is not None:
        fingerprint = job.get("job_fingerprint")
        if fingerprint != job_fingerprint:
            raise OutputConflict(
                f"output.uri {out_dir} holds the unfinished output of another job (fingerprint "
                f"{str(fingerprint)[:12]}, this job {job_fingerprint[:12]}); {_FIX_CONFLICT}"
            )
        return OutputState(complete=False, done_blocks=_count_done_blocks(staging))

    # fresh: empty, or only a staging area that a crash left before its job.json existed
    # a job's lock or a reconciler's claim (storage/output_claims.py) is not content
    others = sorted(entry.name for entry in out_dir.iterdir() if entry.name != STAGING
                    and entry.name not in CONTROL_FILES and not entry.name.startswith(TMP_PREFIX))
    if staging.is_dir() and any(not entry.name.startswith(TMP_PREFIX) for entry in staging.iterdir()):
        others.insert(0, f"{STAGING}/ without {JOB_FILE}")
    if others:
        raise OutputConflict(
            f"output.uri {out_dir} is not empty and holds no rayquant output ({len(others)} entries, "
            f"first: {others[0]}); {_FIX_CONFLICT}"
        )
    return OutputState(complete=False, done_blocks=0)


def check_finished_files(out_dir: Path, manifest: dict, verify: Literal["sizes", "hashes"]) -> None:
    """Every file the manifest lists is a plain file of out_dir with its recorded size (and sha256).

    Raises:
        OutputDamaged: the list is damaged, names a path outside out_dir, or a file is missing or changed.
    """
    entries = manifest.get("files")
    if not isinstance(entries, list) or not all(_is_file_entry(e) for e in entries):
        raise OutputDamaged(f"{out_dir / MANIFEST_FILE} has no valid file list (path, size, sha256 per file); "
                            f"{_FIX_DAMAGED}")
    for entry in entries:
        problem = _file_problem(out_dir, entry, verify)
        if problem is not None:
            raise OutputDamaged(f"output.uri {out_dir} holds this job's finished checkpoint, but {problem}; "
                                f"{_FIX_DAMAGED} (it writes the same bytes again)")


def _is_file_entry(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("sha256"), str)
            and type(entry.get("size")) is int)


def _file_problem(out_dir: Path, entry: dict, verify: Literal["sizes", "hashes"]) -> str | None:
    """What is wrong with one manifest entry's file, or None."""
    name = entry["path"]
    # rayquant writes a flat directory: any separator or dot-dot is a name from elsewhere
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        return f"the manifest names {name!r}, a path outside the output directory"
    try:
        st = (out_dir / name).lstat()
    except FileNotFoundError:
        return f"{name} is missing"
    if not stat.S_ISREG(st.st_mode):
        return f"{name} is not a regular file (a link or a directory)"
    if st.st_size != entry["size"]:
        return f"{name} is {st.st_size} bytes, the manifest records {entry['size']}"
    if verify == "hashes" and file_entry(out_dir, name)["sha256"] != entry["sha256"]:
        return f"{name} has changed (its sha256 differs from the manifest's {entry['sha256'][:12]})"
    return None


def _remove_leftover_staging(out_dir: Path) -> None:
    """The manifest is the commit: a staging area beside it is what a job stopped before removing."""
    staging = out_dir / STAGING
    if staging.is_dir() and not staging.is_symlink():
        shutil.rmtree(staging)
        log.info("leftover_staging_removed", path=str(staging))


def begin_staging(out_dir: Path, job_fingerprint: str, resolved_spec: dict) -> None:
    """Create out_dir/.rayquant-staging with job.json; a no-op when this job's staging exists.

    Raises:
        OutputConflict: out_dir holds other files, or the output or staging area of another job.
    """
    out_dir = Path(out_dir)
    inspect_output(out_dir, job_fingerprint)
    staging = out_dir / STAGING
    if (staging / JOB_FILE).is_file():
        return
    staging.mkdir(parents=True, exist_ok=True)
    job = {"job_fingerprint": job_fingerprint, "resolved_spec": resolved_spec}
    write_atomic(staging, staging / JOB_FILE, json_writer(job))


def open_shard_path(out_dir: Path, shard: PlannedShard) -> Path:
    """Where a planned shard lives: out_dir/<name> once closed, before that its open file in staging."""
    final = Path(out_dir) / shard.name
    return final if final.is_file() else Path(out_dir) / STAGING / shard.name


def resume_point(out_dir: Path, plan: ShardPlan, done_blocks: int) -> int:
    """The first block to quantize: done_blocks, or earlier where a marker does not parse or a marked
    block's shard is not intact (deleted or damaged after the fact); markers from there on are removed,
    so those blocks are redone (a damaged marker costs its blocks, never the whole job).
    """
    staging = _require_staging(Path(out_dir))
    resume = _first_damaged_marker(out_dir, done_blocks)
    for shard in plan.shards:
        marked = [b for b in shard.blocks if b < done_blocks]
        if marked and not shard_is_intact(open_shard_path(out_dir, shard), shard):
            resume = min(resume, marked[0])
    for b in range(resume, done_blocks):
        (staging / _marker_name(b)).unlink(missing_ok=True)
    return resume


def _first_damaged_marker(out_dir: Path, done_blocks: int) -> int:
    """The first of blocks 0..done_blocks-1 whose marker does not parse (done_blocks if none)."""
    for b in range(done_blocks):
        try:
            read_block_marker(out_dir, b)
        except StagingIncomplete as err:
            log.warning("damaged_block_marker", block_idx=b, problem=str(err.__cause__))
            return b
    return done_blocks


def prepare_shards(out_dir: Path, plan: ShardPlan) -> None:
    """Create every shard not closed yet at its full size with its header (the data still holes), so the
    block writer and the non-block writer only ever fill disjoint regions of existing files."""
    out_dir = Path(out_dir)
    staging = _require_staging(out_dir)
    for shard in plan.shards:
        if not (out_dir / shard.name).is_file():
            prepare_shard(staging / shard.name, shard)


def write_non_block_tensors(out_dir: Path, source: ModelSource, plan: ShardPlan) -> None:
    """Copy the source's non-block tensors (embeddings, final norm, head) into their shards (made by
    prepare_shards); runs beside the blocks, which write other regions of the same files."""
    out_dir = Path(out_dir)
    staging = _require_staging(out_dir)
    for shard in plan.shards:
        if shard.has_tail and not (out_dir / shard.name).is_file():
            names = [t.name for t in shard.block_tensors(None)]
            write_shard_tensors(staging / shard.name, shard, {n: read_source_tensor(source, n) for n in names}, None)


def mark_block_done(out_dir: Path, block_idx: int, layers: list[LayerReport], stats: BlockStats) -> None:
    """Record that block block_idx's tensors are durable in their shard: the resume point moves past it.

    The marker also keeps the block's layer records and the run's measurements of it, so a resumed job
    rebuilds the same report and run stats without solving the block again. Call only after the block's
    bytes are fsynced.

    Raises:
        StagingIncomplete: begin_staging has not run for out_dir.
    """
    staging = _require_staging(Path(out_dir))
    marker = BlockMarker(block_idx=block_idx, layers=tuple(layers), stats=stats)
    write_atomic(staging, staging / _marker_name(block_idx), json_writer(marker.to_json()))


def read_block_marker(out_dir: Path, block_idx: int) -> BlockMarker:
    """The layer records and stats that mark_block_done kept for block block_idx.

    Raises:
        StagingIncomplete: block block_idx has no marker, or a damaged one.
    """
    staging = _require_staging(Path(out_dir))
    name = _marker_name(block_idx)
    data = read_json_object(staging / name)
    try:
        if data is None:
            raise MalformedRecord(f"{name}: missing or not a JSON object")
        marker = BlockMarker.from_json(data, name)
        if marker.block_idx != block_idx:
            raise MalformedRecord(f"{name}: block_idx is {marker.block_idx}")
    except MalformedRecord as err:
        raise StagingIncomplete(
            f"{staging} has no usable marker for block {block_idx} ({err}); {_FIX_DAMAGED}"
        ) from err
    return marker


def close_shard(out_dir: Path, shard: PlannedShard, entry: dict | None = None) -> None:
    """Move a shard whose every tensor is durable to its final name; record its checksum for the manifest
    (`entry`, if its hash was taken while it filled: storage/shard_hashing.py; else hashed here)."""
    out_dir = Path(out_dir)
    staging = _require_staging(out_dir)
    final = out_dir / shard.name
    if final.is_file() and not (staging / shard.name).is_file():
        return  # closed by an earlier run
    entry = entry or file_entry(staging, shard.name)
    write_atomic(staging, staging / _closed_name(shard.name), json_writer(entry))
    os.replace(staging / shard.name, final)
    fsync_dir(out_dir)


def closed_shard_entry(out_dir: Path, shard_name: str) -> dict | None:
    """{path, sha256, size} of a shard as close_shard recorded it (None if it never closed)."""
    return read_json_object(Path(out_dir) / STAGING / _closed_name(shard_name))


def staged_job_fingerprint(out_dir: Path, n_blocks: int) -> str:
    """job.json's fingerprint, once blocks 0..n_blocks-1 all have markers (the staging is ready to finish).

    Raises:
        StagingIncomplete: no staging area, a damaged job.json, or a block without a marker.
    """
    staging = _require_staging(Path(out_dir))
    job = read_json_object(staging / JOB_FILE)
    if job is None or "job_fingerprint" not in job:
        raise StagingIncomplete(f"{staging / JOB_FILE} is damaged; {_FIX_DAMAGED}")
    done_blocks = _count_done_blocks(staging)
    if done_blocks < n_blocks:
        raise StagingIncomplete(
            f"cannot finish {out_dir}: block {done_blocks} of {n_blocks} has no marker; rerun "
            f"the job with the same spec to resume from block {done_blocks}"
        )
    return job["job_fingerprint"]


def discard_staging(out_dir: Path) -> None:
    """Remove the staging area and the shards a fresh job closed, and out_dir itself if nothing else is left.

    For a job that started on an empty output (inspect_output refuses any other): every shard in it is
    this job's.
    """
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / STAGING, ignore_errors=True)
    for shard in out_dir.glob(SHARD_GLOB):
        shard.unlink()
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()


def _count_done_blocks(staging: Path) -> int:
    """Blocks 0..n-1 all have markers; n is the first block without one."""
    n = 0
    while (staging / _marker_name(n)).is_file():
        n += 1
    return n


def _marker_name(block_idx: int) -> str:
    return f"block-{block_idx:05d}.done"


def _closed_name(shard_name: str) -> str:
    return f"{shard_name}.closed.json"


def _require_staging(out_dir: Path) -> Path:
    staging = out_dir / STAGING
    if not (staging / JOB_FILE).is_file():
        raise StagingIncomplete(
            f"{out_dir} has no staging area ({STAGING}/{JOB_FILE}): it was removed or the job never "
            f"started; rerun the job from the start (delete the directory if it is not empty)"
        )
    return staging


def read_json_object(path: Path) -> dict | None:
    """The JSON object in path; None if the file is missing or holds no JSON object."""
    try:
        parsed = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None
