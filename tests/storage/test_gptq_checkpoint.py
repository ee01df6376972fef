"""Reading GPTQ v1 checkpoints of other tools: dynamic per-module settings, no g_idx, no config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rayquant.solver.gptq import GPTQConfig
from rayquant.solver.pack import PACKED_FIELDS, PackedLinear, dequantize_packed, pack_linear
from rayquant.solver.rtn import quantize_rtn
from rayquant.storage.gptq_checkpoint import InvalidGPTQCheckpoint, open_gptq_checkpoint, read_packed_tensors
from rayquant.storage.model_source import open_model_source, read_source_tensor

Q_PROJ, K_PROJ = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
QC = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 64, "desc_act": False,
      "sym": True}


def _checkpoint(llama_tiny_dir: Path, dest: Path, bits: dict[str, int], qc: dict | None, g_idx: bool = True) -> Path:
    """llama-tiny with the named linears RTN-quantized and packed at the given bits, group size 64."""
    source = open_model_source(str(llama_tiny_dir))
    tensors = {name: read_source_tensor(source, name) for name in source.tensors}
    dest.mkdir()
    for name, b in bits.items():
        W = tensors.pop(f"{name}.weight").float()
        result = quantize_rtn(W, torch.eye(W.shape[1]), 1, GPTQConfig(bits=b, group_size=64))
        packed = pack_linear(result, b)
        tensors.update({f"{name}.{f}": getattr(packed, f) for f in PACKED_FIELDS})
        if not g_idx:
            del tensors[f"{name}.g_idx"]
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    config = dict(source.config)
    if qc is not None:
        config["quantization_config"] = qc
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_the_first_matching_dynamic_pattern_sets_a_modules_bits(llama_tiny_dir, tmp_path):
    # q_proj matches both patterns: the first, 8 bits, wins; k_proj matches only the catch-all
    dynamic = {r"+:.*\.q_proj": {"bits": 8}, r"+:.*_proj": {"bits": 2}}
    out = _checkpoint(llama_tiny_dir, tmp_path / "ckpt", {Q_PROJ: 8, K_PROJ: 2}, {**QC, "dynamic": dynamic})
    linears = {linear.name: linear for linear in open_gptq_checkpoint(str(out)).linears}
    assert {name: linear.bits for name, linear in linears.items()} == {K_PROJ: 2, Q_PROJ: 8}
    assert (linears[Q_PROJ].in_features, linears[Q_PROJ].out_features) == (128, 128)


def test_a_packed_module_that_dynamic_excludes_is_refused(llama_tiny_dir, tmp_path):
    out = _checkpoint(llama_tiny_dir, tmp_path / "ckpt", {Q_PROJ: 4}, {**QC, "dynamic": {r"-:.*q_proj": {}}})
    with pytest.raises(InvalidGPTQCheckpoint, match="excludes it with a '-:' pattern"):
        open_gptq_checkpoint(str(out))


def test_missing_g_idx_is_rebuilt_from_group_size(llama_tiny_dir, tmp_path):
    with_g_idx = open_gptq_checkpoint(str(_checkpoint(llama_tiny_dir, tmp_path / "a", {Q_PROJ: 4}, QC)))
    without = open_gptq_checkpoint(str(_checkpoint(llama_tiny_dir, tmp_path / "b", {Q_PROJ: 4}, QC, g_idx=False)))
    a = read_packed_tensors(with_g_idx, with_g_idx.linears[0])
    b = read_packed_tensors(without, without.linears[0])
    assert torch.equal(a["g_idx"], b["g_idx"]) and int(b["g_idx"].max()) == 1
    assert torch.equal(dequantize_packed(PackedLinear(**a), 4), dequantize_packed(PackedLinear(**b), 4))


def test_packed_tensors_without_quantization_config_are_refused(llama_tiny_dir, tmp_path):
    out = _checkpoint(llama_tiny_dir, tmp_path / "ckpt", {Q_PROJ: 4}, None)
    with pytest.raises(InvalidGPTQCheckpoint, match="add the quantization_config"):
        open_gptq_checkpoint(str(out))


def test_an_unquantized_model_opens_with_no_packed_linears(llama_tiny_dir):
    checkpoint = open_gptq_checkpoint(str(llama_tiny_dir))
    assert checkpoint.quantization_config is None and checkpoint.linears == ()
