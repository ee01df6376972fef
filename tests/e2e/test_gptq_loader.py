"""The independent loader reads checkpoints written by rayquant's packer and checkpoint writer.

Each case quantizes synthetic://llama-tiny's 28 block linears with RTN (act-order g_idx from a
calibration-like Hessian where asked), packs them with solver.pack, writes them into planned shards
(storage.staging), finishes the checkpoint (storage.finished_checkpoint), and loads the result through
transformers' GPTQ path. Its logits must equal rayquant's own dequantized model with float16-rounded
weights (what GPTQModel's torch kernel computes, see gptq_loader.py) — and must not equal the
unquantized model's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayquant.solver.gptq import GPTQConfig
from rayquant.solver.pack import PACKED_FIELDS, pack_linear
from rayquant.solver.rtn import quantize_rtn
from rayquant.storage.finished_checkpoint import finish_checkpoint, gptq_quantization_config
from rayquant.storage.job_records import BlockStats, DatasetDescription, JobReport, LayerReport
from rayquant.storage.model_source import ModelSource, open_model_source, read_source_tensor
from rayquant.storage.safetensors_reader import DTYPES
from rayquant.storage.shard_files import write_shard_tensors
from rayquant.storage.shard_plan import PlannedTensor, plan_shards
from rayquant.storage.staging import begin_staging, mark_block_done, open_shard_path, prepare_shards

from .gptq_loader import load_gptq_logits
from .models import dequantized_model, fp_model, logit_mse, logits

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
N_TOKENS = 256


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return open_model_source("synthetic://llama-tiny")


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(7))


def _hessian_sum(in_features: int, seed: int) -> torch.Tensor:
    """Σ xᵀx of activations whose channels differ in scale, so act-order really permutes."""
    g = torch.Generator().manual_seed(seed)
    channel_scale = torch.rand(in_features, generator=g) * 2 + 0.1
    x = torch.randn(N_TOKENS, in_features, generator=g) * channel_scale
    return x.T @ x


def _write_checkpoint(source: ModelSource, out: Path, cfg: GPTQConfig) -> None:
    """Quantize and pack every block, write it into its planned shard and finish, the way a job does,
    RTN instead of GPTQ."""
    n_blocks = source.config["num_hidden_layers"]
    spec = {"name": "loader-test", "model": {"source": "synthetic://llama-tiny"}}
    fingerprint = f"loader-test-{cfg}"
    begin_staging(out, fingerprint, spec)
    report_layers, parts = [], []
    for b in range(n_blocks):
        prefix = f"model.layers.{b}."
        part, block_layers = {}, []
        for name in [n for n in source.tensors if n.startswith(prefix)]:
            stem = name.removesuffix(".weight")
            if stem.removeprefix(prefix) not in LINEARS:
                part[name] = read_source_tensor(source, name)  # norms stay as they are
                continue
            weight = read_source_tensor(source, name).float()
            result = quantize_rtn(weight, _hessian_sum(weight.shape[1], seed=len(block_layers)), N_TOKENS, cfg)
            packed = pack_linear(result, cfg.bits)
            part.update({f"{stem}.{field}": getattr(packed, field) for field in PACKED_FIELDS})
            block_layers.append(LayerReport(
                name=stem, input_group=stem.removeprefix(prefix), in_features=weight.shape[1],
                out_features=weight.shape[0], gptq_loss=result.loss, rtn_loss=result.loss, damp_percent=0.0,
                n_tokens=N_TOKENS, owner=0, max_rel_err=0.0, mean_rel_err=0.0))
        parts.append(part)
        report_layers += block_layers
    dtype_names = {dtype: name for name, dtype in DTYPES.items()}
    planned = [PlannedTensor(name, dtype_names[t.dtype], tuple(t.shape), b)
               for b, part in enumerate(parts) for name, t in part.items()]
    planned += [PlannedTensor(name, info.dtype, info.shape, None)
                for name, info in source.tensors.items() if not name.startswith("model.layers.")]
    plan = plan_shards(planned)
    prepare_shards(out, plan)
    for b, part in enumerate(parts):
        shard = plan.shard_of_block(b)
        write_shard_tensors(open_shard_path(out, shard), shard, part, b)
        layers = [layer for layer in report_layers if layer.name.startswith(f"model.layers.{b}.")]
        stats = BlockStats(block=b, seconds={}, peak_memory_bytes=(0,), bytes_received=({},))
        mark_block_done(out, b, layers=layers, stats=stats)
    quantization_config = gptq_quantization_config(
        bits=cfg.bits, group_size=cfg.group_size, desc_act=cfg.desc_act, sym=cfg.sym,
        damp_percent=cfg.damp_percent, true_sequential=True, static_groups=cfg.static_groups,
    )
    no_calibration = DatasetDescription(source="(synthetic Hessians)", kind="none", packing="concat", min_length=0,
                                        records_used=0, records_dropped=0, records_held_out=0)
    report = JobReport(job=spec["name"], source_revision=source.revision, calibration_dataset=no_calibration,
                       calibration_windows_sha256="", calibration_window_sha256s=(), quantization=quantization_config,
                       layers=tuple(sorted(report_layers, key=lambda layer: layer.name)))
    finish_checkpoint(out, source, plan, report, spec)


def _float16_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Round the block linears' weights to float16, as GPTQModel's torch kernel dequantizes."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(module.weight.half().float())
    return model


@pytest.mark.parametrize(
    "cfg",
    [
        GPTQConfig(bits=4, group_size=128),  # the default spec's format
        GPTQConfig(bits=3, group_size=64, desc_act=True),  # values straddling words; permuted g_idx
        GPTQConfig(bits=8, group_size=-1, sym=False),  # one group per row; asymmetric zero points
    ],
    ids=["4bit-g128", "3bit-g64-act-order", "8bit-asym-one-group"],
)
def test_transformers_gptq_path_reproduces_rayquants_dequantized_logits(tmp_path, source, input_ids, cfg):
    out = tmp_path / "checkpoint"
    _write_checkpoint(source, out, cfg)

    loaded = load_gptq_logits(out, input_ids, bits=cfg.bits)
    ours = logits(_float16_weights(dequantized_model(source.path, out)), input_ids)
    fp = logits(fp_model(source.path), input_ids)

    assert loaded.shape == (2, 24, 1024) and loaded.dtype == torch.float32
    assert torch.allclose(loaded, ours, rtol=0, atol=1e-5), float((loaded - ours).abs().max())
    # the loader really applied the quantized weights: far from the fp model, which ours is not
    assert logit_mse(loaded, ours) < 1e-6 * logit_mse(loaded, fp)


def test_loader_refuses_a_bit_width_the_checkpoint_does_not_have(tmp_path, source, input_ids):
    out = tmp_path / "checkpoint"
    _write_checkpoint(source, out, GPTQConfig(bits=4, group_size=128))
    with pytest.raises(ValueError) as err:
        load_gptq_logits(out, input_ids, bits=8)
    assert str(err.value) == f"{out} is a 4-bit checkpoint, not 8-bit"
