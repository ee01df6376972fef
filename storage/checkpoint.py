"""The GPTQ checkpoint of one job in a local output directory: staging, block parts, assembly.

While the job runs (DESIGN.md §9, the "persist" stage), each quantized block goes to a staging
area inside the output directory; its marker makes the block the resume point:

    <out>/.rayquant-staging/job.json                  job fingerprint + resolved spec
    <out>/.rayquant-staging/block-00003.safetensors   block 3's tensors under their checkpoint names
    <out>/.rayquant-staging/block-00003.done          block 3 is durable; its layer records and stats

Assembly then writes the checkpoint of DESIGN.md "The GPTQ checkpoint" beside it: shards
`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`, `config.json` with the
`quantization_config`, the source's tokenizer/generation files, `README.md` (model card),
`report.json`, and LAST `rayquant-manifest.json` (sha256 and size of every file). The manifest is
the commit: a directory with our manifest holds a finished checkpoint, one without does not.
The staging area is removed after it. `run-stats.json` (this run's seconds and memory) is written
just before the manifest and is the one file the manifest does not list.

Every file is written to a temporary name in the staging area, fsynced and renamed into place, so
a crash leaves the old file or the new one, never half of one. Bytes are a pure function of the
inputs (sorted JSON keys, no timestamps, safetensors' fixed layout), so a rerun or a resumed job
writes identical files.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from rayquant.storage.atomic_files import TMP_PREFIX, file_entry, json_writer, write_atomic
from rayquant.storage.model_card import render_model_card
from rayquant.storage.model_source import ModelSource, list_aux_files, read_source_tensor
from rayquant.storage.safetensors_reader import DTYPES, INDEX_FILE, read_safetensors_header

STAGING = ".rayquant-staging"
JOB_FILE = "job.json"
MANIFEST_FILE = "rayquant-manifest.json"
CONFIG_FILE = "config.json"
MODEL_CARD_FILE = "README.md"
REPORT_FILE = "report.json"
RUN_STATS_FILE = "run-stats.json"  # timings and memory of the run that wrote the output; not in the manifest
MANIFEST_FORMAT = 1  # bump when the manifest's fields change meaning

# the tensors that replace a quantized linear's `weight`, in this order (its bias keeps its name)
PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# exactly the quantization_config keys of DESIGN.md "The GPTQ checkpoint"
QUANTIZATION_CONFIG_KEYS = frozenset(
    {"quant_method", "bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential",
     "static_groups", "act_group_aware", "checkpoint_format", "meta"}
)
# what the model card needs from each entry of report["layers"]
REPORT_LAYER_KEYS = ("name", "gptq_loss", "rtn_loss", "damp_percent")
# a tensor of transformer block b: model.layers.{b}.…, also under a nested prefix (model.language_model.layers.{b}.…)
BLOCK_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.")

_FIX_CONFLICT = "choose another output.uri or delete the directory"
_SAFETENSORS_METADATA = {"format": "pt"}


class OutputConflict(Exception):
    """output.uri names a directory that holds something other than this job's output."""


class StagingIncomplete(Exception):
    """The staging area lacks what the next step needs (job.json, a block part or marker)."""


class BlockPartMismatch(Exception):
    """A block part's tensors do not line up with the source model's tensor names."""


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


def write_block_part(out_dir: Path, block_idx: int, tensors: dict[str, Tensor]) -> None:
    """Write block block_idx's tensors (checkpoint names -> CPU tensors) as its part file, atomically.

    Raises:
        StagingIncomplete: begin_staging has not run for out_dir.
    """
    staging = _require_staging(Path(out_dir))
    part = {name: tensors[name].detach().cpu().contiguous() for name in sorted(tensors)}
    write_atomic(staging, staging / _part_name(block_idx), _safetensors_writer(part))


def mark_block_done(out_dir: Path, block_idx: int, layers: list[dict] | None = None,
                    stats: dict | None = None) -> None:
    """Record that block block_idx's part is durable, making it part of the resume point.

    The marker also keeps the block's report records (`layers`, JSON-serialisable dicts) and the
    run's measurements of it (`stats`: seconds, memory), so a resumed job rebuilds the same report
    and run stats without solving the block again.

    Raises:
        StagingIncomplete: no staging area, or block block_idx has no part file.
    """
    staging = _require_staging(Path(out_dir))
    _require_part(staging, block_idx)
    marker = {"block_idx": block_idx, "layers": layers, "stats": stats}
    write_atomic(staging, staging / _marker_name(block_idx), json_writer(marker))


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


