"""Reading a GPTQ v1 checkpoint written by any tool (rayquant, GPTQModel, AutoGPTQ) back as tensors.

A checkpoint is a model directory (sharded or single safetensors, opened like any model source)
whose config.json carries `quantization_config` (AutoGPTQ's older layout: a quantize_config.json
beside it). Each quantized linear `name` is stored as `name.qweight/qzeros/scales[/g_idx]` in the
layout of DESIGN.md "The GPTQ checkpoint"; every other tensor is plain. Per-module settings can
differ through GPTQModel's `dynamic` map: keys are regexes matched from the start of the module
name in order, the first match wins; "-:pat" leaves the module unquantized, "+:pat" (or a bare
pattern) overrides bits / group_size for it.

This module reads and checks; turning packed tensors into weights is `solver.pack`'s job.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rayquant.storage.model_source import ModelSource, open_model_source, read_source_tensor
from rayquant.storage.safetensors_reader import NonFiniteWeights

# AutoGPTQ wrote quantization settings to this file before transformers read them from config.json
LEGACY_QUANTIZE_CONFIG = "quantize_config.json"
SUPPORTED_FORMATS = ("gptq",)  # v1: qzeros store zero - 1
PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
WORD_BITS = 32

_SUPPORTED = "rayquant eval reads GPTQ v1 checkpoints (quant_method 'gptq', checkpoint_format 'gptq')"


class UnsupportedCheckpointFormat(Exception):
    """The checkpoint is quantized with another method or packing than GPTQ v1."""


class InvalidGPTQCheckpoint(Exception):
    """The packed tensors disagree with each other or with quantization_config."""


@dataclass(frozen=True)
class QuantizedLinear:
    name: str  # module name, e.g. "model.layers.0.self_attn.q_proj"
    bits: int  # derived from the tensor shapes, checked against the config (and `dynamic`)
    in_features: int  # K
    out_features: int  # N


@dataclass(frozen=True)
class GPTQCheckpoint:
    source: ModelSource  # config, tensor index and path; tensors are read on demand
    quantization_config: dict | None  # None: an unquantized model (evaluated as it is)
    linears: tuple[QuantizedLinear, ...]  # every packed linear, in tensor-name order


def open_gptq_checkpoint(uri: str) -> GPTQCheckpoint:
    """Open a checkpoint directory (or any model source) and check its packed linears against its config.

    Raises:
        ModelNotFound, InvalidModelFiles, CorruptSafetensors: as open_model_source (missing shard, ...).
        UnsupportedCheckpointFormat: quantized with another method or format than GPTQ v1.
        InvalidGPTQCheckpoint: a packed linear lacks a tensor, or its shapes disagree with the config.
    """
    source = open_model_source(uri)
    quantization_config = _read_quantization_config(source)
    stems = sorted(name.removesuffix(".qweight") for name in source.tensors if name.endswith(".qweight"))
    if quantization_config is None:
        if stems:
            raise InvalidGPTQCheckpoint(
                f"{source.path} holds packed GPTQ tensors ({stems[0]}.qweight, ...) but config.json has no "
                f"quantization_config and there is no {LEGACY_QUANTIZE_CONFIG}: add the quantization_config "
                "the checkpoint was written with (bits, group_size, desc_act, sym, checkpoint_format)"
            )
        return GPTQCheckpoint(source=source, quantization_config=None, linears=())
    _check_format(source.path, quantization_config)
    linears = tuple(_check_linear(source, quantization_config, stem) for stem in stems)
    return GPTQCheckpoint(source=source, quantization_config=quantization_config, linears=linears)


def read_packed_tensors(checkpoint: GPTQCheckpoint, linear: QuantizedLinear) -> dict[str, Tensor]:
    """qweight, qzeros, scales and g_idx of one linear (g_idx built from group_size when not stored).

    Raises:
        NonFiniteWeights: the scales hold NaN or Inf.
    """
    source = checkpoint.source
    tensors = {}
    for suffix in PACKED_SUFFIXES[:3]:
        name = f"{linear.name}.{suffix}"
        try:
            tensors[suffix] = read_source_tensor(source, name)
        except NonFiniteWeights as err:
            raise NonFiniteWeights(
                f"checkpoint {source.path}: tensor {name} holds NaN/Inf values: the checkpoint is damaged; "
                "quantize the model again or re-download the checkpoint"
            ) from err
    g_idx_name = f"{linear.name}.g_idx"
    if g_idx_name in source.tensors:
        tensors["g_idx"] = read_source_tensor(source, g_idx_name)
    else:
        # checkpoints from before act-order have no g_idx: input channel k is in group k // group_size
        group_size = _module_setting(checkpoint.quantization_config, linear.name, "group_size")
        width = linear.in_features if group_size == -1 else group_size
        tensors["g_idx"] = torch.arange(linear.in_features, dtype=torch.int32) // width
    n_groups = tensors["scales"].shape[0]
    if int(tensors["g_idx"].min()) < 0 or int(tensors["g_idx"].max()) >= n_groups:
        raise InvalidGPTQCheckpoint(
            f"checkpoint {source.path}: {linear.name}.g_idx names groups outside [0, {n_groups}) of its "
            "scales; the checkpoint is damaged, quantize the model again or re-download it"
        )
    return tensors


def _read_quantization_config(source: ModelSource) -> dict | None:
    config = source.config.get("quantization_config")
    legacy = source.path / LEGACY_QUANTIZE_CONFIG
    if config is None and legacy.is_file():
        try:
            config = json.loads(legacy.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidGPTQCheckpoint(f"{legacy} is not valid JSON ({err}); re-download the checkpoint") from err
    if config is not None and not isinstance(config, dict):
        raise InvalidGPTQCheckpoint(
            f"{source.path}: quantization_config is a JSON {type(config).__name__}, not an object; "
            "re-download the checkpoint"
        )
    return config


def _check_format(path: Path, quantization_config: dict) -> None:
    method = quantization_config.get("quant_method", "gptq")
    # GPTQModel writes both keys; AutoGPTQ only `checkpoint_format`; older files neither (then v1)
    checkpoint_format = quantization_config.get("checkpoint_format", quantization_config.get("format", "gptq"))
    if method != "gptq" or checkpoint_format not in SUPPORTED_FORMATS:
        raise UnsupportedCheckpointFormat(
            f"{path} is quantized with quant_method {method!r}, checkpoint_format {checkpoint_format!r}: "
            f"{_SUPPORTED}; convert it to GPTQ v1 (e.g. GPTQModel save with format='gptq') or evaluate "
            "the unquantized model"
        )
    for key in ("bits", "group_size"):
        if not isinstance(quantization_config.get(key), int):
            raise InvalidGPTQCheckpoint(
                f"{path}: quantization_config.{key} is {quantization_config.get(key)!r}, not an integer; "
                "fix the checkpoint's config.json"
            )
    dynamic = quantization_config.get("dynamic") or {}
    for pattern in dynamic:
        try:
            re.compile(pattern.removeprefix("+:").removeprefix("-:"))
        except re.error as err:
            raise InvalidGPTQCheckpoint(
                f"{path}: quantization_config.dynamic key {pattern!r} is not a valid regex ({err}); "
                "fix the checkpoint's config.json"
            ) from err


def _module_override(quantization_config: dict, module: str) -> dict | None:
    """The `dynamic` overrides of the first pattern matching `module`; None: skipped ("-:")."""
    for pattern, overrides in (quantization_config.get("dynamic") or {}).items():
        if re.match(pattern.removeprefix("+:").removeprefix("-:"), module):
            return None if pattern.startswith("-:") else dict(overrides)
    return {}


def _module_setting(quantization_config: dict | None, module: str, key: str) -> int:
    overrides = _module_override(quantization_config or {}, module) or {}
    return overrides.get(key, (quantization_config or {}).get(key))


def _check_linear(source: ModelSource, quantization_config: dict, stem: str) -> QuantizedLinear:
    """Shapes of one packed linear against each other and the config; its bits and sizes."""
    where = f"{source.path}: linear {stem}"
    missing = [s for s in PACKED_SUFFIXES[:3] if f"{stem}.{s}" not in source.tensors]
    if missing:
        raise InvalidGPTQCheckpoint(
            f"{where} has a qweight but no {', '.join(missing)}: a GPTQ linear needs qweight, qzeros and "
            "scales; the checkpoint is incomplete, quantize the model again or re-download it"
        )
    if _module_override(quantization_config, stem) is None:
        raise InvalidGPTQCheckpoint(
            f"{where} is packed, but quantization_config.dynamic excludes it with a '-:' pattern: the "
            "config does not belong to these weights; fix the checkpoint's config.json"
        )
    shape = {s: source.tensors[f"{stem}.{s}"].shape for s in PACKED_SUFFIXES if f"{stem}.{s}" in source.tensors}
    if any(len(shape[s]) != 2 for s in PACKED_SUFFIXES[:3]):
        raise InvalidGPTQCheckpoint(f"{where}: qweight/qzeros/scales must be 2-D, got {shape}; re-download it")
    config_bits = _module_setting(quantization_config, stem, "bits")
    out_features = shape["scales"][1]
    if "g_idx" in shape:
        in_features = shape["g_idx"][0]
        bits = shape["qweight"][0] * WORD_BITS // in_features if in_features else 0
    else:
        bits = config_bits
        in_features = shape["qweight"][0] * WORD_BITS // bits
    if bits != config_bits:
        raise InvalidGPTQCheckpoint(
            f"{where}: qweight {tuple(shape['qweight'])} holds {bits}-bit values for g_idx of {in_features} "
            f"input channels, but quantization_config (with its `dynamic` overrides) says bits={config_bits}; "
            "the config does not match the weights: fix bits or add a dynamic override for this module"
        )
    expected = {
        "qweight": (in_features * bits // WORD_BITS, out_features),
        "qzeros": (shape["scales"][0], out_features * bits // WORD_BITS),
    }
    group_size = _module_setting(quantization_config, stem, "group_size")
    if not quantization_config.get("desc_act") and "g_idx" not in shape and group_size != -1:
        expected["scales"] = (math.ceil(in_features / group_size), out_features)
    for suffix, want in expected.items():
        if tuple(shape[suffix]) != want:
            raise InvalidGPTQCheckpoint(
                f"{where}: {suffix} has shape {tuple(shape[suffix])}, expected {want} for {bits}-bit "
                f"K={in_features}, N={out_features}; the checkpoint is damaged or not GPTQ v1, re-download it"
            )
    return QuantizedLinear(name=stem, bits=bits, in_features=in_features, out_features=out_features)
