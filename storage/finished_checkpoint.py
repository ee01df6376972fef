"""The finished GPTQ checkpoint: what the finish writes once every block is durable, the manifest last.

The blocks are in their shards already (storage/staging.py). The finish writes the non-block tensors
(unless the job copied them beside the blocks), closes the remaining shards, then
`model.safetensors.index.json`, `config.json` with the `quantization_config`, `report.json`, the source's
tokenizer/generation files, `README.md` (model card) with `loss-ratio.png`, `run-stats.json` and LAST `rayquant-manifest.json`
(sha256 and size of every other file but run-stats.json). The manifest is the commit; the staging area is
removed after it. Peak disk use is the output's size: nothing is written twice.
"""

from __future__ import annotations

import shutil
from importlib.metadata import version
from pathlib import Path

from rayquant.storage import staging
from rayquant.storage.atomic_files import file_entry, json_writer, write_atomic
from rayquant.storage.job_records import JobReport, QuantizationConfig, RunStats
from rayquant.storage.loss_plot import render_loss_ratio_png
from rayquant.storage.model_card import render_model_card
from rayquant.storage.model_source import ModelSource, list_aux_files
from rayquant.storage.output_layout import (CONFIG_FILE, LOSS_PLOT_FILE, MANIFEST_FILE, MODEL_CARD_FILE, REPORT_FILE,
                                            RUN_STATS_FILE, SHARD_GLOB, STAGING)
from rayquant.storage.safetensors_reader import DTYPES, INDEX_FILE
from rayquant.storage.shard_plan import ShardPlan

MANIFEST_FORMAT = 1  # bump when the manifest's fields change meaning


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
) -> QuantizationConfig:
    """config.json's quantization_config for a GPTQ v1 checkpoint written by this rayquant.

    `dynamic` is GPTQModel's per-module map ("+:regex" → fields, "-:regex" → not quantized), kept
    only when non-empty, so checkpoints without overrides keep exactly the base keys.
    `act_group_aware` (GPTQModel's name for group-aware act-order) is recorded when used; it changes the
    solve order only, not how the tensors are read.
    """
    return QuantizationConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, damp_percent=damp_percent,
                              true_sequential=true_sequential, static_groups=static_groups,
                              act_group_aware=act_group_aware, quantizer=_quantizer_tag(), dynamic=dynamic or None)


def finish_checkpoint(
    out_dir: Path,
    source: ModelSource,
    plan: ShardPlan,
    report: JobReport,
    resolved_spec: dict,
    run_stats: RunStats | None = None,
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
    n_blocks = sum(len(shard.blocks) for shard in plan.shards)
    fingerprint = staging.staged_job_fingerprint(out_dir, n_blocks)
    files = _close_shards(out_dir, source, plan, non_block_written)
    files += _write_metadata(out_dir, source, plan, report, resolved_spec)
    files.sort()
    if run_stats is not None:
        write_atomic(out_dir / STAGING, out_dir / RUN_STATS_FILE, json_writer(run_stats.to_json()))
    # shards were checksummed when they closed (while later blocks computed), not re-read here
    closed = {shard.name: _closed_entry(out_dir, shard.name) for shard in plan.shards}
    manifest = {
        "manifest_format": MANIFEST_FORMAT,
        "quantizer": _quantizer_tag(),
        "job_fingerprint": fingerprint,
        "n_blocks": n_blocks,
        "source_revision": source.revision,
        "resolved_spec": resolved_spec,
        "files": [closed.get(name) or file_entry(out_dir, name) for name in files],
    }
    write_atomic(out_dir / STAGING, out_dir / MANIFEST_FILE, json_writer(manifest))
    # after the commit the staging area is garbage: a rerun that finds the manifest may be removing it too
    shutil.rmtree(out_dir / STAGING, ignore_errors=True)
    return files + [MANIFEST_FILE]


def _closed_entry(out_dir: Path, name: str) -> dict | None:
    """The checksum close_shard recorded for shard `name`, if it still describes that file (a damaged or
    foreign record is None: the shard is hashed again, so the manifest never names another path)."""
    entry = staging.closed_shard_entry(out_dir, name)
    if entry is None or entry.get("path") != name or not isinstance(entry.get("sha256"), str):
        return None
    size = entry.get("size")
    return entry if type(size) is int and size == (out_dir / name).stat().st_size else None


def _close_shards(out_dir: Path, source: ModelSource, plan: ShardPlan, non_block_written: bool) -> list[str]:
    """Every shard of the plan closed (the non-block tensors written first unless they are); shards of
    another plan (an earlier attempt with another shard size) removed. Returns the shards' names."""
    if not non_block_written:
        staging.prepare_shards(out_dir, plan)
        staging.write_non_block_tensors(out_dir, source, plan)
    for shard in plan.shards:
        staging.close_shard(out_dir, shard)
    names = [shard.name for shard in plan.shards]
    for path in out_dir.glob(SHARD_GLOB):
        if path.name not in names:
            path.unlink()
    return names


def _write_metadata(out_dir: Path, source: ModelSource, plan: ShardPlan, report: JobReport,
                    resolved_spec: dict) -> list[str]:
    """The index, config.json, report.json, the source's aux files, the model card and its picture. Returns their
    names."""

    tmp_dir = out_dir / STAGING
    index = {"metadata": {"total_size": plan.total_tensor_bytes}, "weight_map": plan.weight_map()}
    json_files = {
        INDEX_FILE: index,
        CONFIG_FILE: _checkpoint_config(source, report.quantization),
        REPORT_FILE: report.to_json(),
    }
    for name, content in json_files.items():
        write_atomic(tmp_dir, out_dir / name, json_writer(content))
    files = list(json_files)
    for aux in list_aux_files(source):
        write_atomic(tmp_dir, out_dir / aux.name, lambda path, aux=aux: shutil.copyfile(aux, path))
        files.append(aux.name)
    plot = render_loss_ratio_png(report)  # the card links it: written first, so a card never lacks its picture
    write_atomic(tmp_dir, out_dir / LOSS_PLOT_FILE, lambda path: path.write_bytes(plot))
    card = render_model_card(report, resolved_spec)
    write_atomic(tmp_dir, out_dir / MODEL_CARD_FILE, lambda path: path.write_text(card, encoding="utf-8"))
    return files + [LOSS_PLOT_FILE, MODEL_CARD_FILE]


def _checkpoint_config(source: ModelSource, quantization: QuantizationConfig) -> dict:
    """The source's config.json plus quantization_config; the source's dtype is kept (or recorded)."""
    config = dict(source.config)
    config["quantization_config"] = quantization.to_json()
    if "dtype" not in config and "torch_dtype" not in config:
        floating = (info.dtype for info in source.tensors.values() if DTYPES[info.dtype].is_floating_point)
        first = next(floating, None)
        if first is not None:
            config["dtype"] = str(DTYPES[first]).removeprefix("torch.")
    return config


def _quantizer_tag() -> str:
    return f"rayquant:{version('rayquant')}"