def read_block_part(out_dir: Path, block_idx: int) -> dict[str, Tensor]:
    """Block block_idx's tensors from its part file (CPU), by name in sorted order.

    Raises:
        StagingIncomplete: no staging area, or block block_idx has no part file.
    """
    staging = _require_staging(Path(out_dir))
    tensors = load_file(_require_part(staging, block_idx))
    return {name: tensors[name] for name in sorted(tensors)}


def discard_staging(out_dir: Path) -> None:
    """Remove the staging area, and out_dir itself if nothing else is left in it."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / STAGING, ignore_errors=True)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()


def assemble_checkpoint(
    out_dir: Path,
    source: ModelSource,
    n_blocks: int,
    quantization_config: dict,
    report: dict,
    resolved_spec: dict,
    max_shard_bytes: int = 4 * 2**30,
    run_stats: dict | None = None,
) -> list[str]:
    """Write the checkpoint from the block parts and the source, manifest last; remove staging.

    `run_stats` (seconds per stage, memory per worker) goes to RUN_STATS_FILE, which is the one file
    outside the manifest: it records this run, not the model, and would break byte-identical reruns.

    Tensors keep the source's name order: names of blocks 0..n_blocks-1 come from the parts (a
    quantized linear's `weight` becomes its PACKED_SUFFIXES tensors), all others are copied from
    the source. Shards are filled in that order up to max_shard_bytes (a larger tensor gets a shard
    of its own). Returns the files written, relative to out_dir, in publish order: the manifest last.

    Raises:
        StagingIncomplete: no staging area, or a block below n_blocks has no marker.
        BlockPartMismatch: the parts' tensor names do not line up with the source's.
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
    done_blocks = _count_done_blocks(staging)
    if done_blocks < n_blocks:
        raise StagingIncomplete(
            f"cannot assemble {out_dir}: block {done_blocks} of {n_blocks} has no marker; rerun "
            f"the job with the same spec to resume from block {done_blocks}"
        )

    plan = _plan_tensors(staging, source, n_blocks)
    shards = _fill_shards(plan, max_shard_bytes)
    shard_names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    files: list[str] = []
    for shard_name, shard in zip(shard_names, shards, strict=True):
        tensors = _load_shard_tensors(staging, source, shard)
        write_atomic(staging, out_dir / shard_name, _safetensors_writer(tensors))
        files.append(shard_name)
    _remove_stale_shards(out_dir, shard_names)

    index = {
        "metadata": {"total_size": sum(tensor.nbytes for tensor in plan)},
        "weight_map": {
            tensor.name: shard_name
            for shard_name, shard in zip(shard_names, shards, strict=True)
            for tensor in shard
        },
    }
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
    manifest = {
        "manifest_format": MANIFEST_FORMAT,
        "quantizer": _quantizer_tag(),
        "job_fingerprint": job["job_fingerprint"],
        "n_blocks": n_blocks,
        "source_revision": source.revision,
        "resolved_spec": resolved_spec,
        "files": [file_entry(out_dir, name) for name in files],
    }
    write_atomic(staging, out_dir / MANIFEST_FILE, json_writer(manifest))
    shutil.rmtree(staging)
    return files + [MANIFEST_FILE]


@dataclass(frozen=True)
class _PlannedTensor:
    name: str  # name in the checkpoint
    nbytes: int
    block_idx: int | None  # the block part that holds it; None: copied from the source


