"""What the checkpoint will hold, known before block 0: every tensor's name, dtype and shape.

A quantized linear's `weight` becomes its packed tensors (shapes from its in/out features and its
bits and group size after quant.overrides); every other tensor keeps the source's dtype and shape.
The block worker writes exactly these tensors (storage/shard_files.py checks it), so the shard layout
can be planned from this alone (storage/shard_plan.py).
"""

from __future__ import annotations

from torch import nn

from rayquant.solver.gptq import GPTQConfig
from rayquant.solver.pack import PACKED_FIELDS, packed_shapes
from rayquant.storage.model_source import ModelSource
from rayquant.storage.safetensors_reader import DTYPES
from rayquant.storage.shard_plan import DEFAULT_MAX_SHARD_BYTES, PlannedTensor, ShardPlan, block_of_tensor, plan_shards
from rayquant.workers.adapter import DecoderLayout, quantizable_linears
from rayquant.workers.layer_overrides import LayerOverride, layer_config

_SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def plan_output(source: ModelSource, model: nn.Module, layout: DecoderLayout, gptq: GPTQConfig,
                overrides: tuple[LayerOverride, ...],
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ShardPlan:
    """The shard plan of the checkpoint; `model` is the (meta) skeleton with MoE experts unfused."""
    blocks = model.get_submodule(layout.blocks_path)
    configs: dict[str, GPTQConfig] = {}  # full linear name -> its config, quantized linears only
    for b in range(layout.n_blocks):
        prefix = layout.block_prefix(b)
        for linear in quantizable_linears(blocks[b]):
            cfg = layer_config(prefix + linear, gptq, overrides)
            if cfg is not None:
                configs[prefix + linear] = cfg
    tensors: list[PlannedTensor] = []
    for name, info in source.tensors.items():
        block_idx = block_of_tensor(name, layout.blocks_path, layout.n_blocks)
        stem = name.removesuffix(".weight")
        cfg = configs.get(stem) if block_idx is not None and stem != name else None
        if cfg is None:
            tensors.append(PlannedTensor(name, info.dtype, tuple(info.shape), block_idx))
            continue
        out_features, in_features = info.shape
        shapes = packed_shapes(out_features, in_features, cfg.bits, cfg.group_size)
        tensors += [PlannedTensor(f"{stem}.{field}", _SAFETENSORS_NAMES[shapes[field][1]], shapes[field][0], block_idx)
                    for field in PACKED_FIELDS]
    return plan_shards(tensors, max_shard_bytes)
