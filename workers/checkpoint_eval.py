"""A checkpoint as one dense float model, and its perplexity on token windows (`rayquant eval`).

The model is built from config.json with transformers' own class (the adapter's meta skeleton),
every packed linear's weight is rebuilt with `solver.pack.dequantize_packed` (scales[g_idx] ·
(q − z), float32), and all other tensors are loaded as stored. Perplexity is
`workers.evaluation`'s definition, the one the job's in-pass evaluation uses, so the two agree.
The whole model is materialised at once: this is for models that fit in one device's memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
import torch
from torch import nn

from rayquant.solver.pack import PACKED_FIELDS, PackedLinear, dequantize_packed
from rayquant.storage.gptq_checkpoint import GPTQCheckpoint, InvalidGPTQCheckpoint, read_packed_tensors
from rayquant.storage.model_source import read_source_tensor
from rayquant.workers.adapter import build_skeleton, move_buffers
from rayquant.workers.evaluation import perplexity, window_nll
from rayquant.workers.moe import unfuse_experts

log = structlog.get_logger()


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_sum: float  # summed next-token NLL, float64 accumulation
    n_tokens: int  # predicted tokens: windows × (seq_len − 1)


def load_dequantized_model(checkpoint: GPTQCheckpoint, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> nn.Module:
    """The checkpoint's model with dequantized linears, all floats in `dtype`, on `device`, in eval mode.

    Raises:
        UnsupportedArchitecture: config.json is not a decoder-only causal LM.
        NonFiniteWeights: a tensor holds NaN or Inf.
        InvalidGPTQCheckpoint: tensors missing or left over for this config, bad g_idx.
    """
    source = checkpoint.source
    config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    model = build_skeleton(config, dtype)
    unfuse_experts(model)  # MoE: one linear per expert, under the checkpoint's names (workers/moe.py)
    packed = {linear.name: linear for linear in checkpoint.linears}
    state: dict[str, torch.Tensor] = {}
    for linear in checkpoint.linears:
        tensors = read_packed_tensors(checkpoint, linear)
        W = dequantize_packed(PackedLinear(**tensors), linear.bits)  # [N, K] float32
        state[f"{linear.name}.weight"] = W.to(device=device, dtype=dtype)
    packed_tensors = {f"{name}.{suffix}" for name in packed for suffix in PACKED_FIELDS}
    for name in source.tensors:
        if name not in packed_tensors:
            tensor = read_source_tensor(source, name, device)
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    _tie_output_head(model, state)
    _check_names(model, state, source.path)
    model.load_state_dict(state, strict=True, assign=True)
    move_buffers(model, torch.device(device))
    log.info("eval_model_loaded", path=str(source.path), quantized_linears=len(packed), tensors=len(state))
    return model.eval()


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, windows: torch.Tensor, micro_batch: int = 1) -> PerplexityResult:
    """Perplexity of [n_windows, seq_len] int64 token windows, forwarded `micro_batch` windows at a time."""
    device = next(model.parameters()).device
    nll_sum, n_tokens, start = 0.0, 0, time.perf_counter()
    for first in range(0, len(windows), micro_batch):
        ids = windows[first:first + micro_batch].to(device)
        nll, n = window_nll(model(input_ids=ids).logits, ids)
        nll_sum, n_tokens = nll_sum + nll, n_tokens + n
        log.info("eval_progress", windows=min(first + micro_batch, len(windows)), of=len(windows),
                 ppl=round(perplexity(nll_sum, n_tokens), 4), seconds=round(time.perf_counter() - start, 2))
    return PerplexityResult(ppl=perplexity(nll_sum, n_tokens), nll_sum=nll_sum, n_tokens=n_tokens)


def _tie_output_head(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Tied-embedding checkpoints store the shared matrix once, under the input embedding's name."""
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return
    module_names = {module: name for name, module in model.named_modules()}
    head = module_names[model.get_output_embeddings()] + ".weight"
    embed = module_names[model.get_input_embeddings()] + ".weight"
    if head not in state and embed in state:
        state[head] = state[embed]


def _check_names(model: nn.Module, state: dict[str, torch.Tensor], path: object) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise InvalidGPTQCheckpoint(
            f"{path}: the tensors do not match the model config.json describes: {len(missing)} missing "
            f"(first: {missing[:1]}), {len(unexpected)} unexpected (first: {unexpected[:1]}); the weights and "
            "config.json come from different models, re-download or re-quantize the checkpoint"
        )