def _plan_tensors(staging: Path, source: ModelSource, n_blocks: int) -> list[_PlannedTensor]:
    """Every checkpoint tensor in the source's name order, with its size and where it comes from."""
    part_tensors: dict[str, tuple[int, int]] = {}  # name -> (block_idx, nbytes)
    for block_idx in range(n_blocks):
        for name, info in read_safetensors_header(_require_part(staging, block_idx)).items():
            if name in part_tensors:
                raise BlockPartMismatch(
                    f"tensor {name} is in the parts of blocks {part_tensors[name][0]} and {block_idx} "
                    f"in {staging}: delete the output directory and rerun the job"
                )
            part_tensors[name] = (block_idx, info.nbytes)

    plan: list[_PlannedTensor] = []
    for name, info in source.tensors.items():
        names = _checkpoint_names(name, part_tensors)
        missing = [out_name for out_name in names if out_name not in part_tensors]
        if missing:
            raise BlockPartMismatch(
                f"the part of block {part_tensors[names[0]][0]} has {names[0]} but lacks {missing[0]}: "
                f"delete the output directory and rerun the job"
            )
        for out_name in names:
            block_idx, nbytes = part_tensors.pop(out_name)
            plan.append(_PlannedTensor(out_name, nbytes, block_idx))
        if names:
            continue
        block = BLOCK_TENSOR.search(name)
        if block is not None and int(block.group(1)) < n_blocks:
            raise BlockPartMismatch(
                f"the part of block {block.group(1)} lacks source tensor {name} (nor holds its packed "
                f"{name.removesuffix('.weight')}.qweight): delete the output directory and rerun the job"
            )
        plan.append(_PlannedTensor(name, info.nbytes, None))
    if part_tensors:
        name, (block_idx, _) = next(iter(sorted(part_tensors.items())))
        raise BlockPartMismatch(
            f"the part of block {block_idx} holds {name}, which matches no tensor of the source "
            f"model (revision {source.revision[:12]}): the staging area comes from another model; "
            f"delete the output directory and rerun the job"
        )
    return plan


def _checkpoint_names(source_name: str, part_tensors: dict[str, tuple[int, int]]) -> list[str]:
    """The part tensors that replace source_name: itself, its packed tensors, or none (copy it)."""
    if source_name in part_tensors:
        return [source_name]
    stem = source_name.removesuffix(".weight")
    if stem != source_name and f"{stem}.qweight" in part_tensors:
        return [f"{stem}.{suffix}" for suffix in PACKED_SUFFIXES]
    return []


def _fill_shards(plan: list[_PlannedTensor], max_shard_bytes: int) -> list[list[_PlannedTensor]]:
    """Consecutive runs of the plan, each at most max_shard_bytes unless one tensor alone is larger."""
    shards: list[list[_PlannedTensor]] = [[]]
    size = 0
    for tensor in plan:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _load_shard_tensors(staging: Path, source: ModelSource, shard: list[_PlannedTensor]) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    with ExitStack() as stack:
        parts: dict[int, safe_open] = {}
        for tensor in shard:
            if tensor.block_idx is None:
                tensors[tensor.name] = read_source_tensor(source, tensor.name)
                continue
            if tensor.block_idx not in parts:
                path = staging / _part_name(tensor.block_idx)
                parts[tensor.block_idx] = stack.enter_context(safe_open(path, framework="pt"))
            tensors[tensor.name] = parts[tensor.block_idx].get_tensor(tensor.name)
    return tensors


def _remove_stale_shards(out_dir: Path, shard_names: list[str]) -> None:
    """Shards an interrupted earlier assembly wrote under another shard count."""
    keep = set(shard_names)
    for path in out_dir.glob("model-?????-of-?????.safetensors"):
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


def _part_name(block_idx: int) -> str:
    return f"block-{block_idx:05d}.safetensors"


def _marker_name(block_idx: int) -> str:
    return f"block-{block_idx:05d}.done"


def _require_staging(out_dir: Path) -> Path:
    staging = out_dir / STAGING
    if not (staging / JOB_FILE).is_file():
        raise StagingIncomplete(
            f"{out_dir} has no staging area ({STAGING}/{JOB_FILE}): it was removed or the job never "
            f"started; rerun the job from the start (delete the directory if it is not empty)"
        )
    return staging


def _require_part(staging: Path, block_idx: int) -> Path:
    path = staging / _part_name(block_idx)
    if not path.is_file():
        raise StagingIncomplete(
            f"{staging} has no part file for block {block_idx} ({path.name}); rerun the job with "
            f"the same spec to recompute it from block {block_idx}"
        )
    return path


def _read_json_object(path: Path) -> dict | None:
    """The JSON object in path; None if the file is missing or holds no JSON object."""
    try:
        parsed = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _safetensors_writer(tensors: dict[str, Tensor]) -> Callable[[Path], None]:
    return lambda path: save_file(tensors, path, metadata=_SAFETENSORS_METADATA)
