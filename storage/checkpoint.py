"""The GPTQ checkpoint of one job in a local output directory: staging, shards, the finish.

The shard layout is planned before block 0 (storage/shard_plan.py); blocks go straight into their
final shards, written once by the worker that holds them (DESIGN.md "The data flow"):

    <out>/.rayquant-staging/job.json                         job fingerprint + resolved spec
    <out>/.rayquant-staging/model-00002-of-00009.safetensors a shard still being filled (open)
    <out>/.rayquant-staging/block-00003.done                 block 3 is durable in its shard; its layer records and stats
    <out>/model-00001-of-00009.safetensors                   a closed shard: every tensor in it durable

A shard closes (moves to its final name, its checksum recorded) once its last block is durable. The
finish then writes the non-block tensors, `model.safetensors.index.json`, `config.json` with the
`quantization_config`, the source's tokenizer/generation files, `README.md` (model card),
`report.json`, and LAST `rayquant-manifest.json` (sha256 and size of every file). The manifest is
the commit: a directory with our manifest holds a finished checkpoint, one without does not.
The staging area is removed after it. `run-stats.json` (this run's seconds and memory) is written
just before the manifest and is the one file the manifest does not list. Peak disk use is the
output's size: nothing is written twice.

Every small file is written to a temporary name, fsynced and renamed into place; shards are created
at their full size and filled at planned offsets, so a crash leaves a block's marker absent and the
resumed job writes the same bytes again. Bytes are a pure function of the inputs (sorted JSON keys,
no timestamps, safetensors' fixed layout), so a rerun or a resumed job writes identical files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from rayquant.storage.atomic_files import TMP_PREFIX, file_entry, fsync_dir, json_writer, write_atomic
from rayquant.storage.model_card import render_model_card
from rayquant.storage.model_source import ModelSource, list_aux_files, read_source_tensor
from rayquant.storage.safetensors_reader import DTYPES, INDEX_FILE
from rayquant.storage.shard_files import prepare_shard, shard_is_intact, write_shard_tensors
from rayquant.storage.shard_plan import PlannedShard, ShardPlan

STAGING = ".rayquant-staging"
JOB_FILE = "job.json"
MANIFEST_FILE = "rayquant-manifest.json"
CONFIG_FILE = "config.json"
MODEL_CARD_FILE = "README.md"
REPORT_FILE = "report.json"
SHARD_GLOB = "model-?????-of-?????.safetensors"
RUN_STATS_FILE = "run-stats.json"  # timings and memory of the run that wrote the output; not in the manifest
MANIFEST_FORMAT = 1  # bump when the manifest's fields change meaning

# exactly the quantization_config keys of DESIGN.md "The GPTQ checkpoint"
QUANTIZATION_CONFIG_KEYS = frozenset(
    {"quant_method", "bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential",
     "static_groups", "act_group_aware", "checkpoint_format", "meta"}
)
# what the model card needs from each entry of report["layers"]
REPORT_LAYER_KEYS = ("name", "gptq_loss", "rtn_loss", "damp_percent")

_FIX_CONFLICT = "choose another output.uri or delete the directory"


class OutputConflict(Exception):
    """output.uri names a directory that holds something other than this job's output."""


class StagingIncomplete(Exception):
    """The staging area lacks what the next step needs (job.json or a block marker)."""


@dataclass(frozen=True)
class OutputState:
    complete: bool  # the directory holds this job's finished checkpoint
    done_blocks: int  # blocks 0..done_blocks-1 have markers (resume from block done_blocks)


def gptq_quantization_config(
    *,
    bits: int,
    group_size: int,
    desc_act: bool,
    sym: bool,
    damp_percent: float,
    true_sequential: bool,
    static_groups: bool,
    dynamic: dict[str, dict] | None = None,
    act_group_aware: bool = False,
) -> dict:
    """config.json's quantization_config for a GPTQ v1 checkpoint written by this rayquant.

    `dynamic` is GPTQModel's per-module map ("+:regex" → fields, "-:regex" → not quantized), kept
    only when non-empty, so checkpoints without overrides keep exactly the base keys.
    `act_group_aware` (GPTQModel's name for group-aware act-order) is recorded when used; it changes the
    solve order only, not how the tensors are read.
    """
    config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": damp_percent,
        "true_sequential": true_sequential,
        "static_groups": static_groups,
        "act_group_aware": act_group_aware,
        "checkpoint_format": "gptq",
        "meta": {"quantizer": [_quantizer_tag()]},
    }
    if dynamic:
        config["dynamic"] = dynamic
    return config


