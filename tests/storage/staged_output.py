"""A tiny two-shard bf16 source and the job steps that stage and finish its checkpoint, for the staging
and finished-checkpoint tests (the `source` fixture is in conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from rayquant.solver.pack import PACKED_FIELDS, packed_shapes
from rayquant.storage.finished_checkpoint import finish_checkpoint, gptq_quantization_config
from rayquant.storage.job_records import BlockStats, DatasetDescription, EvalReport, JobReport, LayerReport
from rayquant.storage.model_source import ModelSource, open_model_source
from rayquant.storage.safetensors_reader import DTYPES
from rayquant.storage.shard_files import prepare_shard, write_shard_tensors
from rayquant.storage.shard_plan import DEFAULT_MAX_SHARD_BYTES, PlannedShard, PlannedTensor, ShardPlan, plan_shards
from rayquant.storage.staging import (begin_staging, close_shard, inspect_output, mark_block_done, open_shard_path,
                                     resume_point)

N_BLOCKS = 3
HIDDEN, VOCAB = 32, 64
BITS, GROUP_SIZE = 4, 16
QUANTIZED = ("self_attn.q_proj", "mlp.down_proj")
FINGERPRINT = "f" * 64
SPEC = {"name": "tiny-w4g16", "model": {"source": "/models/tiny"}, "quant": {"bits": BITS, "group_size": GROUP_SIZE}}
QUANT_CONFIG = gptq_quantization_config(
    bits=BITS, group_size=GROUP_SIZE, desc_act=False, sym=True, damp_percent=0.01, true_sequential=True,
    static_groups=False,
)
LAYERS = tuple(
    LayerReport(name=f"model.layers.{b}.{layer}", input_group=layer, in_features=HIDDEN, out_features=HIDDEN,
                gptq_loss=0.5 + b, rtn_loss=2.0 + b, damp_percent=0.01, n_tokens=512, owner=b % 2,
                max_rel_err=2.5e-7, mean_rel_err=1e-7)
    for b in range(N_BLOCKS)
    for layer in QUANTIZED
)
EVAL = EvalReport(fp_ppl=11.25, gptq_ppl=11.5, ppl_delta=0.25, n_windows=2, seq_len=16, n_tokens=30,
                  windows_sha256="e" * 64)
AUX = {"tokenizer.json": b'{"version": "1.0"}\n', "generation_config.json": b'{"bos_token_id": 0}\n'}
# one block is 2528 bytes, embed_tokens and lm_head 4096 each: blocks 0-1 share the first shard,
# block 2 has its own, the non-block tensors two more
SMALL_SHARDS = 6000
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def report_of(source: ModelSource) -> JobReport:
    return JobReport(
        job=SPEC["name"], source_revision=source.revision,
        calibration_dataset=DatasetDescription(source="builtin://text", kind="builtin", packing="concat",
                                               min_length=0, records_used=1, records_dropped=0, records_held_out=1),
        calibration_windows_sha256="c" * 64, calibration_window_sha256s=("a" * 64, "b" * 64),
        quantization=QUANT_CONFIG, layers=LAYERS, eval=EVAL,
    )


def block_layers(b: int) -> list[LayerReport]:
    return [layer for layer in LAYERS if layer.name.startswith(f"model.layers.{b}.")]


def block_stats(b: int) -> BlockStats:
    return BlockStats(block=b, seconds={"solve": 0.25 * b, "persist": 0.125}, peak_memory_bytes=(7 + b, 9),
                      bytes_received=({"load": 16, "share": 8}, {"load": 32}))


def make_source(model_dir: Path) -> ModelSource:
    """A two-shard bf16 model dir with index, config and aux files, opened by model_source."""
    model_dir.mkdir()
    tensors = _source_tensors()
    first = sorted(n for n in tensors if n.startswith(("model.embed_tokens.", "model.layers.0.")))
    second = sorted(n for n in tensors if n not in first)
    weight_map = {}
    for i, names in enumerate((first, second), start=1):
        file_name = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in names}, model_dir / file_name, {"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": N_BLOCKS, "dtype": "bfloat16"}
    (model_dir / "config.json").write_text(json.dumps(config))
    for name, data in AUX.items():
        (model_dir / name).write_bytes(data)
    return open_model_source(str(model_dir))


def _source_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
        "model.norm.weight": torch.randn(HIDDEN, generator=g),
        "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g),
    }
    for b in range(N_BLOCKS):
        tensors[f"model.layers.{b}.input_layernorm.weight"] = torch.randn(HIDDEN, generator=g)
        tensors[f"model.layers.{b}.self_attn.q_proj.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g)
        tensors[f"model.layers.{b}.self_attn.q_proj.bias"] = torch.randn(HIDDEN, generator=g)
        tensors[f"model.layers.{b}.mlp.down_proj.weight"] = torch.randn(HIDDEN, 2 * HIDDEN, generator=g)
    return {name: t.to(torch.bfloat16) for name, t in tensors.items()}


def plan_of(source: ModelSource, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ShardPlan:
    """The checkpoint's plan as workers/output_plan.py makes it: each quantized weight becomes its packed
    tensors, every other tensor keeps the source's dtype and shape."""
    tensors = []
    for name, info in source.tensors.items():
        block_idx = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        stem = name.removesuffix(".weight")
        if block_idx is not None and stem.endswith(QUANTIZED):
            out_features, in_features = info.shape
            shapes = packed_shapes(out_features, in_features, BITS, GROUP_SIZE)
            tensors += [PlannedTensor(f"{stem}.{field}", _DTYPE_NAMES[shapes[field][1]], shapes[field][0], block_idx)
                        for field in PACKED_FIELDS]
        else:
            tensors.append(PlannedTensor(name, info.dtype, tuple(info.shape), block_idx))
    return plan_shards(tensors, max_shard_bytes)


