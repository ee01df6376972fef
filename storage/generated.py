"""Full-size synthetic shapes (`synthetic://llama-70b`, `llama-405b`, ...): tensors made on read.

Nothing but config.json and a small byte-level BPE tokenizer is written (its ids are valid in any
larger vocabulary); every weight is drawn on the device that reads it, from a generator seeded by
the tensor's name, so a 405B-shaped model needs neither disk nor host memory. Benchmarks use these
to run the real block pipeline at real shapes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from rayquant.storage.safetensors_reader import TensorInfo

INIT_STD = 0.02  # transformers' default initializer_range
_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
               bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False, dtype="bfloat16",
               architectures=["LlamaForCausalLM"], model_type="llama")
# Add a shape here to benchmark it: transformers config fields of a real model.
GENERATED_PRESETS: dict[str, dict] = {
    "llama-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8),
    "llama-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8),
    "llama-405b": dict(_LLAMA3, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                       num_attention_heads=128, num_key_value_heads=8),
    # DeepSeek-V3 (671B): MLA, 3 dense blocks, then 256 routed experts of 7168 -> 2048 (top-8) + 1 shared
    # expert per block. Without its YaRN rope scaling (same shapes and costs).
    "deepseek-v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
                        n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
                        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
                        num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
                        max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=0,
                        eos_token_id=1, tie_word_embeddings=False, dtype="bfloat16",
                        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3"),
}


def materialize_generated(preset: str, cache_dir: Path) -> Path:
    """Write the preset's config.json and tokenizer under cache_dir once; return the directory."""
    from rayquant.storage.synthetic import write_tokenizer  # builds from the shipped text

    target = Path(cache_dir) / f"{preset}-generated"
    config_path = target / "config.json"
    if not config_path.is_file():
        target.mkdir(parents=True, exist_ok=True)
        write_tokenizer(target, vocab_size=1024, model_max_length=GENERATED_PRESETS[preset]["max_position_embeddings"])
        tmp = target / "config.json.tmp"
        tmp.write_text(json.dumps(GENERATED_PRESETS[preset], indent=2, sort_keys=True) + "\n")
        tmp.replace(config_path)
    return target


def generated_tensor_infos(config: dict, path: Path) -> dict[str, TensorInfo]:
    """Name, dtype and shape of every weight, from the model class itself on the meta device.

    Names and shapes are the checkpoint's, as save_pretrained writes them (MoE experts one linear each).
    """
    # imported here: transformers' model loading pulls in torch._dynamo and DTensor (seconds), which
    # opening a synthetic:// or local source does not need
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[config["model_type"]].from_dict({k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    infos = {}
    for name, t in revert_weight_conversion(model, model.state_dict()).items():
        nbytes = t.numel() * t.element_size()
        infos[name] = TensorInfo(file=path / "generated", dtype="BF16", shape=tuple(t.shape), start=0, end=nbytes)
    return infos


def generate_tensor(name: str, info: TensorInfo, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor `name`: ones for norms, N(0, INIT_STD) otherwise; bf16, seeded by the name."""
    if name.endswith("norm.weight"):
        return torch.ones(info.shape, dtype=torch.bfloat16, device=device)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(info.shape, generator=gen, device=device) * INIT_STD).to(torch.bfloat16)