def inspect_output(out_dir: Path, job_fingerprint: str) -> OutputState:
    """What out_dir holds for this job: nothing yet, a resumable staging area, or the finished checkpoint.

    Writes nothing.

    Raises:
        OutputConflict: out_dir holds other files, or the output or staging area of another job.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return OutputState(complete=False, done_blocks=0)
    if not out_dir.is_dir():
        raise OutputConflict(f"output.uri {out_dir} is a file, not a directory; {_FIX_CONFLICT}")

    manifest_path = out_dir / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = _read_json_object(manifest_path)
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
        return OutputState(complete=True, done_blocks=int(manifest.get("n_blocks", 0)))

    staging = out_dir / STAGING
    job = _read_json_object(staging / JOB_FILE)
    if job is not None:
        fingerprint = job.get("job_fingerprint")
        if fingerprint != job_fingerprint:
            raise OutputConflict(
                f"output.uri {out_dir} holds the unfinished output of another job (fingerprint "
                f"{str(fingerprint)[:12]}, this job {job_fingerprint[:12]}); {_FIX_CONFLICT}"
            )
        return OutputState(complete=False, done_blocks=_count_done_blocks(staging))

    # fresh: empty, or only a staging area that a crash left before its job.json existed
    others = sorted(entry.name for entry in out_dir.iterdir() if entry.name != STAGING)
    if staging.is_dir() and any(not entry.name.startswith(TMP_PREFIX) for entry in staging.iterdir()):
        others.insert(0, f"{STAGING}/ without {JOB_FILE}")
    if others:
        raise OutputConflict(
            f"output.uri {out_dir} is not empty and holds no rayquant output ({len(others)} entries, "
            f"first: {others[0]}); {_FIX_CONFLICT}"
        )
    return OutputState(complete=False, done_blocks=0)


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
    """The first block to quantize: done_blocks, or earlier where a marked block's shard is not intact
    (deleted or damaged after the fact); markers from there on are removed, so those blocks are redone.
    """
    staging = _require_staging(Path(out_dir))
    resume = done_blocks
    for shard in plan.shards:
        marked = [b for b in shard.blocks if b < done_blocks]
        if marked and not shard_is_intact(open_shard_path(out_dir, shard), shard):
            resume = min(resume, marked[0])
    for b in range(resume, done_blocks):
        (staging / _marker_name(b)).unlink(missing_ok=True)
    return resume


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


def mark_block_done(out_dir: Path, block_idx: int, layers: list[dict] | None = None,
                    stats: dict | None = None) -> None:
    """Record that block block_idx's tensors are durable in their shard: the resume point moves past it.

    The marker also keeps the block's report records (`layers`, JSON-serialisable dicts) and the
    run's measurements of it (`stats`: seconds, memory), so a resumed job rebuilds the same report
    and run stats without solving the block again. Call only after the block's bytes are fsynced.

    Raises:
        StagingIncomplete: begin_staging has not run for out_dir.
    """
    staging = _require_staging(Path(out_dir))
    marker = {"block_idx": block_idx, "layers": layers, "stats": stats}
    write_atomic(staging, staging / _marker_name(block_idx), json_writer(marker))


def close_shard(out_dir: Path, shard: PlannedShard) -> None:
    """Move a shard whose every tensor is durable to its final name; record its checksum for the manifest."""
    out_dir = Path(out_dir)
    staging = _require_staging(out_dir)
    final = out_dir / shard.name
    if final.is_file() and not (staging / shard.name).is_file():
        return  # closed by an earlier run
    entry = file_entry(staging, shard.name)
    write_atomic(staging, staging / _closed_name(shard.name), json_writer(entry))
    os.replace(staging / shard.name, final)
    fsync_dir(out_dir)


def read_block_layers(out_dir: Path, block_idx: int) -> list[dict]:
    """The report records that mark_block_done kept for block block_idx.

    Raises:
        StagingIncomplete: block block_idx has no marker, or its marker was written without layers.
    """
    staging = _require_staging(Path(out_dir))
    marker = _read_json_object(staging / _marker_name(block_idx))
    if marker is None or marker.get("layers") is None:
        raise StagingIncomplete(
            f"{staging} keeps no layer records for block {block_idx} (marker {_marker_name(block_idx)} "
            f"missing or written without layers); delete the output directory and rerun the job"
        )
    return marker["layers"]


def read_block_stats(out_dir: Path, block_idx: int) -> dict:
    """The measurements mark_block_done kept for block block_idx ({} if the marker has none)."""
    marker = _read_json_object(_require_staging(Path(out_dir)) / _marker_name(block_idx)) or {}
    return marker.get("stats") or {}


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


def finish_checkpoint(
    out_dir: Path,
    source: ModelSource,
    plan: ShardPlan,
    quantization_config: dict,
    report: dict,
    resolved_spec: dict,
    run_stats: dict | None = None,
    non_block_written: bool = False,
) -> list[str]:
    """Write what the blocks did not: the non-block tensors (unless `non_block_written`: the driver wrote
    them beside the blocks), index, config, tokenizer files, model card, report; then the manifest, last;
    remove staging. Returns the files, the manifest last.

    Every block's tensors are already in their shards (workers wrote them; their markers say they
    are durable). `run_stats` (seconds per stage, memory per worker) goes to RUN_STATS_FILE, the one
    file outside the manifest: it records this run, not the model, and would break byte-identical reruns.

    Raises:
        StagingIncomplete: no staging area, or a block of the plan has no marker.
    """
    out_dir = Path(out_dir)
    staging = _require_staging(out_dir)
    job = _read_json_object(staging / JOB_FILE)
    if job is None or "job_fingerprint" not in job:
        raise StagingIncomplete(
            f"{staging / JOB_FILE} is damaged; delete the output directory and rerun the job"
        )
    _check_quantization_config(quantization_config)
    _check_report(report)
    n_blocks = sum(len(shard.blocks) for shard in plan.shards)
    done_blocks = _count_done_blocks(staging)
    if done_blocks < n_blocks:
        raise StagingIncomplete(
            f"cannot finish {out_dir}: block {done_blocks} of {n_blocks} has no marker; rerun "
            f"the job with the same spec to resume from block {done_blocks}"
        )
    if not non_block_written:
        prepare_shards(out_dir, plan)
        write_non_block_tensors(out_dir, source, plan)
    for shard in plan.shards:
        close_shard(out_dir, shard)
    files = [shard.name for shard in plan.shards]
    _remove_stale_shards(out_dir, files)

    index = {"metadata": {"total_size": plan.total_tensor_bytes}, "weight_map": plan.weight_map()}
    json_files = {
        INDEX_FILE: index,
        CONFIG_FILE: _checkpoint_config(source, quantization_config),
        REPORT_FILE: report,
    }
    for name, content in json_files.items():
        write_atomic(staging, out_dir / name, json_writer(content))
        files.append(name)
    for aux in list_aux_files(source):
        write_atomic(staging, out_dir / aux.name, lambda path, aux=aux: shutil.copyfile(aux, path))
        files.append(aux.name)
    card = render_model_card(quantization_config, report, resolved_spec, source.revision, _quantizer_tag())
    write_atomic(staging, out_dir / MODEL_CARD_FILE, lambda path: path.write_text(card, encoding="utf-8"))
    files.append(MODEL_CARD_FILE)

    files.sort()
    if run_stats is not None:
        write_atomic(staging, out_dir / RUN_STATS_FILE, json_writer(run_stats))
    shard_entries = {shard.name: _read_json_object(staging / _closed_name(shard.name)) for shard in plan.shards}
    manifest = {
        "manifest_format": MANIFEST_FORMAT,
        "quantizer": _quantizer_tag(),
        "job_fingerprint": job["job_fingerprint"],
        "n_blocks": n_blocks,
        "source_revision": source.revision,
        "resolved_spec": resolved_spec,
        # shards were checksummed when they closed (while later blocks computed), not re-read here
        "files": [shard_entries.get(name) or file_entry(out_dir, name) for name in files],
    }
    write_atomic(staging, out_dir / MANIFEST_FILE, json_writer(manifest))
    shutil.rmtree(staging)
    return files + [MANIFEST_FILE]


def _remove_stale_shards(out_dir: Path, shard_names: list[str]) -> None:
    """Shards in out_dir that are not in the plan (left by an output of another shard count)."""
    keep = set(shard_names)
    for path in out_dir.glob(SHARD_GLOB):
        if path.name not in keep:
            path.unlink()


def _checkpoint_config(source: ModelSource, quantization_config: dict) -> dict:
    """The source's config.json plus quantization_config; the source's dtype is kept (or recorded)."""
    config = dict(source.config)
    config["quantization_config"] = quantization_config
    if "dtype" not in config and "torch_dtype" not in config:
        floating = (info.dtype for info in source.tensors.values() if DTYPES[info.dtype].is_floating_point)
        first = next(floating, None)
        if first is not None:
            config["dtype"] = str(DTYPES[first]).removeprefix("torch.")
    return config


def _check_quantization_config(quantization_config: dict) -> None:
    keys = set(quantization_config) - {"dynamic"}  # the only optional key
    if keys != QUANTIZATION_CONFIG_KEYS or quantization_config["checkpoint_format"] != "gptq":
        raise ValueError(
            f"quantization_config must have exactly the keys {sorted(QUANTIZATION_CONFIG_KEYS)} with "
            f"checkpoint_format 'gptq' (build it with gptq_quantization_config); got "
            f"missing {sorted(QUANTIZATION_CONFIG_KEYS - keys)}, extra {sorted(keys - QUANTIZATION_CONFIG_KEYS)}, "
            f"checkpoint_format {quantization_config.get('checkpoint_format')!r}"
        )


def _check_report(report: dict) -> None:
    layers = report.get("layers")
    if not isinstance(layers, list) or not all(
        isinstance(layer, dict) and all(key in layer for key in REPORT_LAYER_KEYS) for layer in layers
    ):
        raise ValueError(f"report['layers'] must be a list of dicts with the keys {list(REPORT_LAYER_KEYS)}")


def _quantizer_tag() -> str:
    return f"rayquant:{version('rayquant')}"


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


def _read_json_object(path: Path) -> dict | None:
    """The JSON object in path; None if the file is missing or holds no JSON object."""
    try:
        parsed = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None