def block_part(b: int) -> dict[str, torch.Tensor]:
    """What rank 0 writes for block b: packed linears, the bias, the unquantized norm."""
    g = torch.Generator().manual_seed(100 + b)
    part = {
        f"model.layers.{b}.input_layernorm.weight": torch.randn(HIDDEN, generator=g).to(torch.bfloat16),
        f"model.layers.{b}.self_attn.q_proj.bias": torch.randn(HIDDEN, generator=g).to(torch.bfloat16),
    }
    for layer, k in (("self_attn.q_proj", HIDDEN), ("mlp.down_proj", 2 * HIDDEN)):
        prefix = f"model.layers.{b}.{layer}"
        words = {"qweight": (k // 8, HIDDEN), "qzeros": (k // 16, HIDDEN // 8)}  # 8 4-bit values per int32
        for field, shape in words.items():
            part[f"{prefix}.{field}"] = torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int32)
        part[f"{prefix}.scales"] = torch.rand(k // 16, HIDDEN, generator=g).to(torch.float16)
        part[f"{prefix}.g_idx"] = torch.arange(k, dtype=torch.int32) // 16
    return part


def write_block(out_dir: Path, plan: ShardPlan, b: int) -> None:
    """Block b as the job persists it: rank 0 writes it into its open shard; once it is durable the
    driver marks it done and closes its shard if b is that shard's last block."""
    shard = plan.shard_of_block(b)
    path = open_shard_path(out_dir, shard)
    prepare_shard(path, shard)
    write_shard_tensors(path, shard, block_part(b), b)
    mark_block_done(out_dir, b, layers=block_layers(b), stats=block_stats(b))
    closing = plan.closes_with(b)
    if closing is not None:
        close_shard(out_dir, closing)


def stage_all_blocks(out_dir: Path, plan: ShardPlan) -> None:
    begin_staging(out_dir, FINGERPRINT, SPEC)
    resume = resume_point(out_dir, plan, inspect_output(out_dir, FINGERPRINT).done_blocks)
    for b in range(resume, N_BLOCKS):
        write_block(out_dir, plan, b)


def finish(out_dir: Path, source: ModelSource, plan: ShardPlan) -> list[str]:
    return finish_checkpoint(out_dir, source, plan, report_of(source), SPEC)


def files_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


def finished_reference(tmp_path: Path, source: ModelSource, plan: ShardPlan) -> dict[str, bytes]:
    """The files of an uninterrupted job with the same inputs."""
    reference = tmp_path / "reference"
    stage_all_blocks(reference, plan)
    finish(reference, source, plan)
    return files_bytes(reference)


def _deleted(path: Path, shard: PlannedShard) -> None:
    path.unlink()


def _truncated(path: Path, shard: PlannedShard) -> None:
    os.truncate(path, shard.size // 2)


def _other_header(path: Path, shard: PlannedShard) -> None:
    data = bytearray(path.read_bytes())
    data[len(shard.header) // 2] ^= 0x01  # same size, one header byte changed
    path.write_bytes(bytes(data))


DAMAGES = [_deleted, _truncated, _other_header]  # what can happen to a shard between two runs
